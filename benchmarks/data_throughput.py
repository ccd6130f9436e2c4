"""Data throughput per worker: the shard reader against reading the same samples from `.obj` files.

    python benchmarks/data_throughput.py [--samples 200] [--repeats 5] [--out benchmarks/results/data_throughput.md]

One worker is one process: everything runs in this process, one sample after another, so the
figures are samples/s per DataLoader worker. A synthetic data set of 8192-point persons (the
original's size) is generated and packed into a temporary folder; then every path reads the same
samples, with the same training transform drawn from the same generators (seeded by sample
position and index, as `TrainSet` does):

- obj: `ognet.data.points.read_points` per file (returns what open3d 0.9, the original's reader,
  returned); also open3d 0.20's `read_triangle_mesh`, which keeps only the 3 vertices of the one
  face line, timed on its own;
- shards, random access: `ShardReader[i]` in a random order;
- shards, sequential: `stream_split` (webdataset);
- the same with uint8 colours.

Each figure is the median over `--repeats` passes, the paths taking turns pass by pass (after one
warm-up pass each; files are in the page cache), as samples per CPU-second of this process and per
wall-clock second. Prints a Markdown report and writes it to `--out`;
benchmarks/results/data_throughput.md is one such report with a written analysis appended.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import load_average, provenance

from ognet.data import synth  # noqa: E402
from ognet.data.layouts import scan_split  # noqa: E402
from ognet.data.pack import PackOptions, pack_dataset  # noqa: E402
from ognet.data.points import read_points  # noqa: E402
from ognet.data.shards import ShardReader, read_npy, read_tar_members, stream_split  # noqa: E402
from ognet.data.transforms import TransformConfig, transform  # noqa: E402

SEED = 0
CONFIG = TransformConfig()  # the original's training transform: flip, slim 0.5, scale + jitter


def train_rng(position: int, index: int) -> np.random.Generator:
    return np.random.default_rng([SEED, 0, position, index])  # as TrainSet: (seed, epoch, position, index)


def interleaved_rates(runs: dict[str, Callable[[], int]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """samples/s of each run (which returns how many samples it handled), `repeats` times each,
    by CPU time of this process and by wall clock.

    Rounds are interleaved (every path once per round, after one warm-up pass each), so that load
    from other processes falls on all paths alike. CPU time is what a worker costs when other
    processes share the cores: it does not count the time the scheduler gives to them.
    """
    for run in runs.values():
        run()
    rates: dict[str, dict[str, list[float]]] = {name: {"cpu": [], "wall": []} for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            n = run()
            rates[name]["cpu"].append(n / (time.process_time() - cpu))
            rates[name]["wall"].append(n / (time.perf_counter() - wall))
    return rates


# ------------------------------------------------------------------------------------------------
# The paths


def obj_pass(paths: list[Path], with_transform: bool) -> Callable[[], int]:
    def run() -> int:
        for position, path in enumerate(paths):
            cloud = read_points(path)
            if with_transform:
                transform(cloud.xyz, cloud.rgb, CONFIG, train_rng(position, position))
        return len(paths)

    return run


def open3d_pass(paths: list[Path], clouds: list | None) -> Callable[[], int]:
    """open3d's reader; with `clouds`, plus the transform of the correctly parsed arrays (a proxy
    for the original's path: open3d 0.9's C++ reader kept every vertex, 0.20's keeps 3)."""
    import open3d as o3d

    def run() -> int:
        for position, path in enumerate(paths):
            mesh = o3d.io.read_triangle_mesh(str(path))
            np.asarray(mesh.vertices), np.asarray(mesh.vertex_colors)
            if clouds is not None:
                transform(clouds[position].xyz, clouds[position].rgb, CONFIG, train_rng(position, position))
        return len(paths)

    return run


def reader_pass(reader: ShardReader, order: np.ndarray, with_transform: bool) -> Callable[[], int]:
    def run() -> int:
        for position, index in enumerate(order):
            sample = reader[int(index)]
            if with_transform:
                transform(sample.xyz, sample.rgb, CONFIG, train_rng(position, sample.index))
        return len(order)

    return run


def stream_pass(location: Path, with_transform: bool) -> Callable[[], int]:
    def run() -> int:
        n = 0
        for position, sample in enumerate(stream_split(location)):
            if with_transform:
                transform(sample.xyz, sample.rgb, CONFIG, train_rng(position, sample.index))
            n += 1
        return n

    return run


