"""Documented training options, each in one real (single-process) run on the tiny set: weight
averaging with BatchNorm re-estimation and model_average.pt, bf16 autocast end to end, and SIGTERM
making a checkpoint and exit code 75, from which the same command resumes."""

from __future__ import annotations

import json
import signal
import sys

import pytest
import torch
from data_fixtures import tiny_shards  # noqa: F401  (fixture)
from dist_scripts.procs import clean_env, run_here
from test_faults_processes import Run
from test_train import TRAIN, train_args, weights

from ognet.checkpoint import checkpoint_steps, load_checkpoint
from ognet.errors import PREEMPTED_EXIT_CODE
from ognet.model import build_from_spec
from ognet.train import main as train_main

pytestmark = pytest.mark.slow


def test_weight_averaging_in_bf16_writes_the_averaged_model_with_re_estimated_statistics(tiny_shards, tmp_path):
    """3 epochs, wa_start 0.3: the original averages epochs e >= 0.9, i.e. the weights after epochs 1 and 2."""
    run_dir = tmp_path / "run"
    extra = (
        "train.epochs=3",
        "train.wa=true",
        "train.wa_start=0.3",
        "train.precision=bf16",
        "train.keep_checkpoints=5",
    )
    proc = run_here(train_main, train_args(tiny_shards, run_dir, *extra))
    assert "(ddp, bf16)" in proc.stdout and "average: Rank@1:" in proc.stdout

    epoch_ends = dict(checkpoint_steps(run_dir / "checkpoints"))  # {global step: path}
    assert sorted(epoch_ends) == [3, 6, 9]
    after = [weights(epoch_ends[s]) for s in (6, 9)]  # epochs 1 and 2
    averaged, last = weights(run_dir / "model_average.pt"), weights(run_dir / "model_last.pt")
    model = build_from_spec(load_checkpoint(run_dir / "model_last.pt")["model_config"])
    for name, _ in model.named_parameters():
        torch.testing.assert_close(averaged[name], (after[0][name] + after[1][name]) / 2, rtol=0, atol=1e-6)
    assert torch.equal(last["bn_embs.0.weight"], after[1]["bn_embs.0.weight"])
    # BatchNorm statistics re-estimated for the averaged weights: not those of the last model
    assert not torch.equal(averaged["bn_embs.0.running_mean"], last["bn_embs.0.running_mean"])
    assert json.loads((run_dir / "metrics-average.json").read_text())["num_queries"] == 12
    assert load_checkpoint(run_dir / "model_average.pt")["step"] == 9


def test_sigterm_checkpoints_exits_75_and_the_same_command_resumes(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(tiny_shards, run_dir, "train.epochs=2", "eval.rank_list_queries=0")
    stopped = Run([sys.executable, "-u", TRAIN, *args], env=clean_env())
    try:
        stopped.wait_for("epoch 0 step 1/3", timeout=180)
        stopped.proc.send_signal(signal.SIGTERM)
        assert stopped.finish(timeout=120) == PREEMPTED_EXIT_CODE, stopped.output[-3000:]
    finally:
        if stopped.proc.poll() is None:
            stopped.kill()
    assert "preemption signal: checkpoint written at global step" in stopped.output
    (step, path), *_ = checkpoint_steps(run_dir / "checkpoints")
    assert 1 <= step < 6 and not (run_dir / "model_last.pt").exists()

    proc = run_here(train_main, args)  # the same command (in this process: nothing to kill any more)
    assert f"resumed from {path}" in proc.stdout and "epoch 1 step 3/3" in proc.stdout
    assert (run_dir / "model_last.pt").exists()
