"""End-to-end training runs on the tiny synthetic set: real processes (plain, torchrun, DeepSpeed),
real checkpoints and TensorBoard event files read back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from data_fixtures import tiny_shards  # noqa: F401  (fixture)
from dist_scripts.procs import REPO, TORCHRUN, clean_env, finish, run, run_here, start_slurm_tasks
from picture_checks import hparams_metrics
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ognet import dist
from ognet.checkpoint import checkpoint_steps, load_checkpoint
from ognet.config import load_config
from ognet.data.loading import TrainData
from ognet.evaluate import main as evaluate_main
from ognet.train import main as train_main

TRAIN = str(REPO / "launch" / "train.py")


def train_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """A few seconds per epoch on 2 cores: 256-point clouds, OG-Net-Small with 64 centres."""
    return [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"data.root={shards}",
        f"run_dir={run_dir}",
        "data.num_workers=0",
        "model.overrides={init_points: 64, k: 4}",
        "train.epochs=2",
        "train.global_batch_size=8",
        "train.max_steps_per_epoch=3",
        "train.log_every_steps=1",
        "train.eval_every_epochs=0",
        "optim.loss_warmup_epochs=1",
        "eval.batch_size=16",
        "eval.rank_list_queries=1",
        *extra,
    ]


def first_clouds(run_dir: Path) -> list[str]:
    """The mesh tags of a run's first two training clouds: their identity, from the first batch
    the run's sampler gives (one process, as the run)."""
    data = TrainData(load_config(run_dir / "config.yaml"), dist.DistInfo(0, 0, 1, torch.device("cpu"), None, True))
    _, _, labels = next(iter(data.loader(0)))
    pids = {label: pid for pid, label in data.reader.index.label_map.items()}
    return [f"train/cloud_{i}_id{pids[int(label)]:04d}" for i, label in enumerate(labels[:2])]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_loss_falls(run_dir: Path) -> None:
    """Cross-entropy of the last six logged steps below that of the first six."""
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    ce = [e.value for e in sorted(events.Scalars("train/ce"), key=lambda e: e.step)]
    assert len(ce) >= 12 and sum(ce[-6:]) < sum(ce[:6]) - 0.3, ce


LEARNING = ("train.max_steps_per_epoch=6", "loss.circle=false", "optim.lr=4e-3", "eval.rank_list_queries=0")


# Dropout off (its masks depend on the rank); Adam's eps raised from 1e-8: its first step is otherwise
# lr * sign(g) whatever |g|, so a gradient that is zero but for float32 rounding moves a weight by lr.
# EdgeConv as the original computes it (the edge tensor): with the per-point paths float32 rounding
# differs more between 1 x 8 and 2 x 4 (the single process takes `fused`, synchronised BatchNorm
# `gather`), and Adam turns a near-zero gradient's flipped sign into a full step of lr by step 3. The
# paths' equality is test_edge_conv.py's (float64, 1e-12).
AS_ONE_PROCESS = ("model.overrides.dropout=0.0", "optim.eps=1e-4", "model.edge_conv=edge_tensor")