def transform_pass(samples: list) -> Callable[[], int]:
    def run() -> int:
        for position, s in enumerate(samples):
            transform(s.xyz, s.rgb, CONFIG, train_rng(position, position))
        return len(samples)

    return run


# ------------------------------------------------------------------------------------------------
# Where the time goes: per-sample cost of each step of the two readers


def seconds_per_item(step: Callable, items: Iterable, repeats: int) -> float:
    """Median CPU seconds of `step` per item over `repeats` passes (after a warm-up pass)."""
    items = list(items)
    times = []
    for _ in range(repeats + 1):
        start = time.process_time()
        for item in items:
            step(item)
        times.append((time.process_time() - start) / len(items))
    return statistics.median(times[1:])


def breakdown(reader: ShardReader, paths: list[Path], repeats: int) -> list[tuple[str, float]]:
    index = reader.index
    shard_files = [open(reader.shard_path(s), "rb") for s in range(len(index.shards))]  # noqa: SIM115

    def read_bytes(i: int) -> bytes:
        offset, length, _ = (int(v) for v in index.locations[i])
        f = shard_files[int(index.shard_ids[i])]
        f.seek(offset)
        return f.read(length)

    raw = [read_bytes(i) for i in range(len(index))]
    members = [dict(read_tar_members(b, "")) for b in raw]
    texts = [p.read_bytes() for p in paths]
    samples = [reader[i] for i in range(len(index))]
    return [
        ("shard: seek + read the sample's bytes", seconds_per_item(read_bytes, range(len(index)), repeats)),
        ("shard: crc32 of the sample's bytes", seconds_per_item(zlib.crc32, raw, repeats)),
        ("shard: parse the 3 tar members", seconds_per_item(lambda b: list(read_tar_members(b, "")), raw, repeats)),
        (
            "shard: decode 2 .npy + json",
            seconds_per_item(
                lambda m: [read_npy(v) if k.endswith(".npy") else json.loads(v) for k, v in m.items()], members, repeats
            ),
        ),
        ("shard: whole `ShardReader[i]`", seconds_per_item(reader.__getitem__, range(len(index)), repeats)),
        (".obj: read the file's bytes", seconds_per_item(lambda p: p.read_bytes(), paths, repeats)),
        (".obj: whole `read_points`", seconds_per_item(read_points, paths, repeats)),
        (
            ".obj: of which parsing text (from bytes in memory)",
            seconds_per_item(
                lambda t: np.array(
                    b" ".join(line[2:] for line in t.splitlines() if line.startswith(b"v ")).split()
                ).astype(np.float64),
                texts,
                repeats,
            ),
        ),
        (
            "transform, training (flip, slim, scale + jitter)",
            seconds_per_item(lambda s: transform(s.xyz, s.rgb, CONFIG, train_rng(0, s.index)), samples, repeats),
        ),
        (
            "transform, test time (slim)",
            seconds_per_item(lambda s: transform(s.xyz, s.rgb, CONFIG, None), samples, repeats),
        ),
    ]


# ------------------------------------------------------------------------------------------------


