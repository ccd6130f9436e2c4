"""Unreadable data and dying DataLoader workers, as real processes on copies of the tiny shards: a
sample with flipped bytes, a shard cut short, a shard deleted, a worker killed with SIGKILL.

By default (`data.bad_samples=error`) each is an error naming the shard file and the sample; a
2-rank run ends promptly although the other rank waits in a collective (torchrun tears the group
down). With `data.bad_samples=skip` training replaces an unreadable sample by another of the same
identity and evaluation leaves it out; both count it in the log, TensorBoard and the metrics.

The faults are placed on samples that the first 3 steps of epoch 0 draw (checked below), so every
run meets them; the tiny training set's shards hold samples 0-9, 10-19, ..., 40-47.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from data_fixtures import tiny_shards  # noqa: F401  (fixture)
from dist_scripts.procs import TORCHRUN, clean_env
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_evaluate import EVAL, checkpoint, eval_error, features, metrics_json, write_config  # noqa: F401  (fixture)
from test_metrics import assert_metrics_match_reference, reference_metrics
from test_train import TRAIN, train_args

from ognet.checkpoint import checkpoint_steps, load_checkpoint
from ognet.config import load_config
from ognet.data.dataset import TrainSet
from ognet.data.sampler import StratifiedSampler
from ognet.data.shards import ShardReader
from ognet.data.transforms import TransformConfig
from ognet.errors import ShardError
from ognet.evaluate import main as eval_main
from ognet.metrics import evaluate_ranking
from ognet.train import main as train_main

BOUND_S = 60  # a failing run ends well within this: nobody waits for the collective timeout (600 s)
STEPS = 3  # train_args: train.max_steps_per_epoch=3
# (split, sample or shard). Training: sample 29 corrupt, shard 3 cut inside sample 38 (38-39 lost),
# shard 1 deleted (10-19); all at once, no identity loses all its samples.
TRAIN_FAULTS = {"corrupt": ("train_all", 29), "truncated": ("train_all", 38), "missing": ("train_all", 1)}
# evaluation (early in the gallery, so that a failing evaluation fails soon): query sample 3
# corrupt, gallery shard 0 cut inside sample 7 (7-9 lost), gallery shard 1 deleted (10-19)
EVAL_FAULTS = {"corrupt": ("query", 3), "truncated": ("gallery", 7), "missing": ("gallery", 1)}
SKIP = ("data.bad_samples=skip", "eval.scales=[1.0]", "eval.save_features=true")
pytestmark = pytest.mark.usefixtures("one_thread")  # for the runs in this process


# ------------------------------------------------------------------------------------------------
# Breaking shards (index.json gives every sample's shard and byte range)


def samples_table(split: Path) -> dict:
    return json.loads((split / "index.json").read_text())["samples"]


def shard_file(split: Path, shard: int) -> Path:
    return split / json.loads((split / "index.json").read_text())["shards"][shard]["name"]


def corrupt(root: Path, split: str, sample: int) -> set[int]:
    """Flip 16 bytes in the middle of the sample's bytes; returns the samples made unreadable."""
    table = samples_table(root / split)
    offset, length, _ = table["location"][sample]
    path = shard_file(root / split, table["shard"][sample])
    data = bytearray(path.read_bytes())
    middle = offset + length // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))
    return {sample}


def truncate(root: Path, split: str, sample: int) -> set[int]:
    """Cut the sample's shard 100 bytes into the sample: it and the shard's later samples are lost."""
    table = samples_table(root / split)
    shard = table["shard"][sample]
    os.truncate(shard_file(root / split, shard), table["location"][sample][0] + 100)
    return {i for i, s in enumerate(table["shard"]) if s == shard and i >= sample}


def delete(root: Path, split: str, shard: int) -> set[int]:
    shard_file(root / split, shard).unlink()
    return {i for i, s in enumerate(samples_table(root / split)["shard"]) if s == shard}


BREAK = {"corrupt": corrupt, "truncated": truncate, "missing": delete}


def broken_copy(
    tiny_shards: Path, tmp_path: Path, *faults: tuple[str, tuple[str, int]]
) -> tuple[Path, dict[str, set[int]]]:
    """A copy of the tiny shards with the faults applied; per split, the unreadable samples."""
    root = tmp_path / "shards"
    shutil.copytree(tiny_shards, root)
    bad: dict[str, set[int]] = {"train_all": set(), "query": set(), "gallery": set()}
    for kind, (split, where) in faults:
        bad[split] |= BREAK[kind](root, split, where)
    return root, bad


