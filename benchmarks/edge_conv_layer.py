"""One EdgeConv layer (conv, BatchNorm2d, max/mean pooling, LeakyReLU), forward + backward, per path.

    python benchmarks/edge_conv_layer.py [--batch 4] [--shapes 3:64:4096 64:128:768] [--k 20] [--repeats 5] [--compile]
        [--other-tree DIR]

Paths: `edge_tensor` (the original's), `gather`, `fused` (ognet/model/edgeconv.py); `--compile` adds
each under torch.compile. Timed interleaved with 1 thread; process CPU time (steadier than wall time
on a shared machine), median of the repeats after one warm-up (which also compiles). Also counts
each path's kernel-running ops of one forward + backward as benchmarks/step_budget.py does (as on
a GPU; the loss's own 4 included).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_budget import count_events  # noqa: E402  (benchmarks/ is on the path: this script's folder)

from ognet.model import edgeconv  # noqa: E402
from ognet.model.blocks import MaxMeanPool, PointwiseConv, edge_features  # noqa: E402
from ognet.model.edgeconv import edge_conv_gathered, edge_conv_pooled  # noqa: E402
from ognet.model.ops import knn  # noqa: E402


def layer_paths(
    c_in: int, c_out: int, other: Path | None = None
) -> tuple[dict[str, Callable[[Tensor, Tensor], Tensor]], list[Tensor]]:
    """Each path's layer function (with `other`, also that tree's fused path), and the parameters they share."""
    torch.manual_seed(0)
    conv, bn, pool = PointwiseConv(2 * c_in, c_out), nn.BatchNorm2d(c_out), MaxMeanPool()
    paths = {
        "edge_tensor": lambda h, idx: F.leaky_relu(pool(bn(conv(edge_features(h, idx)))), 0.2),
        "gather": lambda h, idx: F.leaky_relu(pool(bn(edge_conv_gathered(conv, h, idx))), 0.2),
        "fused": lambda h, idx: F.leaky_relu(edge_conv_pooled(conv, bn, pool, h, idx, norm_after_pool=False), 0.2),
    }
    if other is not None:  # its model/edgeconv.py on this tree's ognet (same signature as ours)
        spec = importlib.util.spec_from_file_location("other_edgeconv", other / "ognet" / "model" / "edgeconv.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        paths[f"fused @ {other.name}"] = lambda h, idx: F.leaky_relu(
            module.edge_conv_pooled(conv, bn, pool, h, idx, norm_after_pool=False), 0.2
        )
    return paths, [*conv.parameters(), *bn.parameters(), *pool.parameters()]


def step_seconds(fn: Callable[[Tensor, Tensor], Tensor], h: Tensor, idx: Tensor, weights: Tensor) -> float:
    """Process CPU seconds of one forward + backward."""
    start = time.process_time()
    (fn(h, idx) * weights).sum().backward()
    return time.process_time() - start


def kernel_ops(fn: Callable[[Tensor, Tensor], Tensor], h: Tensor, idx: Tensor, weights: Tensor, params: list) -> int:
    """Top-level ops that run a kernel (step_budget.py's count) in one forward + backward, gradients unset."""
    for p in (h, *params):
        p.grad = None
    edgeconv.COUNT_AS_ON_ACCELERATORS = True  # as step_budget.py: the ops a GPU run launches
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            (fn(h, idx) * weights).sum().backward()
    finally:
        edgeconv.COUNT_AS_ON_ACCELERATORS = False
    return count_events(prof)["kernel_ops"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--shapes", nargs="+", default=["3:64:4096", "64:128:768"], help="C_in:C_out:points")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also each path under torch.compile")
    parser.add_argument("--other-tree", type=Path, help="also the fused path of this checkout (a baseline)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"Command: `python benchmarks/edge_conv_layer.py {' '.join(sys.argv[1:])}`\n")
    print("| C in -> out, points | path | ms (process CPU, fwd+bwd) | vs edge_tensor | kernel ops (fwd+bwd) |")
    print("|---|---|---|---|---|")
    for shape in args.shapes:
        c_in, c_out, n = (int(x) for x in shape.split(":"))
        paths, params = layer_paths(c_in, c_out, args.other_tree)
        if args.compile:
            paths.update({f"{name} (compiled)": torch.compile(fn) for name, fn in list(paths.items())})
        h = torch.randn(args.batch, c_in, n, requires_grad=True)
        idx = knn(torch.randn(args.batch, 3, n), args.k)
        weights = torch.randn(args.batch, c_out, n)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for fn in paths.values():
            step_seconds(fn, h, idx, weights)  # warm-up (and compilation)
        for _ in range(args.repeats):
            for name, fn in paths.items():
                times[name].append(step_seconds(fn, h, idx, weights))
        base = statistics.median(times["edge_tensor"])
        for name, values in times.items():
            median = statistics.median(values)
            ops = kernel_ops(paths[name], h, idx, weights, params)
            print(f"| {c_in} -> {c_out}, {n} | {name} | {median * 1e3:.0f} | {base / median:.2f}x | {ops} |")


if __name__ == "__main__":
    main()