def make_data(work: Path, samples: int, workers: int) -> tuple[Path, Path, Path]:
    config = dataclasses.replace(
        synth.PRESETS["small"],
        train_ids=min(30, samples // 2),
        train_images=samples,
        test_ids=1,
        query_images=1,
        gallery_images=2,
        distractors=0,
        junk=0,
    )
    root = work / "data"
    synth.generate_dataset(root, config, workers=workers, progress=False)
    options = PackOptions(max_count=100, workers=workers, progress=False)
    pack_dataset(root, work / "float32", ["train_all"], options)
    pack_dataset(root, work / "uint8", ["train_all"], dataclasses.replace(options, colors="uint8"))
    return root, work / "float32" / "train_all", work / "uint8" / "train_all"


def machine() -> dict[str, str]:
    import open3d
    import webdataset

    return {
        "load average (1, 5, 15 min) at start": load_average(),
        "cores (os.cpu_count / usable by this process)": f"{os.cpu_count()} / {len(os.sched_getaffinity(0))}",
        "python / numpy / webdataset / open3d": f"{platform.python_version()} / {np.__version__} / "
        f"{webdataset.__version__} / {open3d.__version__}",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=200, help="8192-point samples (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per path; the median is reported")
    p.add_argument("--workers", type=int, default=2, help="processes for generating and packing (not timed)")
    p.add_argument("--workdir", type=Path, default=None, help="where the data goes (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    args = p.parse_args()
    info = machine()

    with tempfile.TemporaryDirectory(prefix="ognet-bench-") as tmp:
        work = args.workdir or Path(tmp)
        start = time.perf_counter()
        root, float_shards, uint8_shards = make_data(work, args.samples, args.workers)
        prepare = time.perf_counter() - start
        paths = [root / s.path for s in scan_split(root, "train_all")]
        reader, reader8 = ShardReader(float_shards), ShardReader(uint8_shards)
        assert len(reader) == len(paths) == args.samples
        order = np.random.default_rng(SEED).permutation(len(reader))
        clouds = [read_points(p) for p in paths]
        for i in order[:5]:  # both paths read the same samples
            assert np.array_equal(reader[int(i)].xyz, clouds[i].xyz) and np.array_equal(
                reader[int(i)].rgb, clouds[i].rgb
            )

        rates = interleaved_rates(
            {
                "obj + transform (baseline)": obj_pass(paths, True),
                "obj, no transform": obj_pass(paths, False),
                "open3d read_triangle_mesh, no transform (3 points!)": open3d_pass(paths, None),
                "open3d read_triangle_mesh + transform of the parsed arrays": open3d_pass(paths, clouds),
                "ShardReader random + transform": reader_pass(reader, order, True),
                "ShardReader random, no transform": reader_pass(reader, order, False),
                "stream_split sequential + transform": stream_pass(float_shards, True),
                "stream_split sequential, no transform": stream_pass(float_shards, False),
                "ShardReader random + transform, uint8 colours": reader_pass(reader8, order, True),
                "ShardReader random, no transform, uint8 colours": reader_pass(reader8, order, False),
                "transform alone (arrays in memory)": transform_pass(clouds),
            },
            args.repeats,
        )
        rows = {
            name: {clock: statistics.median(r[clock]) for clock in r} | {"cpu passes": r["cpu"]}
            for name, r in rates.items()
        }
        steps = breakdown(reader, paths, args.repeats)
        sizes = {
            name: sum(f.stat().st_size for f in folder.glob("*.tar"))
            for name, folder in (("float32", float_shards), ("uint8", uint8_shards))
        }
        obj_bytes = sum(p.stat().st_size for p in paths)

    text = report(args, info, rows, steps, prepare, sizes, obj_bytes)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


def report(
    args: argparse.Namespace,
    info: dict[str, str],
    rows: dict[str, dict],
    steps: list[tuple[str, float]],
    prepare: float,
    sizes: dict[str, int],
    obj_bytes: int,
) -> str:
    def ratio(name: str, base: str, clock: str) -> str:
        return f"{rows[name][clock] / rows[base][clock]:.1f}x"

    def baseline(name: str, o3d: bool) -> str:
        transformed = "+ transform" in name
        if o3d:
            return (
                "open3d read_triangle_mesh + transform of the parsed arrays"
                if transformed
                else "open3d read_triangle_mesh, no transform (3 points!)"
            )
        return "obj + transform (baseline)" if transformed else "obj, no transform"

    lines = provenance("Data throughput per worker: shards against .obj files")
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [
        f"- load average at end: {load_average()}",
        f"- {args.samples} synthetic samples of 8192 points, train_all; median of {args.repeats} interleaved "
        f"passes after a warm-up; data generated and packed in {prepare:.0f} s (not timed below)",
        f"- sizes: .obj {obj_bytes / args.samples / 1e3:.0f} kB/sample, shards float32 "
        f"{sizes['float32'] / args.samples / 1e3:.0f} kB/sample, uint8 {sizes['uint8'] / args.samples / 1e3:.0f} kB/sample",
        "- samples/s by CPU time of the process (what one worker does per core-second) and by wall clock",
        "",
        "| path | samples/s, CPU | samples/s, wall | CPU passes | vs .obj, CPU (wall) | vs open3d read, CPU |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for name, row in rows.items():
        ours = name.startswith(("ShardReader", "stream", "obj"))
        vs_obj = (
            f"{ratio(name, baseline(name, False), 'cpu')} ({ratio(name, baseline(name, False), 'wall')})"
            if ours
            else ""
        )
        vs_o3d = ratio(name, baseline(name, True), "cpu") if name.startswith(("ShardReader", "stream")) else ""
        passes = ", ".join(f"{x:,.0f}" for x in row["cpu passes"])
        lines.append(f"| {name} | {row['cpu']:,.0f} | {row['wall']:,.0f} | {passes} | {vs_obj} | {vs_o3d} |")
    lines += ["", "Where the time goes (median CPU time per sample):", "", "| step | time per sample |", "|---|---:|"]
    lines += [f"| {name} | {seconds * 1e6:,.0f} µs |" for name, seconds in steps]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
