"""Training throughput with 1 rank and with 2 ranks (one thread each), same global batch, one run.

    python benchmarks/train_throughput.py [--points 2048] [--steps 12] [--repeats 3] [--out FILE.md]

Synthesises and packs the demo data set once (in a temporary folder), then for each world size
runs `torchrun --nproc_per_node=W launch/train.py` on configs/demo.yaml for one epoch of
`--steps` steps and reads the per-step samples/s that rank 0 logged to TensorBoard, skipping the
first logged step (start-up). Reports the median over repeats and the scaling efficiency
(2-rank throughput / (2 x 1-rank throughput)).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import load_average, provenance
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def prepare(base: Path, points: int) -> Path:
    subprocess.run(
        [BIN / "ognet-synth", "--out", base / "raw", "--preset", "small", "--points", str(points), "--no-progress"],
        check=True,
    )
    subprocess.run(
        [BIN / "ognet-pack", base / "raw", base / "shards", "--max-count", "64"], check=True, capture_output=True
    )
    return base / "shards"


def run(shards: Path, run_dir: Path, world: int, steps: int, batch: int, workers: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        BIN / "torchrun",
        "--standalone",
        f"--nproc_per_node={world}",
        REPO / "launch" / "train.py",
        "--config",
        REPO / "configs" / "demo.yaml",
        f"data.root={shards}",
        f"run_dir={run_dir}",
        "train.epochs=1",
        f"train.max_steps_per_epoch={steps}",
        f"train.global_batch_size={batch}",
        "train.log_every_steps=1",
        f"data.num_workers={workers}",
        "eval.rank_list_queries=0",
    ]
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True, env=env)
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    # logged every step, so each value is one step's time (the log window); the first is start-up
    times = [e.value for e in sorted(events.Scalars("train/step_time_s"), key=lambda e: e.step)]
    return batch / statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=2048, help="points per synthetic cloud (slim keeps half)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=16, help="global batch size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="DataLoader workers per rank; 0 (default) keeps each rank to one process and one thread",
    )
    p.add_argument("--out", type=Path, help="write the results (markdown) here")
    args = p.parse_args()
    load_at_start = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        shards = prepare(Path(tmp), args.points)
        rates = {1: [], 2: []}
        for r in range(args.repeats):
            for world in (1, 2):
                rates[world].append(
                    run(shards, Path(tmp) / f"run-{world}-{r}", world, args.steps, args.batch, args.workers)
                )
                print(f"repeat {r} world {world}: {rates[world][-1]:.2f} samples/s", flush=True)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    lines = [
        *provenance("Training throughput: 1 rank vs 2 ranks (DDP, gloo, CPU)"),
        f"- load average (1, 5, 15 min) at start: {load_at_start}; at end: {load_average()}",
        f"- configs/demo.yaml on the synthetic `small` set, {args.points} points per cloud (slim keeps half), "
        f"global batch {args.batch}, {args.steps} steps, DataLoader workers per rank {args.workers}, "
        "OMP_NUM_THREADS=1 per rank; samples/s from the per-step times rank 0 logged, first step excluded",
        "",
        "| ranks | samples/s (median) | repeats |",
        "|---|---|---|",
        *(f"| {w} | {statistics.median(r):.2f} | {', '.join(f'{x:.2f}' for x in r)} |" for w, r in rates.items()),
        "",
        f"Speed-up **{two / one:.2f}x**, scaling efficiency {two / one / 2:.0%}.",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