def named_samples(output: str, root: Path, then: str = "") -> set[tuple[str, int]]:
    """(shard path under root, sample) pairs that the output names, as `<shard path>, sample <i>`
    or (a shard that cannot be opened) `sample <i>: <shard path>`, with `then` later on the line."""
    shard = rf"{re.escape(str(root))}/(\S+\.tar)"
    pairs = {(p, int(i)) for p, i in re.findall(rf"{shard}, sample (\d+)[^\n]*{then}", output)}
    return pairs | {(p, int(i)) for i, p in re.findall(rf"sample (\d+): {shard}[^\n]*{then}", output)}


def shard_names(root: Path, split: str, samples: set[int]) -> set[tuple[str, int]]:
    """(shard path under root, sample) of each sample of the split."""
    table = samples_table(root / split)
    return {(f"{split}/{shard_file(root / split, table['shard'][i]).name}", i) for i in samples}


# ------------------------------------------------------------------------------------------------
# Processes with a deadline


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Output (both streams, unbuffered) to `log`; its own session, so a hung run is killed whole."""
    with log.open("w") as out:
        return subprocess.Popen(
            cmd,
            env=clean_env(PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES=""),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_bounded(proc: subprocess.Popen, log: Path, bound: float = BOUND_S) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"{proc.args} still running after {bound} s (a hang)\n{log.read_text()[-5000:]}") from None
    return rc, log.read_text()


def run_bounded(cmd: list[str], log: Path) -> tuple[int, str]:
    return wait_bounded(start(cmd, log), log)


def torchrun_train(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """2 ranks, one DataLoader worker each (errors cross a worker process), one epoch."""
    return [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node=2",
        TRAIN,
        *train_args(shards, run_dir, "data.num_workers=1", "train.epochs=1", "eval.rank_list_queries=1", *extra),
    ]


def drawn(shards: Path, epoch: int = 0) -> list[list[int]]:
    """The global batches of the epoch's first STEPS steps, as the training run's sampler draws them
    (the global schedule does not depend on the world size)."""
    args = train_args(shards, Path("unused"))
    config = load_config(args[1], args[2:])
    table = samples_table(shards / "train_all")
    sampler = StratifiedSampler(
        table["label"],
        table["camid"],
        global_batch_size=config.train.global_batch_size,
        mode=config.sampler.mode,
        seed=config.train.seed,
        k=config.sampler.k,
    )
    return [sampler.global_batch(epoch, step).tolist() for step in range(STEPS)]


# ------------------------------------------------------------------------------------------------
# 1. Default: an error naming the shard and the sample, promptly, on 2 ranks


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["corrupt", "truncated", "missing"])
def test_unreadable_training_sample_stops_two_ranks_naming_shard_and_sample(kind, tiny_shards, tmp_path):
    root, bad = broken_copy(tiny_shards, tmp_path, (kind, TRAIN_FAULTS[kind]))
    met = bad["train_all"] & {i for batch in drawn(root) for i in batch}
    assert met, "the fault must lie on a sample the run draws"
    tic = time.monotonic()
    rc, output = run_bounded(torchrun_train(root, tmp_path / "run"), tmp_path / "log")
    assert rc != 0 and time.monotonic() - tic < BOUND_S
    assert "ognet-train: error:" in output and "ShardError" in output
    named = named_samples(output, root)
    assert named and named <= shard_names(root, "train_all", bad["train_all"]), output[-5000:]
    assert not (tmp_path / "run" / "model_last.pt").exists()


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "missing"])
def test_unreadable_eval_sample_is_an_error_naming_shard_and_sample(kind, checkpoint, tiny_shards, tmp_path, capsys):
    root, bad = broken_copy(tiny_shards, tmp_path, (kind, EVAL_FAULTS[kind]))
    split = EVAL_FAULTS[kind][0]
    message = eval_error(
        capsys,
        "--checkpoint",
        str(checkpoint),
        "--config",
        str(write_config(tmp_path / "e.yaml", root)),
        f"run_dir={tmp_path / 'run'}",
    )
    assert message.startswith("ognet-eval: error: ")
    assert named_samples(message, root) == shard_names(root, split, {min(bad[split])}), message
    assert not (tmp_path / "run" / "metrics-eval.json").exists()


@pytest.mark.slow
def test_missing_gallery_shard_stops_two_rank_evaluation_promptly(checkpoint, tiny_shards, tmp_path):
    """Only rank 1's DataLoader worker meets the deleted shard (gallery 40-43; rank 1 embeds 22-43):
    rank 0 waits for it in the gather of the gallery features."""
    root, bad = broken_copy(tiny_shards, tmp_path, ("missing", ("gallery", 4)))
    assert min(bad["gallery"]) >= 22
    cmd = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node=2",
        EVAL,
        "--checkpoint",
        str(checkpoint),
        "--config",
        str(write_config(tmp_path / "e.yaml", root)),
        f"run_dir={tmp_path / 'run'}",
        "data.num_workers=1",
    ]
    tic = time.monotonic()
    rc, output = run_bounded(cmd, tmp_path / "log")
    assert rc != 0 and time.monotonic() - tic < BOUND_S
    assert "ognet-eval: error:" in output
    named = named_samples(output, root)
    assert named and named <= shard_names(root, "gallery", bad["gallery"]), output[-5000:]


# ------------------------------------------------------------------------------------------------
# 2. data.bad_samples=skip: replaced in training, left out in evaluation, counted


def test_skip_replaces_a_sample_by_a_readable_one_of_its_identity(tiny_shards, tmp_path):
    """Shard 0 (samples 0-9) deleted: identities 0 (samples 0-2) and 1 (3-7) have no readable sample
    left, identity 2 (8-13) keeps 10-13."""
    root, _ = broken_copy(tiny_shards, tmp_path, ("missing", ("train_all", 0)))
    reader = ShardReader(root / "train_all")
    labels = reader.index.labels
    skip, strict = TrainSet(reader, TransformConfig(), 0, "skip"), TrainSet(reader, TransformConfig(), 0)
    with pytest.raises(ShardError, match=rf"sample 8: {re.escape(str(root))}/train_all/shard-000000.tar: cannot open"):
        strict[(0, 5, 8)]

    xyz, rgb, label, replaced = skip[(0, 5, 8)]
    assert replaced == 1 and label == labels[8]
    # the replacement is the item a readable sample of the identity gives at this position
    matches = [i for i in np.flatnonzero(labels == labels[8]) if i >= 10 and strict[(0, 5, int(i))][0].equal(xyz)]
    assert len(matches) == 1
    again = skip[(0, 5, 8)]
    assert again[0].equal(xyz) and again[1].equal(rgb)  # deterministic
    assert skip[(0, 6, 8)][3] == 1 and skip[(0, 5, 20)][3] == 0
    with pytest.raises(ShardError, match=r"no other sample of its identity \(pid \d+, 5 samples\) is readable"):
        skip[(0, 5, 4)]


@pytest.fixture(scope="module")
def skip_run(tiny_shards, tmp_path_factory):
    """2 ranks, 1 epoch of 3 steps and the final evaluation, with data.bad_samples=skip, on shards
    with all the faults at once: (shards root, unreadable samples per split, run dir, output)."""
    tmp = tmp_path_factory.mktemp("skip")
    root, bad = broken_copy(tiny_shards, tmp, *TRAIN_FAULTS.items(), *EVAL_FAULTS.items())
    run_dir = tmp / "run"
    rc, output = run_bounded(torchrun_train(root, run_dir, *SKIP), tmp / "log")
    assert rc == 0, output[-5000:]
    return root, bad, run_dir, output


@pytest.mark.slow
def test_skip_training_replaces_and_counts_unreadable_samples(skip_run):
    root, bad, run_dir, output = skip_run
    batches = drawn(root)
    per_step = [sum(i in bad["train_all"] for i in batch) for batch in batches]
    assert all(per_step) and len({i for batch in batches for i in batch} & bad["train_all"]) >= 3  # every fault met
    cumulative = np.cumsum(per_step).tolist()

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/bad_samples")] == list(
        zip(range(1, STEPS + 1), cumulative)
    )
    for step, (n, total) in enumerate(zip(per_step, cumulative)):
        assert (
            f"epoch 0 step {step}: {n} unreadable samples replaced by others of their identity ({total} so far"
            in output
        )
    assert (
        load_checkpoint(checkpoint_steps(run_dir / "checkpoints")[-1][1])["progress"]["bad_samples"] == cumulative[-1]
    )
    # each worker names what it replaced (workers read ahead, so possibly more than was trained on)
    warned = named_samples(output, root, then="; replaced by sample")
    met = {i for batch in batches for i in batch} & bad["train_all"]
    assert shard_names(root, "train_all", met) <= warned <= shard_names(root, "train_all", bad["train_all"])


@pytest.mark.slow
def test_bad_sample_count_survives_resume(skip_run, tmp_path, capfd):
    """The run again with 2 epochs (ognet-train in this process) resumes after epoch 0, counts on."""
    root, bad, run_dir, _ = skip_run
    resumed = tmp_path / "run"
    shutil.copytree(run_dir, resumed)
    (resumed / "model_last.pt").unlink()
    train_main(train_args(root, resumed, *SKIP, "eval.rank_list_queries=0"))
    assert "resumed from" in capfd.readouterr().out
    per_step = [sum(i in bad["train_all"] for i in batch) for batch in drawn(root, 0) + drawn(root, 1)]
    events = EventAccumulator(str(resumed / "tb"), size_guidance={"scalars": 0}).Reload()
    counts = {e.step: e.value for e in events.Scalars("train/bad_samples")}
    assert per_step[STEPS:] != [0] * STEPS and counts[2 * STEPS] == sum(per_step)


@pytest.mark.slow
def test_skip_evaluation_leaves_unreadable_samples_out_on_any_world_size(skip_run, tmp_path):
    root, bad, run_dir, output = skip_run
    num_bad = len(bad["query"]) + len(bad["gallery"])
    during = metrics_json(run_dir)  # 2 ranks, inside training
    assert during["num_bad_samples"] == num_bad and during["num_queries"] == 12 - len(bad["query"])
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    assert [e.value for e in events.Scalars("eval/bad_samples")] == [num_bad]
    assert f"{len(bad['query'])} query and {len(bad['gallery'])} gallery samples unreadable, left out" in output
    for split in ("query", "gallery"):
        assert shard_names(root, split, bad[split]) <= named_samples(output, root)

    # As if absent from the split: the metrics of the readable samples alone (left-out rows are 0).
    qf, gf = features(run_dir)
    qi, gi = ShardReader(root / "query").index, ShardReader(root / "gallery").index
    q_ok, g_ok = (~np.isin(np.arange(len(f)), list(bad[s])) for s, f in (("query", qf), ("gallery", gf)))
    assert not qf[~q_ok].any() and not gf[~g_ok].any()
    np.testing.assert_allclose(np.linalg.norm(qf[q_ok], axis=1), 1, atol=1e-5)
    alone = evaluate_ranking(qf[q_ok], qi.pids[q_ok], qi.camids[q_ok], gf[g_ok], gi.pids[g_ok], gi.camids[g_ok])
    assert during == {"step": during["step"], **alone, "num_bad_samples": num_bad}  # the same code, fewer samples
    loop = reference_metrics(qf[q_ok], qi.pids[q_ok], qi.camids[q_ok], gf[g_ok], gi.pids[g_ok], gi.camids[g_ok])
    assert_metrics_match_reference(during, loop)  # and an independent per-query loop

    # One plain process (ognet-eval in this process, no DataLoader worker): the same numbers.
    eval_main(
        [
            "--checkpoint",
            str(run_dir / "model_last.pt"),
            "--config",
            str(write_config(tmp_path / "e.yaml", root)),
            f"run_dir={tmp_path / 'plain'}",
            *SKIP,
            "eval.batch_size=16",
            "eval.rank_list_queries=0",
        ]
    )  # as in training
    plain = metrics_json(tmp_path / "plain")
    assert {k: v for k, v in plain.items() if k != "step"} == {k: v for k, v in during.items() if k != "step"}


# ------------------------------------------------------------------------------------------------
# 3. A DataLoader worker killed: a clear error, not a hang


@pytest.mark.slow
def test_killed_dataloader_worker_stops_training_promptly(tiny_shards, tmp_path):
    """(A rank that stops this way leaves the others in a collective: torchrun tears them down, as
    in the tests above.)"""
    log = tmp_path / "log"
    cmd = [
        sys.executable,
        TRAIN,
        *train_args(
            tiny_shards, tmp_path / "run", "data.num_workers=1", "train.epochs=1", "train.max_steps_per_epoch=0"
        ),
    ]  # the whole epoch: 6 steps
    proc = start(cmd, log)
    try:
        deadline = time.monotonic() + BOUND_S
        while "epoch 0 step 1/6" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.1)
        [worker] = psutil.Process(proc.pid).children()  # the one DataLoader worker
        os.kill(worker.pid, signal.SIGKILL)
        tic = time.monotonic()
        rc, output = wait_bounded(proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc != 0 and time.monotonic() - tic < BOUND_S
    assert f"DataLoader worker (pid {worker.pid}) is killed by signal: Killed" in output, output[-5000:]
    assert not (tmp_path / "run" / "model_last.pt").exists()
