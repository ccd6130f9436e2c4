"""Training throughput with 1 rank and with 2 ranks (one thread each), same global batch, one run;
optionally against another code tree (an older commit) in the same, interleaved run.

    python benchmarks/train_throughput.py [--points 2048] [--steps 12] [--repeats 3] [--out FILE.md]
        [--baseline TREE [--baseline-name NAME]] [--set key=value ...] [--also-set key=value ...]

Synthesises and packs the demo data set once (in a temporary folder), then for each repeat, world
size and code tree runs `torchrun --nproc_per_node=W TREE/launch/train.py` on configs/demo.yaml for
one epoch of `--steps` steps, logging every step. A step's time is the wall-clock gap between
consecutive `train/loss` events that rank 0 wrote to TensorBoard: the same measure for any tree,
whatever its timing tags mean (before the Trainer, `train/step_time_s` was an epoch average). The
first gap (start-up) is skipped; samples/s = global batch / median step time. Reports the median
over repeats, the scaling efficiency (2-rank throughput / (2 x 1-rank throughput)) and, with
`--baseline`, the ratio of this tree to the baseline at each world size. `--also-set` adds this tree
once more with extra overrides (e.g. the options newer than the baseline turned off, so that both
trees compute the same thing).

A baseline tree: `git worktree add /tmp/before <commit>` (run with this tree's Python environment).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, commit, load_average, provenance
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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


def run(tree: Path, extra: list[str], shards: Path, run_dir: Path, world: int, args: argparse.Namespace) -> float:
    """samples/s of one training run of `tree`'s code with the overrides `extra`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    cmd = [
        BIN / "torchrun",
        "--standalone",
        f"--nproc_per_node={world}",
        tree / "launch" / "train.py",
        "--config",
        tree / "configs" / "demo.yaml",
        f"data.root={shards}",
        f"run_dir={run_dir}",
        "train.epochs=1",
        f"train.max_steps_per_epoch={args.steps}",
        f"train.global_batch_size={args.batch}",
        "train.log_every_steps=1",
        f"data.num_workers={args.workers}",
        "eval.rank_list_queries=0",
        *args.set,
        *extra,
    ]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    stamps = [e.wall_time for e in sorted(events.Scalars("train/loss"), key=lambda e: e.step)]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return args.batch / statistics.median(gaps[1:])


def table(rates: dict[tuple[str, int], list[float]]) -> list[str]:
    rows = ["| code | ranks | samples/s (median) | repeats |", "|---|---|---|---|"]
    for (name, world), r in rates.items():
        rows.append(f"| {name} | {world} | {statistics.median(r):.2f} | {', '.join(f'{x:.2f}' for x in r)} |")
    return rows


def summary(rates: dict[tuple[str, int], list[float]], names: list[str]) -> list[str]:
    median = {key: statistics.median(r) for key, r in rates.items()}
    lines = []
    for name in names:
        two = median[name, 2] / median[name, 1]
        lines.append(f"- {name}: 2 ranks / 1 rank **{two:.2f}x**, scaling efficiency {two / 2:.0%}")
    baseline = names[-1]
    for name in names[:-1] if len(names) > 1 else []:
        for world in (1, 2):
            ratio = median[name, world] / median[baseline, world]
            lines.append(f"- {world} rank(s): {name} / {baseline} = **{ratio:.2f}x**")
    return lines


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
    p.add_argument("--baseline", type=Path, help="another code tree (e.g. a git worktree of an older commit)")
    p.add_argument("--baseline-name", default="baseline")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="config overrides for every run")
    p.add_argument(
        "--also-set", nargs="*", default=[], metavar="key=value", help="run this tree also with these overrides"
    )
    p.add_argument("--out", type=Path, help="write the results (markdown) here")
    args = p.parse_args()
    trees = {"this tree": (ROOT, [])}
    if args.also_set:
        trees[f"this tree, {' '.join(args.also_set)}"] = (ROOT, args.also_set)
    if args.baseline:
        trees[args.baseline_name] = (args.baseline.resolve(), [])
    load_at_start = load_average()
    rates: dict[tuple[str, int], list[float]] = {(name, w): [] for name in trees for w in (1, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        shards = prepare(Path(tmp), args.points)
        for r in range(args.repeats):
            for world in (1, 2):
                for i, (name, (tree, extra)) in enumerate(trees.items()):
                    rate = run(tree, extra, shards, Path(tmp) / f"run-{r}-{world}-{i}", world, args)
                    rates[name, world].append(rate)
                    print(f"repeat {r} world {world} {name}: {rate:.2f} samples/s", flush=True)
    lines = [
        *provenance("Training throughput: 1 rank vs 2 ranks (DDP, gloo, CPU)"),
        f"- load average (1, 5, 15 min) at start: {load_at_start}; at end: {load_average()}",
        f"- configs/demo.yaml on the synthetic `small` set, {args.points} points per cloud (slim keeps half), "
        f"global batch {args.batch}, {args.steps} steps, DataLoader workers per rank {args.workers}, "
        "OMP_NUM_THREADS=1 per rank; step time = gap between rank 0's consecutive per-step loss events, "
        "first gap excluded; runs interleaved",
        *([f"- {args.baseline_name}: {args.baseline}, commit {commit(args.baseline)}"] if args.baseline else []),
        "",
        *table(rates),
        "",
        *summary(rates, list(trees)),
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
