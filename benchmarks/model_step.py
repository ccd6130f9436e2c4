"""Training-step time of every OG-Net variant, ours (EdgeConv `fused`) against the original's algorithm
(`edge_tensor`), then FLOPs, peak memory and where the time goes.

    python benchmarks/model_step.py [--variants ognet ognet-deep] [--batch 8] [--points 4096] [--repeats 5]
        [--memory-batch 18]

A step is forward + cross-entropy + a circle-style term on the circle feature + backward + Adam
(amsgrad, weight decay: the original's optimizer). Per variant, one subprocess times both paths
interleaved (same weights, same input), so both see the same machine load; the speed-up is the median
of the per-repeat ratios. Peak memory: one step per (variant, path) in its own subprocess at
`--memory-batch` (the paper's batch 36 over 2 ranks = 18 per rank). Prints a Markdown report (see
benchmarks/results/model_step.md).
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

from common import commit, cpu_model, load_average

from ognet.model import VARIANTS, OGNet, build_model, ops  # noqa: E402

NUM_CLASSES = 751
POINT_OPS = ("knn", "farthest_point_sample", "ball_query")
MATMUL_OPS = (
    *("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    *("aten::convolution", "aten::_convolution", "aten::mkldnn_convolution", "aten::convolution_backward"),
)
NORM_OPS = ("aten::native_batch_norm", "aten::native_batch_norm_backward", "aten::_batch_norm_with_update")
GATHER_OPS = ("aten::gather", "aten::scatter_add_", "aten::index", "aten::index_select", "aten::index_add_")


PATHS = ("fused", "edge_tensor")  # ours, the original's algorithm


def make_step(model: OGNet, xyz: torch.Tensor, rgb: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """One training step: forward, loss, backward, Adam (amsgrad, coupled weight decay, as the original)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4, amsgrad=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(xyz, rgb)
        f = F.normalize(out.circle_feature, dim=1)
        loss = F.cross_entropy(out.logits, labels) + (f @ f.T).triu(1).square().mean()
        loss.backward()
        optimizer.step()

    return step


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


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


