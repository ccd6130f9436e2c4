"""Validate and measure the GPU path in one run; writes a Markdown report (see benchmarks/gpu_check.sh).

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu.md] [--smoke]

On CUDA: Triton FPS and ball query against the reference on the GPU, the fused EdgeConv's
kernels against its PyTorch ops; a training step of every
variant at batch 36 x 4096 points with reference and Triton ops (time per step, samples/s, peak
memory, device ops and host syncs as benchmarks/step_budget.py counts them, CUDA kernels);
bf16 and fp16 autocast steps; a 1-rank nccl training with torchrun on tiny synthetic shards; the
same with DeepSpeed bf16 when DeepSpeed imports. `--smoke` runs every part with tiny sizes on
CPU (Triton under its interpreter, gloo, fp16 left out) to test the script itself. A part that
fails is reported as failed and the others still run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "--smoke" in sys.argv:  # Triton decides when it is imported whether it interprets
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_budget  # noqa: E402

from ognet.model import VARIANTS, ops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Sizes:
    """The paper's input on a GPU; tiny on CPU (--smoke)."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        self.batch, self.points = (2, 256) if smoke else (36, 4096)
        self.model = ["model.overrides={init_points: 32, k: 4}"] if smoke else []
        self.steps = 1 if smoke else 5
        self.timeout_s = 300 if smoke else 100  # per torchrun training
        self.point_ops = ["reference", "triton"]
        self.precisions = ["bf16"] if smoke else ["bf16", "fp16"]