def assert_close_weights(a: Path, b: Path) -> None:
    """Equal to 1e-4 of each tensor's largest value (at least 1): an Adam step moves a weight by up to
    lr = 4e-3, per-rank BatchNorm moves them apart by about that; measured: up to a fifth of the bound."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k, v in wb.items():
        atol = 1e-4 * max(1.0, v.abs().max().item()) if v.numel() else 0.0
        torch.testing.assert_close(wa[k], v, rtol=1e-4, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
def test_single_process_run_writes_checkpoints_metrics_and_tensorboard(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = run([sys.executable, TRAIN, *train_args(tiny_shards, run_dir)], timeout=300)
    assert "epoch 1 step 3/3" in proc.stdout and "Rank@1:" in proc.stdout

    assert (run_dir / "config.yaml").exists()
    assert [step for step, _ in checkpoint_steps(run_dir / "checkpoints")] == [3, 6]  # keep_checkpoints=2
    final = load_checkpoint(run_dir / "model_last.pt")
    assert final["model_config"]["variant"] == "ognet-small" and final["model_config"]["num_classes"] == 8
    metrics = json.loads((run_dir / "metrics-eval.json").read_text())
    assert metrics["num_queries"] == 12 and 0 <= metrics["rank1"] <= metrics["rank5"] <= metrics["rank10"] <= 1
    assert (run_dir / "result.txt").read_text().count("Rank@1:") == 1

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 6 and all(v == v and v > 0 for v in losses)
    assert [e.step for e in events.Scalars("train/lr")] == list(range(1, 7))
    assert events.Scalars("eval/rank1")[0].value == pytest.approx(metrics["rank1"])
    assert "eval/rank_list_0" in events.Tags()["images"]
    for tag in ("train/grad_norm", "train/data_wait_fraction", "train/step_time_s", "train/peak_memory_mb"):
        values = [e.value for e in events.Scalars(tag)]
        assert len(values) == 6 and all(v >= 0 for v in values), tag
    clouds = sorted(t.removesuffix("_VERTEX") for t in events.Tags()["tensors"] if t.endswith("_VERTEX"))
    assert clouds == first_clouds(run_dir)
    assert hparams_metrics(run_dir / "tb") == [f"eval/{key}" for key in ("rank1", "rank5", "rank10", "mAP", "mINP")]
    assert "config/text_summary" in events.Tags()["tensors"]


@pytest.mark.slow
def test_resume_mid_epoch_replays_bit_identically(tiny_shards, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ("train.checkpoint_every_steps=1", "train.keep_checkpoints=10", "eval.rank_list_queries=0")
    run_here(train_main, train_args(tiny_shards, full, *args))  # in this process: no process boundary needed

    # Pretend the run died after global step 4 (epoch 1, step 1): keep only what existed then.
    shutil.copytree(full, resumed)
    for step, path in checkpoint_steps(resumed / "checkpoints"):
        if step > 4:
            path.unlink()
    (resumed / "model_last.pt").unlink()
    proc = run_here(train_main, train_args(tiny_shards, resumed, *args))
    assert "resumed from" in proc.stdout and "epoch 1 step 1" in proc.stdout
    assert_same_weights(full / "model_last.pt", resumed / "model_last.pt")


@pytest.mark.slow
def test_two_rank_ddp_run_learns_as_one_process_would(tiny_shards, tmp_path):
    """With BatchNorm synchronised (train.sync_bn=auto) and dropout off, 2 ranks train as one process.
    That a 2-rank run repeats bit for bit is test_faults_processes.py's (restarted and stack-dumped
    runs end with an undisturbed run's weights)."""
    two, one = tmp_path / "two", tmp_path / "one"
    every_third = ("train.checkpoint_every_steps=3", "train.keep_checkpoints=8")
    extra = (*LEARNING, *AS_ONE_PROCESS, *every_third)
    launch = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", TRAIN]
    proc = run([*launch, *train_args(tiny_shards, two, *extra, "train.epochs=4")], timeout=400)
    assert "on 2 x cpu (ddp, fp32)" in proc.stdout
    assert_loss_falls(two)
    # Epochs only set the cosine's length, and epoch 0 runs at the full learning rate in both.
    run_here(train_main, train_args(tiny_shards, one, *extra, "train.epochs=1"))  # one process: this one
    # float32 rounding differs between 1 x 8 and 2 x 4 and grows with each step at lr 4e-3 (the losses
    # are 1e-6 apart up to step 4, 1e-4 at step 5): the weights after 3 steps, statistics included.
    assert_close_weights(two / "checkpoints" / "step-00000003.pt", one / "checkpoints" / "step-00000003.pt")
    # The evaluation inside the 2-rank run used rank 0's BN statistics on both ranks: evaluating the
    # saved weights in a plain process gives the same numbers.
    run_here(evaluate_main, ["--checkpoint", str(two / "model_last.pt"), *train_args(tiny_shards, two / "eval")])
    after = json.loads((two / "eval" / "metrics-eval.json").read_text())
    during = json.loads((two / "metrics-eval.json").read_text())
    assert during["num_queries"] == 12
    assert {k: v for k, v in after.items() if k != "step"} == {k: v for k, v in during.items() if k != "step"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "precision", "preempt"),
    [(2, "bf16", True), (1, "fp32", False)],
    ids=["zero2-bf16-preempted", "zero1-fp32"],
)
def test_deepspeed_learns_checkpoints_per_rank_and_resumes_a_preempted_run(
    tiny_shards, tmp_path, stage, precision, preempt
):
    """ZeRO-2 in bf16 (DeepSpeed's torch_autocast: float32 module and partitions), preempted by
    SIGUSR1 to every rank as SLURM does, then resumed; ZeRO-1 in fp32 in one go (its checkpoints are
    written by the same code). Nothing is JIT-compiled (a build costs a minute and leaves a lock that
    can hang later starts)."""
    import deepspeed  # noqa: F401  (tests/run.sh installs the deepspeed extra; without it this fails, naming it)
    from test_faults_processes import Run, rank_pids

    run_dir = tmp_path / "ds"
    extensions = tmp_path / "torch_extensions"
    env = clean_env(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(extensions))
    base = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", TRAIN]
    config = REPO / "configs" / "deepspeed" / f"zero{stage}.json"
    args = train_args(
        tiny_shards,
        run_dir,
        *LEARNING,
        "train.backend=deepspeed",
        f"train.precision={precision}",
        "train.epochs=4",
        f"train.deepspeed_config={config}",
    )
    if preempt:
        first = Run([*base, *args], env=env)
        try:
            first.wait_for("epoch 2 step 1/6", timeout=300)
            for pid in rank_pids(first.proc.pid).values():
                os.kill(pid, signal.SIGUSR1)
            assert first.finish(timeout=300) != 0
        finally:
            if first.proc.poll() is None:
                first.kill()
        assert "preemption signal: checkpoint written" in first.output
    proc = run([*base, *args], env=env, timeout=400)  # after a preemption: resumes where it stopped
    assert ("resumed from" in proc.stdout) == preempt
    assert f"(deepspeed, {precision})" in proc.stdout and "epoch 3 step 6/6" in proc.stdout
    tags = sorted(p.name for p in (run_dir / "checkpoints" / "deepspeed").iterdir() if p.is_dir())
    assert len(tags) == 2 and tags == [p.name for _, p in checkpoint_steps(run_dir / "checkpoints")]  # pruned alike
    assert len(list((run_dir / "checkpoints" / "deepspeed" / tags[-1]).glob("*optim_states.pt"))) == 2  # one per rank
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights(run_dir / "model_last.pt").values())
    assert_loss_falls(run_dir)
    assert not extensions.exists(), f"DeepSpeed JIT-built {sorted(p.name for p in extensions.iterdir())}"