def inputs(batch: int, points: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    xyz = torch.randn(batch, points, 3) * torch.tensor([0.2, 0.5, 0.1])
    rgb = torch.rand(batch, points, 3) - 0.5
    return xyz, rgb, torch.arange(batch) // 2


def build(variant: str, path: str) -> OGNet:
    torch.manual_seed(0)  # same weights for every path
    return build_model(variant, NUM_CLASSES, edge_conv=path).train()


def measure(variant: str, batch: int, points: int, repeats: int) -> dict:
    """Both paths' steps timed interleaved (after a warm-up step each), FLOPs and a profile of ours."""
    xyz, rgb, labels = inputs(batch, points)
    steps = {path: make_step(build(variant, path), xyz, rgb, labels) for path in PATHS}
    flops = {}
    for path, run in steps.items():
        with FlopCounterMode(display=False) as counter:
            run()  # also the warm-up
        flops[path] = counter.get_total_flops()
    wall: dict[str, list[float]] = {path: [] for path in PATHS}
    cpu: dict[str, list[float]] = {path: [] for path in PATHS}
    for _ in range(repeats):
        for path, run in steps.items():
            w, c = timed(run)
            wall[path].append(w), cpu[path].append(c)
    ratios = [e / f for f, e in zip(wall["fused"], wall["edge_tensor"])]
    return {
        "variant": variant,
        "params": sum(p.numel() for p in build(variant, "fused").parameters()),
        "step_s": {p: statistics.median(v) for p, v in wall.items()},
        "step_min_s": {p: min(v) for p, v in wall.items()},
        "step_cpu_s": {p: statistics.median(v) for p, v in cpu.items()},
        "speedup": statistics.median(ratios),
        "flops": flops,
        "breakdown": time_breakdown(steps["fused"]),
    }


def measure_memory(variant: str, path: str, batch: int, points: int) -> dict:
    """Peak RSS delta of one training step (the first: optimizer state included)."""
    xyz, rgb, labels = inputs(batch, points)
    run = make_step(build(variant, path), xyz, rgb, labels)
    return {"variant": variant, "path": path, "peak_rss_bytes": peak_rss_bytes(run)}


def machine() -> dict[str, str]:
    return {
        "commit": commit(),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load average (1, 5, 15 min) at start": load_average(),
    }


def report(args: argparse.Namespace, results: list[dict], memory: list[dict], info: dict[str, str]) -> str:
    lines = [f"Command: `python benchmarks/model_step.py {' '.join(sys.argv[1:])}`", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [f"- load average at end: {load_average()}", ""]
    lines += [
        f"Training step (forward, loss, backward, Adam) at batch {args.batch} x {args.points} points,"
        f" {NUM_CLASSES} classes, fp32. Both paths timed interleaved, {args.repeats} repeats after a warm-up;"
        " step: median (fastest); speed-up: median of the per-repeat ratios. FLOPs: FlopCounterMode over one"
        " step of the algorithm run (matmuls and convolutions, the kNN's included).",
        "",
        "| variant | params | step, fused (s) | step, edge tensor (s) | speed-up | CPU s/step fused / edge "
        "| GFLOP/step fused / edge |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t, m, c, f = r["step_s"], r["step_min_s"], r["step_cpu_s"], r["flops"]
        lines.append(
            f"| {r['variant']} | {r['params']:,} | {t['fused']:.2f} ({m['fused']:.2f}) "
            f"| {t['edge_tensor']:.2f} ({m['edge_tensor']:.2f}) | **{r['speedup']:.2f}x** "
            f"| {c['fused']:.2f} / {c['edge_tensor']:.2f} | {f['fused'] / 1e9:.1f} / {f['edge_tensor'] / 1e9:.1f} |"
        )
    if memory:
        lines += [
            "",
            f"Peak memory of one training step at batch {args.memory_batch} x {args.points} points (Linux /proc"
            " VmHWM during the step minus the RSS before it; includes allocator caching), each in its own process:",
            "",
            "| variant | fused (MiB) | edge tensor (MiB) | ratio |",
            "|---|---|---|---|",
        ]
        for variant in dict.fromkeys(m["variant"] for m in memory):
            peak = {m["path"]: m["peak_rss_bytes"] / 2**20 for m in memory if m["variant"] == variant}
            lines.append(
                f"| {variant} | {peak['fused']:.0f} | {peak['edge_tensor']:.0f} | {peak['edge_tensor'] / peak['fused']:.2f}x |"
            )
    groups = [g for g in results[0]["breakdown"] if g != "wall"]
    lines += ["", "Where the time of a fused step goes (one profiled step; share of its wall time):", ""]
    lines += ["| group | " + " | ".join(r["variant"] for r in results) + " |", "|---" * (len(results) + 1) + "|"]
    for g in groups:
        cells = [f"{r['breakdown'][g]:.2f} s ({r['breakdown'][g] / r['breakdown']['wall']:.0%})" for r in results]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines.append("| wall (profiled) | " + " | ".join(f"{r['breakdown']['wall']:.2f} s" for r in results) + " |")
    return "\n".join(lines)


def subprocess_json(args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--points", str(args.points), "--repeats", str(args.repeats), *extra]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--points", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-batch", type=int, default=18, help="batch of the peak-memory step (0: skip)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one variant, print JSON
    parser.add_argument("--memory-of", nargs=2, help=argparse.SUPPRESS)  # internal: variant path
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.points, args.repeats)))
        return
    if args.memory_of:
        print(json.dumps(measure_memory(*args.memory_of, args.memory_batch, args.points)))
        return
    info = machine()
    results = [subprocess_json(args, "--one", v, "--batch", str(args.batch)) for v in args.variants]
    memory = []
    if args.memory_batch:
        for variant in args.variants:
            for path in PATHS:
                memory.append(
                    subprocess_json(args, "--memory-of", variant, path, "--memory-batch", str(args.memory_batch))
                )
    print(report(args, results, memory, info))


if __name__ == "__main__":
    main()
