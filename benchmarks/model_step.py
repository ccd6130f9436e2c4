"""Training-step cost of every OG-Net variant: time, FLOPs, share of the machine's matmul rate,
peak memory and where the time goes.

    python benchmarks/model_step.py [--variants ognet ognet-deep] [--batch 8] [--points 4096] [--repeats 5]

Each variant runs in its own subprocess so its peak memory is its own. A step is forward +
cross-entropy + a circle-style term on the circle feature + backward (no optimizer). Prints a
Markdown report (see benchmarks/results/model_step.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cpu_model

from ognet.model import VARIANTS, OGNet, build_model, ops  # noqa: E402

NUM_CLASSES = 751
POINT_OPS = ("knn", "farthest_point_sample", "ball_query")
MATMUL_OPS = (
    *("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    *("aten::convolution", "aten::_convolution", "aten::mkldnn_convolution", "aten::convolution_backward"),
)
NORM_OPS = ("aten::native_batch_norm", "aten::native_batch_norm_backward", "aten::_batch_norm_with_update")
GATHER_OPS = ("aten::gather", "aten::scatter_add_", "aten::index", "aten::index_select", "aten::index_add_")


def step(model: OGNet, xyz: torch.Tensor, rgb: torch.Tensor, labels: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    out = model(xyz, rgb)
    f = F.normalize(out.circle_feature, dim=1)
    loss = F.cross_entropy(out.logits, labels) + (f @ f.T).triu(1).square().mean()
    loss.backward()


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def matmul_flops_per_second(size: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 matmul rate (square mm, same threads): the ceiling to compare with."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    return 2 * size**3 / statistics.median(timed(lambda: a @ b)[0] for _ in range(repeats))


def peak_rss_bytes(fn: Callable[[], None]) -> int:
    """Peak resident set size of this process while fn runs, minus the RSS before (Linux /proc)."""

    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


def labelled_point_ops() -> ops.PointOps:
    """The reference point ops, each inside a profiler range named after it."""

    def wrap(name: str) -> Callable:
        fn = getattr(ops.REFERENCE_OPS, name)

        def run(*args, **kwargs):
            with record_function(f"point_op::{name}"):
                return fn(*args, **kwargs)

        return run

    return ops.PointOps(**{name: wrap(name) for name in POINT_OPS})


def time_breakdown(fn: Callable[[], None]) -> dict[str, float]:
    """Seconds per group in one profiled step: point ops, matmuls, BN, gathers, other ops, and the
    rest of the wall time (Python and framework overhead outside any aten op)."""
    with ops.using_point_ops(labelled_point_ops()), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    groups = dict.fromkeys(
        (*POINT_OPS, "matmul/conv (convs, linear)", "batch norm", "gather/scatter", "other ops"), 0.0
    )
    for event in prof.events():
        owner, parent = None, event
        while parent is not None:
            if parent.name.startswith("point_op::"):
                owner = parent.name.split("::", 1)[1]
            parent = parent.cpu_parent
        seconds = event.self_cpu_time_total / 1e6
        if owner:
            groups[owner] += seconds
        elif event.name in MATMUL_OPS:
            groups["matmul/conv (convs, linear)"] += seconds
        elif event.name in NORM_OPS:
            groups["batch norm"] += seconds
        elif event.name in GATHER_OPS:
            groups["gather/scatter"] += seconds
        else:
            groups["other ops"] += seconds
    groups["python/framework (wall - ops)"] = max(0.0, wall - sum(groups.values()))
    groups["wall"] = wall
    return groups


def measure(variant: str, batch: int, points: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(variant, NUM_CLASSES).train()
    xyz = torch.randn(batch, points, 3) * torch.tensor([0.2, 0.5, 0.1])
    rgb = torch.rand(batch, points, 3) - 0.5
    labels = torch.arange(batch) // 2
    run = lambda: step(model, xyz, rgb, labels)  # noqa: E731
    peak = peak_rss_bytes(run)  # first step, also the warm-up
    with FlopCounterMode(display=False) as counter:
        run()
    flops = counter.get_total_flops()
    # The matmul rate is measured right after each step, so both see the same machine load.
    steps, cpu, shares, matmul = [], [], [], []
    for _ in range(repeats):
        wall, used = timed(run)
        rate = matmul_flops_per_second()
        steps.append(wall), cpu.append(used), matmul.append(rate), shares.append(flops / wall / rate)
    return {
        "variant": variant,
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": statistics.median(steps),
        "step_min_s": min(steps),
        "step_cpu_s": statistics.median(cpu),
        "flops": flops,
        "matmul_flops_per_s": statistics.median(matmul),
        "share": statistics.median(shares),
        "peak_rss_bytes": peak,
        "breakdown": time_breakdown(run),
    }


def machine() -> dict[str, str]:
    cpu = cpu_model()
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load average (1, 5, 15 min) at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def report(args: argparse.Namespace, results: list[dict], info: dict[str, str]) -> str:
    lines = [f"Command: `python benchmarks/model_step.py {' '.join(sys.argv[1:])}`", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", ""]
    lines += [
        f"Batch {args.batch} x {args.points} points, {NUM_CLASSES} classes, fp32, train mode. Step: median of"
        f" {args.repeats} steps (and the fastest); matmul rate: median of 2048^2 fp32 mm timed right after each"
        " step; share: median over steps of (FLOPs / step time) / that matmul rate. FLOPs: FlopCounterMode"
        " over one forward+backward. Peak RSS delta: /proc VmHWM during the first step minus the RSS"
        " before it (includes allocator caching).",
        "",
        "| variant | params | step (s) | fastest step (s) | process CPU s/step | GFLOP/step | achieved GFLOP/s "
        "| matmul GFLOP/s | share of matmul rate | peak RSS delta (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['params']:,} | {r['step_s']:.2f} | {r['step_min_s']:.2f} | {r['step_cpu_s']:.2f} "
            f"| {r['flops'] / 1e9:.1f} | {r['flops'] / r['step_s'] / 1e9:.1f} | {r['matmul_flops_per_s'] / 1e9:.1f} "
            f"| {r['share']:.0%} | {r['peak_rss_bytes'] / 2**20:.0f} |"
        )
    groups = [g for g in results[0]["breakdown"] if g != "wall"]
    lines += ["", "Where the time goes (one profiled step; share of its wall time):", ""]
    lines += ["| group | " + " | ".join(r["variant"] for r in results) + " |", "|---" * (len(results) + 1) + "|"]
    for g in groups:
        cells = [f"{r['breakdown'][g]:.2f} s ({r['breakdown'][g] / r['breakdown']['wall']:.0%})" for r in results]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines.append("| wall (profiled) | " + " | ".join(f"{r['breakdown']['wall']:.2f} s" for r in results) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--points", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one variant, print JSON
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.points, args.repeats)))
        return
    info = machine()
    results = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--one", variant, "--batch", str(args.batch), "--points", str(args.points)]
        cmd += ["--repeats", str(args.repeats)] + (["--threads", str(args.threads)] if args.threads else [])
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        results.append(json.loads(out.splitlines()[-1]))
    print(report(args, results, info))


if __name__ == "__main__":
    main()
