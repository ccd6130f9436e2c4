"""Per-step cost of synchronised BatchNorm against per-rank BatchNorm on 2 gloo ranks.

    python benchmarks/syncbn_cost.py [--variant ognet-small] [--batch 16] [--points 1024] [--steps 6] [--repeats 5]

Started plainly, it re-runs itself under `torchrun --nproc_per_node=2` (one thread per rank). Each
rank builds the same OG-Net twice, one with train.sync_bn=false (per-rank statistics, DDP broadcasts
rank 0's before each forward) and one with train.sync_bn=true (ognet.dist.SyncBatchNorm, no
broadcast), each behind the trainer's DDP engine, and times `--steps` training steps (forward,
loss, backward, Adam) of each in turn, per repeat, on the same random batch: both see the same
load. A third set-up, synchronised with EdgeConv's `gather` path, is the model as it ran before the
fused path restated synchronised BatchNorm. Reports the median time per step of each, the ratios, the number of BatchNorm layers and the
median of one gloo all-reduce of a BatchNorm's 2C+1 float64 statistics, and the time of one
BatchNorm2d layer's forward + backward alone, per-rank and synchronised (its two all-reduces included).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ognet import dist
from ognet.config import load_config
from ognet.losses import ReidLoss
from ognet.model import build_model
from ognet.train.engine import DDPEngine


def timed_steps(engine: DDPEngine, batch: tuple, steps: int) -> float:
    """Seconds per training step (forward, loss, backward, step), after the ranks meet."""
    loss_fn, hold = ReidLoss(circle=True, gamma=64.0), torch.zeros((), dtype=torch.bool)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        out = engine.model(batch[0], batch[1])
        engine.backward_and_step(loss_fn(out.logits, batch[2], out.circle_feature).loss, 1.0, hold)
    dist.barrier()
    return (time.perf_counter() - start) / steps


def layer_seconds(norm: torch.nn.Module, shape: tuple[int, ...], repeats: int = 10) -> float:
    """Median seconds of one BatchNorm2d forward + backward on this rank's (B/2, C, N, k) input."""
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        norm(x).backward(dy)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def all_reduce_seconds(channels: int, repeats: int = 200) -> float:
    x = torch.zeros(2 * channels + 1, dtype=torch.float64)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.distributed.all_reduce(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layers() -> dict[bool, torch.nn.Module]:
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(64)
    return {False: plain, True: dist.convert_sync_batchnorm(copy.deepcopy(plain))}


# name: (train.sync_bn, model.edge_conv)
SETUPS = {"per-rank": (False, "fused"), "synchronised": (True, "fused"), "synchronised, gather": (True, "gather")}


def measure(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    info = dist.init_distributed()
    engines = {}
    for name, (sync_bn, edge_conv) in SETUPS.items():
        config = load_config(None, [f"train.sync_bn={str(sync_bn).lower()}"])
        torch.manual_seed(0)
        model = build_model(args.variant, 16, init_points=args.points // 4, edge_conv=edge_conv)
        model = dist.convert_sync_batchnorm(model) if sync_bn else model
        engines[name] = DDPEngine(model.train(), config, info)
    norms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    g = torch.Generator().manual_seed(info.rank)
    local = args.batch // info.world_size
    batch = (torch.randn(local, args.points, 3, generator=g), torch.rand(local, args.points, 3, generator=g) - 0.5)
    batch += (torch.randint(0, 16, (local,), generator=g),)
    for engine in engines.values():
        timed_steps(engine, batch, 1)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in SETUPS}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            times[name].append(timed_steps(engine, batch, args.steps))
    reduce_s = all_reduce_seconds(64)
    shape = (local, 64, args.points // 4, 16)  # (B/2, C, points, neighbours), the size of an EdgeConv BatchNorm2d
    layer = {sync_bn: layer_seconds(norm, shape) for sync_bn, norm in layers().items()}
    if info.is_main:
        median = {name: statistics.median(t) for name, t in times.items()}
        print(
            f"{args.variant}, global batch {args.batch} x {args.points} points, 2 gloo ranks, {norms} BatchNorm layers"
        )
        for name, (sync_bn, edge_conv) in SETUPS.items():
            print(
                f"{name} (sync_bn={str(sync_bn).lower()}, edge_conv={edge_conv}): {median[name] * 1e3:.0f} ms/step  "
                f"{[round(t * 1e3) for t in times[name]]}"
            )
        plain, synced, gather = median["per-rank"], median["synchronised"], median["synchronised, gather"]
        print(f"ratio synced / per-rank: {synced / plain:.3f}  (difference {(synced - plain) * 1e3:+.1f} ms/step)")
        print(f"ratio synced with gather / synced (fused): {gather / synced:.3f}")
        print(f"one gloo all-reduce of 129 float64 (C=64): {reduce_s * 1e6:.0f} us median of 200")
        print(
            f"one BatchNorm2d forward + backward on {shape}: per-rank {layer[False] * 1e3:.1f} ms, "
            f"synchronised {layer[True] * 1e3:.1f} ms (ratio {layer[True] / layer[False]:.2f}), median of 10"
        )
    dist.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="ognet-small")
    parser.add_argument("--batch", type=int, default=16, help="global batch (split over the 2 ranks)")
    parser.add_argument("--points", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6, help="steps timed per repeat and set-up")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if "RANK" in os.environ:
        measure(args)
        return
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", __file__, *sys.argv[1:]], check=True, env=env)


if __name__ == "__main__":
    main()
