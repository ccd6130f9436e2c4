"""Pack a data set folder into webdataset shards (`ognet-pack`) and verify them (`ognet-verify`).

Each split is planned first (sorted sample list, fixed shard boundaries), then shards are written
in parallel, each atomically with a small manifest beside it, so an interrupted run resumes by
skipping the shards whose manifests match the plan (and removing the temporary files of writes
that were killed). The index is written last: a split whose `index.json` exists is complete. A full
disk stops packing with a `DiskFullError` naming the file; the shards already written stay valid.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ognet.data import layouts
from ognet.data.points import read_points
from ognet.data.shards import INDEX_NAME, ShardIndex, encode_sample, load_index, shard_name, write_shard
from ognet.errors import DataError, OgnetError, ShardError
from ognet.io import atomic_write, remove_partials

PARTS_DIR = ".parts"


@dataclass(frozen=True)
class PackOptions:
    max_count: int = 1000  # samples per shard
    max_bytes: int | None = None  # approximate bytes per shard (estimated from the first sample)
    colors: str = "float32"  # "uint8" quantises colours to k/255 (error <= 0.5/255)
    workers: int = max(1, os.cpu_count() or 1)
    naming: str | None = None  # None: detect from the file names
    progress: bool = True


def pack_dataset(
    root: str | os.PathLike,
    out: str | os.PathLike,
    splits: Sequence[str] | None = None,
    options: PackOptions = PackOptions(),
) -> dict[str, ShardIndex]:
    """Pack every split of `root` present on disk (or the ones named) into `out/<split>/`."""
    root = Path(root)
    splits = list(splits) if splits else [s for s in layouts.SPLITS if (root / s).is_dir()]
    if not splits:
        raise DataError(f"{root}: no split folders ({', '.join(layouts.SPLITS)})")
    train_split = next((s for s in layouts.TRAIN_SPLITS if (root / s).is_dir()), None)
    label_map = layouts.label_map(layouts.scan_split(root, train_split, options.naming)) if train_split else {}
    return {split: pack_split(root, split, Path(out) / split, label_map, options) for split in splits}


def pack_split(root: Path, split: str, out: Path, label_map: dict[int, int], options: PackOptions) -> ShardIndex:
    samples = layouts.scan_split(root, split, options.naming)
    per_shard = _samples_per_shard(root, samples, options)
    plan = [samples[i : i + per_shard] for i in range(0, len(samples), per_shard)]
    starts = list(range(0, len(samples), per_shard))
    out.mkdir(parents=True, exist_ok=True)
    parts = out / PARTS_DIR
    parts.mkdir(exist_ok=True)
    for folder in (out, parts):  # what killed writers left: only this run writes here
        remove_partials(folder)

    jobs = [
        (root, out, shard, start, chunk, label_map, options.colors)
        for shard, (start, chunk) in enumerate(zip(starts, plan))
        if not _shard_done(out, shard, chunk)
    ]
    done = len(samples) - sum(len(job[4]) for job in jobs)
    bar = tqdm(total=len(samples), initial=done, unit="sample", desc=f"pack {split}", disable=not options.progress)
    with bar:
        if options.workers > 1 and len(jobs) > 1:
            with mp.get_context("spawn").Pool(min(options.workers, len(jobs))) as pool:
                for n in pool.imap_unordered(_write_planned_shard, jobs):
                    bar.update(n)
        else:
            for job in jobs:
                bar.update(_write_planned_shard(job))

    index = _merge_parts(out, split, plan, samples, label_map, options.colors)
    index.save(out)
    shutil.rmtree(parts)
    return index


def _samples_per_shard(root: Path, samples: list[layouts.Sample], options: PackOptions) -> int:
    if options.max_count < 1:
        raise DataError(f"max_count must be >= 1, got {options.max_count}")
    if not options.max_bytes:
        return options.max_count
    first = read_points(root / samples[0].path)
    estimate = sum(
        len(data) + 1024
        for _, data in encode_sample(
            0, first.xyz, first.rgb, {"pid": 0, "camid": 0, "label": 0, "path": samples[0].path}, options.colors
        )
    )
    return max(1, min(options.max_count, options.max_bytes // estimate))


def _part_path(out: Path, shard: int) -> Path:
    return out / PARTS_DIR / f"{shard_name(shard)}.json"


def _shard_done(out: Path, shard: int, chunk: list[layouts.Sample]) -> bool:
    try:
        part = json.loads(_part_path(out, shard).read_text())
        return (
            part["paths"] == [s.path for s in chunk]
            and (out / shard_name(shard)).stat().st_size == part["entry"]["bytes"]
        )
    except (OSError, ValueError, KeyError):
        return False


def _write_planned_shard(job: tuple) -> int:
    root, out, shard, start, chunk, label_map, colors = job
    encoded = []
    for offset, s in enumerate(chunk):
        cloud = read_points(root / s.path)
        meta = {"pid": s.pid, "camid": s.camid, "label": label_map.get(s.pid, -1), "path": s.path}
        encoded.append(encode_sample(start + offset, cloud.xyz, cloud.rgb, meta, colors))
    entry, locations = write_shard(out / shard_name(shard), encoded)
    with atomic_write(_part_path(out, shard), "w") as f:
        json.dump({"entry": entry, "locations": locations, "paths": [s.path for s in chunk]}, f)
    return len(chunk)


def _merge_parts(
    out: Path, split: str, plan: list, samples: list[layouts.Sample], label_map: dict[int, int], colors: str
) -> ShardIndex:
    shards, locations, shard_ids = [], [], []
    for shard, chunk in enumerate(plan):
        part = json.loads(_part_path(out, shard).read_text())
        shards.append(part["entry"])
        locations.extend(part["locations"])
        shard_ids.extend([shard] * len(chunk))
    return ShardIndex(
        split=split,
        shards=shards,
        colors=colors,
        pids=np.array([s.pid for s in samples]),
        camids=np.array([s.camid for s in samples]),
        labels=np.array([label_map.get(s.pid, -1) for s in samples]),
        paths=[s.path for s in samples],
        shard_ids=np.array(shard_ids),
        locations=np.array(locations, dtype=np.int64).reshape(-1, 3),
        label_map=label_map,
    )


def verify_split(folder: str | os.PathLike) -> dict:
    """Check every shard of a local split against its index: size, sha256, sample checksums.

    Raises `ShardError` naming the first bad shard and sample; returns counts when all is well.
    """
    folder = Path(folder)
    index = load_index(folder)
    for shard, entry in enumerate(index.shards):
        path = folder / entry["name"]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ShardError(f"{path}: missing or unreadable shard ({e.strerror or e})") from e
        if len(data) != entry["bytes"]:
            raise ShardError(f"{path}: {len(data)} bytes, the index says {entry['bytes']} (truncated or replaced)")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            for i in np.flatnonzero(index.shard_ids == shard):
                offset, length, crc = index.locations[i]
                if zlib.crc32(data[offset : offset + length]) != crc:
                    raise ShardError(f"{path}, sample {i}: checksum mismatch, the shard is corrupt")
            raise ShardError(f"{path}: sha256 mismatch, the shard is corrupt")
    return {
        "split": index.split,
        "shards": len(index.shards),
        "samples": len(index),
        "classes": index.num_classes,
        "bytes": sum(s["bytes"] for s in index.shards),
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ognet-pack", description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="data set folder with train_all/ query/ gallery/ ... (e.g. 3DMarket+bg)")
    p.add_argument("out", help="output folder; each split goes to OUT/<split>/")
    p.add_argument("--splits", nargs="+", choices=layouts.SPLITS, help="default: every split folder present")
    p.add_argument(
        "--max-count", type=int, default=PackOptions.max_count, help="samples per shard (default %(default)s)"
    )
    p.add_argument("--max-bytes", type=float, default=None, help="approximate bytes per shard, e.g. 5e8")
    p.add_argument(
        "--colors",
        choices=("float32", "uint8"),
        default="float32",
        help="float32 is lossless; uint8 stores k/255 (error <= 0.5/255), 2.3x smaller shards",
    )
    p.add_argument("--workers", type=int, default=PackOptions.workers)
    p.add_argument("--naming", choices=layouts.NAMING_SCHEMES, help="file naming scheme (default: detected)")
    args = p.parse_args(argv)
    options = PackOptions(
        args.max_count, int(args.max_bytes) if args.max_bytes else None, args.colors, args.workers, args.naming
    )
    try:
        indexes = pack_dataset(args.root, args.out, args.splits, options)
    except OgnetError as e:
        sys.exit(f"ognet-pack: error: {e}")
    for split, index in indexes.items():
        print(
            f"{split}: {len(index)} samples, {index.num_classes} classes, {len(index.shards)} shards -> {Path(args.out) / split / INDEX_NAME}"
        )


def verify_main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ognet-verify", description="Check packed splits against their index.")
    p.add_argument("folders", nargs="+", help="split folders holding index.json")
    args = p.parse_args(argv)
    failed = False
    for folder in args.folders:
        try:
            print(f"{folder}: ok {verify_split(folder)}")
        except (ShardError, DataError) as e:
            print(f"{folder}: FAILED {e}", file=sys.stderr)
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":  # python -m ognet.data.pack
    main()