def environment() -> list[str]:
    lines = [f"- torch {torch.__version__}, Python {platform.python_version()}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"- GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    try:
        import triton

        lines.append(f"- triton {triton.__version__}")
    except ImportError:
        lines.append("- triton not installed")
    return lines


def seconds(fn: Callable[[], Any], device: str, repeats: int) -> float:
    """Median wall seconds of `fn` (the device synchronised around each call)."""
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(reference: Callable, triton: Callable, args: tuple, s: Sizes) -> tuple[bool, float, float]:
    """(equal outputs, ms per call of the reference, of Triton) of one point op."""
    want, got = reference(*args), triton(*args)
    if isinstance(want, torch.Tensor):
        want, got = [want], [got]
    equal = all(torch.equal(a, b) for a, b in zip(want, got))
    repeats = 1 if s.smoke else 5
    return equal, *(seconds(lambda f=f: f(*args), s.device, repeats) * 1e3 for f in (reference, triton))


def check_kernels(s: Sizes) -> list[str]:
    """Triton's indices equal the reference's on the device; per-call times of both."""
    from ognet.model import triton_ops

    cases = [(2, 1000, 100), (1, 8192, 48)] if s.smoke else [(36, 4096, 768), (36, 768, 384), (1, 8192, 1024)]
    lines = [
        "| B x N -> M | FPS equal | ms ref / triton | ball query equal | ms ref / triton |",
        "|---|---|---|---|---|",
    ]
    g = torch.Generator().manual_seed(0)
    for b, n, m in cases:
        xyz = (torch.randn(b, n, 3, generator=g) * torch.tensor([0.2, 0.5, 0.1])).to(s.device)
        xyz[:, 1::97] = 0.0  # invalid points
        fps = compare(ops.farthest_point_sample, triton_ops.farthest_point_sample, (xyz, m), s)
        centres = ops.gather_points(xyz.transpose(1, 2), ops.farthest_point_sample(xyz, m)).transpose(1, 2)
        ball = compare(ops.ball_query, triton_ops.ball_query, (xyz, centres, (0.1, 0.2, 0.4), (8, 16, 32)), s)
        lines.append(
            f"| {b} x {n} -> {m} | {fps[0]} | {fps[1]:.2f} / {fps[2]:.2f} | {ball[0]} | {ball[1]:.2f} / {ball[2]:.2f} |"
        )
    return lines


def check_edge_conv(s: Sizes) -> list[str]:
    """One fused EdgeConv (64 -> 128 channels, k 20, train mode) forward + backward with the Triton
    kernels against its PyTorch ops on the device: largest relative difference, ms per call."""
    from ognet.model import edgeconv, triton_ops
    from ognet.model.blocks import MaxMeanPool, PointwiseConv

    b, n = (2, 64) if s.smoke else (s.batch, 1024)
    torch.manual_seed(0)
    conv, norm, pool = PointwiseConv(128, 128).to(s.device), torch.nn.BatchNorm2d(128).to(s.device), MaxMeanPool()
    pool = pool.to(s.device)
    with torch.no_grad():
        norm.weight.uniform_(-1, 1)  # both signs: both ways of the max
    h = torch.randn(b, 64, n, device=s.device)
    idx = ops.knn(torch.randn(b, 3, n, device=s.device), 20)

    def step(point_ops: ops.PointOps) -> list[torch.Tensor]:
        x = h.clone().requires_grad_()
        with ops.using_point_ops(point_ops):
            out = edgeconv.edge_conv_pooled(conv, norm, pool, x, idx, norm_after_pool=False)
            grads = torch.autograd.grad(out.square().sum(), [x, conv.weight, norm.weight, pool.p])
        return [out.detach(), *grads]

    want, got = step(ops.REFERENCE_OPS), step(triton_ops.TRITON_OPS)
    worst = max(float((a - b).norm() / b.norm()) for a, b in zip(got, want))
    repeats = 1 if s.smoke else 10
    ms = [seconds(lambda o=o: step(o), s.device, repeats) * 1e3 for o in (ops.REFERENCE_OPS, triton_ops.TRITON_OPS)]
    return [
        "| B x N, 64 -> 128 channels, k 20 | largest relative difference | ms PyTorch ops / Triton |",
        "|---|---|---|",
        f"| {b} x {n} | {worst:.2e} | {ms[0]:.2f} / {ms[1]:.2f} |",
    ]


def cuda_kernels(trainer: Any, inputs: tuple) -> int | str:
    """CUDA kernels of one step, from the profiler's device activity."""
    if not torch.cuda.is_available():
        return "-"
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.step(*inputs, [])
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def measure_step(s: Sizes, shards: Path, variant: str, point_ops: str, extra: list[str]) -> dict[str, Any]:
    """Time, throughput, peak memory, op budget and CUDA kernels of the Trainer's step."""
    with tempfile.TemporaryDirectory() as run_dir:
        config = [*s.model, *extra]
        trainer = step_budget.build_trainer(variant, point_ops, s.batch, shards, Path(run_dir), s.device, config)
        inputs = step_budget.step_inputs(s.batch, s.points, s.device)
        counts = step_budget.budget(trainer, inputs)  # a warm-up step and the counted one
        if s.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def step() -> None:
            trainer.progress.step = 1  # clear of the epoch's last step, which logs
            trainer.step(*inputs, [])

        step_s = seconds(step, s.device, s.steps)
        peak = torch.cuda.max_memory_allocated() / 2**30 if s.device == "cuda" else float("nan")
        kernels = cuda_kernels(trainer, inputs)
        trainer.close()
    return {"step_s": step_s, "samples_s": s.batch / step_s, "peak_gib": peak, "kernels": kernels, **counts}


def step_table(s: Sizes, shards: Path, runs: list[tuple[str, str, list[str]]]) -> list[str]:
    lines = [
        "| variant | point ops | precision | step (s) | samples/s | peak GiB | device ops (kernel ops) | CUDA kernels "
        "| host syncs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, point_ops, extra in runs:
        precision = next((e.split("=")[1] for e in extra if e.startswith("train.precision=")), "fp32")
        try:
            r = measure_step(s, shards, variant, point_ops, extra)
        except Exception as e:  # reported, and the other parts still run
            lines.append(f"| {variant} | {point_ops} | {precision} | failed: {type(e).__name__}: {e} |||||")
            traceback.print_exc()
            continue
        lines.append(
            f"| {variant} | {point_ops} | {precision} | {r['step_s']:.3f} | {r['samples_s']:.1f} | {r['peak_gib']:.2f} "
            f"| {r['device_ops']:,} ({r['kernel_launches']:,}) | {r['kernels']} | {sum(r['syncs'].values())} |"
        )
    return lines


def torchrun_training(s: Sizes, folder: Path, extra: list[str]) -> list[str]:
    """A short 1-rank training with torchrun (nccl on CUDA, gloo on CPU) on tiny synthetic shards."""
    shards = folder / "tiny-shards"
    if not shards.exists():
        py = [sys.executable, "-m"]
        tiny = ["--preset", "tiny", "--points", "512", "--workers", "2", "--no-progress"]
        subprocess.run([*py, "ognet.data.synth", "--out", str(folder / "tiny"), *tiny], check=True)
        subprocess.run([*py, "ognet.data.pack", str(folder / "tiny"), str(shards), "--workers", "2"], check=True)
    run_dir = folder / f"run-{len(list(folder.glob('run-*')))}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd += [str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml")]
    cmd += [f"data.root={shards}", f"run_dir={run_dir}", "data.num_workers=0", "train.epochs=1"]
    cmd += ["train.max_steps_per_epoch=4", "train.log_every_steps=1", "eval.rank_list_queries=0", *extra]
    cmd += ["model.overrides={init_points: 64, k: 4}", "train.global_batch_size=8"] if s.smoke else []
    start = time.perf_counter()
    env = {**os.environ, "DS_ACCELERATOR": "cpu"} if s.smoke else dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the run uses the reference ops on CPU
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=s.timeout_s, env=env, cwd=ROOT
    )
    took = time.perf_counter() - start
    tail = proc.stdout.strip().splitlines()[-6:]
    status = (
        "passed" if proc.returncode == 0 and (run_dir / "model_last.pt").exists() else f"FAILED ({proc.returncode})"
    )
    return [f"`{' '.join(extra) or 'defaults'}`: {status} in {took:.0f} s", "", "```", *tail, "```"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: test this script")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    s = Sizes(args.smoke)
    if not s.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --smoke to test the script on CPU)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    report = [
        "# GPU check (`benchmarks/gpu_check.sh`)",
        "",
        f"Commit {commit.stdout.strip() or 'unknown'}, "
        f"command `python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`",
        "",
        *environment(),
        "",
    ]
    parts: list[tuple[str, Callable[[], list[str]]]] = []
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    shards = step_budget.make_data(folder)
    parts.append(("Triton point ops against the reference (on the device)", lambda: check_kernels(s)))
    parts.append(("Fused EdgeConv: Triton kernels against PyTorch ops (on the device)", lambda: check_edge_conv(s)))
    runs = [(v, p, []) for v in args.variants for p in s.point_ops]
    runs += [("ognet", "triton", [f"train.precision={p}"]) for p in s.precisions]
    title = f"Training step, batch {s.batch} x {s.points} points (median of {s.steps} steps after a warm-up)"
    parts.append((title, lambda: step_table(s, shards, runs)))
    backend = [] if s.smoke else ["model.point_ops=triton"]
    parts.append(("1-rank torchrun training (nccl on CUDA)", lambda: torchrun_training(s, folder, backend)))
    if importlib.util.find_spec("deepspeed") is None:
        parts.append(("1-rank DeepSpeed bf16 training", lambda: ["not run: DeepSpeed is not installed"]))
    else:
        deepspeed = ["train.backend=deepspeed", "train.precision=bf16"]
        parts.append(("1-rank DeepSpeed bf16 training", lambda: torchrun_training(s, folder, deepspeed)))
    for title, part in parts:
        report += [f"## {title}", ""]
        start = time.perf_counter()
        try:
            report += part()
        except Exception as e:
            report.append(f"FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
        report += ["", f"({time.perf_counter() - start:.0f} s)", ""]
        print("\n".join(report), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report))  # after every part: a run cut short keeps what it measured


if __name__ == "__main__":
    main()
