"""Index tar shards that other tools wrote (`ognet-index FOLDER`), so ognet reads them as its own.

Any webdataset-style tar works: members grouped by key (`<key>.<field>`, the key may hold
folders), PAX or GNU headers, directory entries (skipped). Each sample needs `<key>.xyz.npy` and
`<key>.rgb.npy` ((N, 3) float32; rgb float32 in [0, 1] or uint8) and takes its pid and camid from
its `<key>.json` member (`pid`, `camid`) or, without one, from the key's last part by a naming
scheme (`--naming market|duke|msmt|cuhk`). Every sample is decoded once while indexing, so a
shard ognet could not read fails here, naming the tar and the key.

The index records, per sample, its key and the byte range of its members (headers included)
with a crc32, and per shard its size and sha256, exactly as for packed shards. Training splits
(`train_all`, `train`, or `--train`) get labels from their sorted pids; test splits get -1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ognet.data import layouts
from ognet.data.locations import check_name
from ognet.data.shards import ShardIndex, decode_sample, split_key
from ognet.data.tar import Member, iter_members
from ognet.errors import DataError, OgnetError, ShardError


def index_folder(
    folder: str | os.PathLike, naming: str | None = None, split: str | None = None, train: bool | None = None
) -> ShardIndex:
    """Index every `*.tar` of `folder` (sorted by name) and write `folder/index.json`."""
    folder = Path(folder)
    tars = sorted(p for p in folder.glob("*.tar") if p.is_file())
    if not tars:
        raise ShardError(f"{folder}: no .tar files to index")
    split = split or folder.name
    shards, samples, shard_ids = [], [], []
    for number, path in enumerate(tars):
        check_name(path.name, str(folder), "shard name")
        entry, found = index_tar(path, naming)
        shards.append(entry)
        samples.extend(found)
        shard_ids.extend([number] * len(found))
    pids = np.array([s["pid"] for s in samples], dtype=np.int64)
    is_train = split in layouts.TRAIN_SPLITS if train is None else train
    label_map = {int(pid): label for label, pid in enumerate(sorted(set(pids.tolist())))} if is_train else {}
    index = ShardIndex(
        split=split,
        shards=shards,
        pids=pids,
        camids=np.array([s["camid"] for s in samples], dtype=np.int64),
        labels=np.array([label_map.get(int(p), -1) for p in pids], dtype=np.int64),
        paths=[s["key"] for s in samples],
        shard_ids=np.array(shard_ids, dtype=np.int64),
        locations=np.array([s["location"] for s in samples], dtype=np.int64).reshape(-1, 3),
        label_map=label_map,
        keys=[s["key"] for s in samples],
    )
    index._check(str(folder), None)
    index.save(folder)
    return index


def index_tar(path: Path, naming: str | None) -> tuple[dict, list[dict]]:
    """The index entry of one tar and its samples (key, pid, camid, location)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    size = path.stat().st_size
    samples, seen = [], set()
    with open(path, "rb") as f, open(path, "rb") as raw:  # raw: the sample ranges for their crc32
        for key, members in _samples(iter_members(f, str(path), skip_directories=True)):
            where = f"{path}, sample {key!r}"
            if key in seen:
                raise ShardError(f"{where}: the key appears twice (its members must be adjacent)")
            seen.add(key)
            start, end = members[0].start, members[-1].end
            pid, camid = _identity(key, {m.name: m.data for m in members}, naming, where)
            crc = zlib.crc32(os.pread(raw.fileno(), end - start, start))
            samples.append({"key": key, "pid": pid, "camid": camid, "location": [start, end - start, crc]})
    entry = {"name": path.name, "num_samples": len(samples), "bytes": size, "sha256": digest.hexdigest()}
    return entry, samples


def _samples(members: Iterator[Member]) -> Iterator[tuple[str, list[Member]]]:
    """Adjacent members with the same key, as webdataset groups them."""
    key, group = None, []
    for m in members:
        k = split_key(m.name)[0]
        if group and k != key:
            yield key, group
            group = []
        key = k
        group.append(m)
    if group:
        yield key, group


def _identity(key: str, members: dict[str, bytes], naming: str | None, where: str) -> tuple[int, int]:
    """(pid, camid) from the `.json` member, else from the key by the naming scheme; the sample is
    decoded too, so what ognet cannot read fails now."""
    meta = {"index": 0, "pid": 0, "camid": 0, "label": -1, "path": key}
    fields = {split_key(name)[1]: data for name, data in members.items()}
    try:
        if "json" in fields:
            info = json.loads(fields["json"])
            pid, camid = int(info["pid"]), int(info["camid"])
        elif naming:
            pid, camid = layouts.parse_name(key.rpartition("/")[2], naming)
        else:
            raise ShardError(f"{where}: no .json member with pid and camid; give a naming scheme (--naming)")
    except (ValueError, KeyError, TypeError, OverflowError, DataError) as e:
        raise ShardError(f"{where}: cannot take pid and camid ({type(e).__name__}: {e})") from e
    decode_sample({k: v for k, v in members.items() if not k.endswith(".json")}, key, where, meta)
    return pid, camid


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="ognet-index", description="Write FOLDER/index.json for tar shards other tools wrote."
    )
    p.add_argument("folders", nargs="+", help="folders of .tar shards, one split each")
    p.add_argument("--naming", choices=layouts.NAMING_SCHEMES, help="take pid and camid from the key by this scheme")
    p.add_argument("--split", help="split name recorded in the index (default: the folder's name)")
    p.add_argument("--train", action="store_true", default=None, help="give labels (default: for train_all/train)")
    args = p.parse_args(argv)
    for folder in args.folders:
        try:
            index = index_folder(folder, args.naming, args.split, args.train)
        except OgnetError as e:
            sys.exit(f"ognet-index: error: {e}")
        print(
            f"{folder}: {len(index)} samples, {len(set(index.pids.tolist()))} identities, {len(index.shards)} shards -> index.json"
        )