def test_bad_config_key_fails_before_any_work(tiny_shards, tmp_path):
    proc = run_here(train_main, train_args(tiny_shards, tmp_path / "run", "train.epoch=3"), check=False)
    assert proc.returncode == 1
    assert "unknown config key train.epoch" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def half_batch_runs(tmp_path_factory) -> Path:
    """ognet_equivalence.py for both norms: one plain process, then 2 ranks under torchrun."""
    from dist_scripts.procs import python, torchrun

    out = tmp_path_factory.mktemp("equivalence")
    (out / "one").mkdir(), (out / "two").mkdir()
    python("ognet_equivalence.py", str(out / "one"), "bn2", "bn", timeout=300)
    torchrun("ognet_equivalence.py", 2, str(out / "two"), "bn2", "bn", timeout=300)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["bn2", "bn"])
def test_two_ranks_half_batch_equal_one_process_full_batch(half_batch_runs, norm):
    """OG-Net with BatchNorm in training mode (synchronised; EdgeConv's default fused path), circle
    loss over the all-gathered batch, DDP averaging, an Adam step: same loss, gradients, weights and
    statistics (float64)."""
    one = torch.load(half_batch_runs / "one" / f"{norm}-rank0.pt", weights_only=True)
    two = [torch.load(half_batch_runs / "two" / f"{norm}-rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert sum(k.endswith("running_var") for k in one) > 10 and sum(k.startswith("grad/") for k in one) > 50
    for rank in range(2):
        assert two[rank].keys() == one.keys()
        for name in one:
            # Weights: Adam's first step is about lr = 1e-3 whatever the gradient's size, so a gradient
            # that is zero but for rounding (a bias before a BatchNorm) moves by up to 1e-9: 1e-6 of a step.
            atol = 1e-9 if name.startswith("state/") else 1e-12
            torch.testing.assert_close(
                two[rank][name], one[name], rtol=1e-6, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
            )
    for name in one:  # the ranks' statistics are equal bit for bit, with no broadcast
        if name.startswith("state/"):
            assert torch.equal(two[0][name], two[1][name]), name


@pytest.mark.slow
def test_two_nodes_c10d_rendezvous_train_together(tiny_shards, tmp_path):
    """Two torchrun "nodes" on localhost, one process each, joined by a c10d rendezvous."""
    import subprocess

    from dist_scripts.procs import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [
        str(TORCHRUN),
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        "--rdzv_id=test-job",
        TRAIN,
        *train_args(tiny_shards, tmp_path / "run", "train.epochs=1", "eval.rank_list_queries=0"),
    ]
    nodes = [
        subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = []
    for node in nodes:
        try:
            stdout, stderr = node.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            raise AssertionError("the two-node run did not finish in 300 s") from None
        assert node.returncode == 0, stderr[-3000:]
        outputs.append(stdout)
    assert sum("on 2 x cpu (ddp, fp32)" in out for out in outputs) == 1  # printed by the global rank 0 only
    assert (tmp_path / "run" / "model_last.pt").exists()


@pytest.mark.slow
def test_impossible_sampling_fails_on_every_rank_before_training(tiny_shards, tmp_path):
    """P x K with P = 12 / 4 = 3 identities per global batch cannot split into whole identities on 2 ranks.

    The ranks run as two SLURM-style tasks, not under torchrun, which would stop the second rank as
    soon as the first fails, before it could show that it fails on its own."""
    run_dir = tmp_path / "run"
    args = train_args(tiny_shards, run_dir, "sampler.mode=pk", "sampler.k=4", "train.global_batch_size=12")
    outputs = []
    for rank, proc in enumerate(start_slurm_tasks(TRAIN, 2, *args)):
        rc, output = finish(proc)
        assert rc == 1, f"rank {rank} exited {rc}\n{output[-3000:]}"
        errors = [line for line in output.splitlines() if line.startswith("ognet-train: error:")]
        assert len(errors) == 1 and "whole identities" in errors[0], output[-3000:]
        outputs.append(output)
    assert not (run_dir / "checkpoints").exists() and not any("epoch 0 step" in out for out in outputs)
