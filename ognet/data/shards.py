"""Webdataset tar shards of point clouds, their index, and the two ways to read them.

A split packs into `shard-000000.tar, shard-000001.tar, ...` plus `index.json`. Each sample is
three tar members sharing the key `<8-digit sample index>`:

    00000042.xyz.npy   float32 (N, 3)
    00000042.rgb.npy   float32 (N, 3) in [0, 1]   (uint8 (N, 3) with colors="uint8")
    00000042.json      {"index", "pid", "camid", "label", "path"}

so plain `webdataset.WebDataset` and `tar` read them; nothing in them needs pickle. The index
holds, per shard, its sample count, byte size and sha256, and per sample its pid, camid, label,
source path, and where its members lie in the shard (byte offset, length, crc32). That lets
`ShardReader` read any sample by index with one seek, which a sampler that picks identities
needs; `stream_split` reads the same shards sequentially with webdataset, for evaluation-style
passes. Both return identical `Sample`s.

Where shards live (a folder, an fsspec URL, a `pipe:` command) and how their bytes are fetched
(offsets, byte ranges through a block cache, or whole shards cached once per node) is
`ognet.data.locations` and `ognet.data.fetch`; names read from an index are checked there before
they reach a path, a URL or a command.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import tarfile
import tokenize
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ognet.data.fetch import ReadOptions, ShardFetcher, read_index_bytes
from ognet.data.locations import check_name, file_location, join_location
from ognet.data.tar import MAX_MEMBER_BYTES, TAR_BLOCK, read_tar_members, safe_member_name
from ognet.errors import ShardError
from ognet.io import atomic_write

INDEX_NAME = "index.json"
INDEX_FORMAT = "ognet-shards"
INDEX_VERSION = 1
MEMBER_FIELDS = ("xyz.npy", "rgb.npy", "json")
_SHA256 = re.compile(r"[0-9a-f]{64}")
__all__ = ["MAX_MEMBER_BYTES", "TAR_BLOCK", "join_location", "read_tar_members"]  # re-exported


class Sample(NamedTuple):
    """One point cloud with its metadata, as both shard readers return it."""

    index: int
    xyz: np.ndarray  # (N, 3) float32
    rgb: np.ndarray  # (N, 3) float32 in [0, 1]
    pid: int
    camid: int
    label: int
    path: str


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:08d}"


# ------------------------------------------------------------------------------------------------
# Writing


def encode_sample(
    index: int, xyz: np.ndarray, rgb: np.ndarray, meta: dict, colors: str = "float32"
) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in a fixed order."""
    if colors == "uint8":
        rgb = np.rint(rgb * 255.0).astype(np.uint8)
    elif colors != "float32":
        raise ValueError(f"colors must be 'float32' or 'uint8', got {colors!r}")
    key = sample_key(index)
    return [
        (f"{key}.xyz.npy", _npy_bytes(xyz.astype(np.float32, copy=False))),
        (f"{key}.rgb.npy", _npy_bytes(rgb)),
        (f"{key}.json", json.dumps({"index": index, **meta}, sort_keys=True).encode()),
    ]


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def write_shard(path: str | os.PathLike, samples: Sequence[list[tuple[str, bytes]]]) -> tuple[dict, list[list[int]]]:
    """Write one tar atomically; return its index entry and per sample [offset, length, crc32].

    Members are written with fixed metadata (mtime 0, root owner, mode 0444), so the same samples
    always give byte-identical shards.
    """
    buf = io.BytesIO()
    locations = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for members in samples:
            start = buf.tell()
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                tar.addfile(info, io.BytesIO(data))
            end = buf.tell()
            locations.append([start, end - start, zlib.crc32(buf.getbuffer()[start:end])])
    data = buf.getvalue()
    with atomic_write(path) as f:
        f.write(data)
    entry = {
        "name": Path(path).name,
        "num_samples": len(samples),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return entry, locations


# ------------------------------------------------------------------------------------------------
# The index


@dataclass
class ShardIndex:
    """What `index.json` holds. Sample arrays are in sample-index order."""

    split: str
    shards: list[dict]
    pids: np.ndarray
    camids: np.ndarray
    labels: np.ndarray
    paths: list[str]
    shard_ids: np.ndarray
    locations: np.ndarray  # (num_samples, 3): byte offset in the shard, length, crc32
    label_map: dict[int, int]
    colors: str = "float32"
    keys: list[str] | None = None  # sample keys in the shards; None: ognet's own, sample_key(i)

    def __len__(self) -> int:
        return len(self.pids)

    @property
    def num_classes(self) -> int:
        return len(self.label_map)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels[self.labels >= 0], minlength=self.num_classes)

    def to_json(self) -> dict:
        return {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "split": self.split,
            "colors": self.colors,
            "num_samples": len(self),
            "shards": self.shards,
            "label_map": {str(k): v for k, v in self.label_map.items()},
            "class_counts": self.class_counts().tolist(),
            "samples": {
                "pid": self.pids.tolist(),
                "camid": self.camids.tolist(),
                "label": self.labels.tolist(),
                "path": self.paths,
                "shard": self.shard_ids.tolist(),
                "location": self.locations.tolist(),
                **({"key": self.keys} if self.keys is not None else {}),
            },
        }

    def key(self, i: int) -> str:
        """The key of sample i's members in its shard."""
        return sample_key(i) if self.keys is None else self.keys[i]

    def first_sample(self) -> np.ndarray:
        """Per shard, the index of its first sample (samples are stored in index order)."""
        counts = np.array([s["num_samples"] for s in self.shards], dtype=np.int64)
        return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / INDEX_NAME
        with atomic_write(path, "w") as f:
            json.dump(self.to_json(), f)
        return path

    @classmethod
    def from_json(cls, data: dict, source: str) -> ShardIndex:
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise ShardError(
                f"{source}: not an ognet shard index (format {data.get('format') if isinstance(data, dict) else None!r})"
            )
        if data.get("version") != INDEX_VERSION:
            raise ShardError(f"{source}: index version {data.get('version')!r}, this ognet reads {INDEX_VERSION}")
        try:
            s = data["samples"]
            index = cls(
                split=data["split"],
                shards=[dict(shard) for shard in data["shards"]],
                colors=data.get("colors", "float32"),
                pids=np.asarray(s["pid"], dtype=np.int64),
                camids=np.asarray(s["camid"], dtype=np.int64),
                labels=np.asarray(s["label"], dtype=np.int64),
                paths=list(s["path"]),
                shard_ids=np.asarray(s["shard"], dtype=np.int64),
                locations=np.asarray(s["location"], dtype=np.int64).reshape(-1, 3),
                label_map={int(k): int(v) for k, v in dict(data["label_map"]).items()},
                keys=list(s["key"]) if "key" in s else None,
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:  # OverflowError: a number beyond int64
            raise ShardError(f"{source}: malformed index ({type(e).__name__}: {e})") from e
        index._check(source, data.get("num_samples"))
        return index

    def _check(self, source: str, num_samples: int | None) -> None:
        if any(a.ndim != 1 for a in (self.pids, self.camids, self.labels, self.shard_ids)):
            raise ShardError(f"{source}: per-sample pid, camid, label and shard must be lists of integers")
        n = len(self.pids)
        lengths = {len(self.camids), len(self.labels), len(self.paths), len(self.shard_ids), len(self.locations)}
        if lengths != {n} or (num_samples is not None and num_samples != n):
            raise ShardError(
                f"{source}: per-sample arrays disagree in length ({sorted(lengths | {n})}, num_samples {num_samples})"
            )
        for shard in self.shards:
            name, size, sha = shard.get("name"), shard.get("bytes"), shard.get("sha256")
            check_name(name, source, "shard name")  # it becomes part of a path, a URL or a command
            if not isinstance(size, int) or not 0 <= size < 2**63:
                raise ShardError(f"{source}: shard {name} has byte size {size!r}, expected a whole number")
            if not isinstance(sha, str) or not _SHA256.fullmatch(sha):  # it names a cache folder
                raise ShardError(f"{source}: shard {name} has sha256 {str(sha)[:80]!r}, expected 64 hex digits")
        if self.keys is not None and (
            len(self.keys) != n or not all(isinstance(k, str) and safe_member_name(k) == k for k in self.keys)
        ):
            raise ShardError(f"{source}: sample keys must be {n} relative member names")
        # before bincount: a huge shard number would make it allocate that many counters
        if n and (self.shard_ids.min() < 0 or self.shard_ids.max() >= len(self.shards)):
            raise ShardError(f"{source}: a sample refers to a shard that is not listed")
        for shard, count in zip(self.shards, np.bincount(self.shard_ids, minlength=len(self.shards)).tolist()):
            if count != shard.get("num_samples"):
                raise ShardError(
                    f"{source}: shard {shard['name']} lists {shard.get('num_samples')!r} samples, the sample table {count}"
                )
        sizes = np.asarray([s["bytes"] for s in self.shards], dtype=np.int64)[self.shard_ids]
        offsets, lengths = self.locations[:, 0], self.locations[:, 1]
        if ((offsets < 0) | (lengths <= 0) | (offsets > sizes - lengths)).any():  # not offset + length: it can wrap
            raise ShardError(f"{source}: a sample location lies outside its shard")


def load_index(location: str | os.PathLike, options: ReadOptions | None = None) -> ShardIndex:
    """Read `index.json` from a folder, an fsspec URL prefix or a `pipe:` command template."""
    source = file_location(location, INDEX_NAME)
    raw = read_index_bytes(str(location), INDEX_NAME, (options or ReadOptions()).remote)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{source}: shard index is not valid JSON ({e})") from e
    return ShardIndex.from_json(data, source)


# ------------------------------------------------------------------------------------------------
# Reading


class ShardReader:
    """Random access to the samples of one packed split, by sample index.

    Each sample is one read of its byte range (a seek in a local file, a range request through
    the block cache, or a seek in a whole cached copy: see `ognet.data.fetch`), checked against
    its crc32 in the index, then parsed and decoded.
    """

    def __init__(
        self,
        location: str | os.PathLike,
        cache_dir: str | os.PathLike | None = None,
        options: ReadOptions | None = None,
    ):
        options = options or ReadOptions()
        if cache_dir is not None:
            options = dataclasses.replace(options, cache_dir=str(cache_dir))
        self.location = str(location)
        self.index = load_index(location, options)
        self.fetcher = ShardFetcher(self.location, self.index.shards, options)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Sample:
        n = len(self.index)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        i = int(i) % n
        shard = int(self.index.shard_ids[i])
        offset, length, crc = (int(v) for v in self.index.locations[i])
        where = f"{self.fetcher.url(shard)}, sample {i}"
        try:
            data = self.fetcher.read(shard, offset, offset + length, where)
        except ShardError as e:  # a shard that cannot be opened or fetched: name the sample too
            raise e if str(e).startswith(where) else ShardError(f"sample {i}: {e}") from e
        return self.decode(i, data, crc)

    def decode(self, i: int, data: bytes, crc: int | None = None) -> Sample:
        """Sample i from the bytes of its range, checked against the index's crc32."""
        where = f"{self.fetcher.url(int(self.index.shard_ids[i]))}, sample {i}"
        if zlib.crc32(data) != (int(self.index.locations[i, 2]) if crc is None else crc):
            raise ShardError(f"{where}: checksum mismatch, the shard is corrupt or changed under its index")
        members = dict(read_tar_members(data, where))
        return decode_sample(members, self.index.key(i), where, self.foreign_meta(i))

    def foreign_meta(self, i: int) -> dict | None:
        """Metadata of a sample of a foreign shard, from the index (its shard may carry none)."""
        if self.index.keys is None:
            return None
        x = self.index
        return {
            "index": i,
            "pid": int(x.pids[i]),
            "camid": int(x.camids[i]),
            "label": int(x.labels[i]),
            "path": x.paths[i],
        }

    def shard_path(self, shard: int) -> Path:
        """A local path to a shard, fetching it whole (and checking it) first if it is remote."""
        return self.fetcher.local_path(shard)

    def close(self) -> None:
        self.fetcher.close()


def split_key(name: str) -> tuple[str, str]:
    """A member name as webdataset splits it: key (folders + name up to the first dot) and field."""
    folder, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field


def decode_sample(members: dict[str, bytes], key: str, where: str, meta: dict | None = None) -> Sample:
    """Build a `Sample` from its members (names `<key>.<field>`); `meta` (pid, camid, label, path,
    index) replaces the `.json` member's, which foreign shards may lack."""
    fields = {}
    for name, data in members.items():
        member_key, field = split_key(name)
        if member_key != key:
            fields = None
            break
        fields[field] = data
    required = MEMBER_FIELDS if meta is None else MEMBER_FIELDS[:2]
    if fields is None or any(f not in fields for f in required):
        raise ShardError(f"{where}: expected members {[f'{key}.{f}' for f in required]}, found {sorted(members)}")
    try:
        if meta is None:
            meta = json.loads(fields["json"])
        xyz = read_npy(fields["xyz.npy"])
        rgb = read_npy(fields["rgb.npy"])
    except (ValueError, UnicodeDecodeError, EOFError, RecursionError) as e:  # RecursionError: deeply nested JSON
        raise ShardError(f"{where}: cannot decode sample ({e})") from e
    return make_sample(meta, xyz, rgb, where)


def read_npy(data: bytes) -> np.ndarray:
    """An `.npy` payload as a writable array, refusing pickled (object) arrays.

    The header is parsed once per distinct header (a split has a few: one per point count), the
    data viewed then copied: several times cheaper than `numpy.lib.format.read_array` per sample.
    """
    if data[:6] != b"\x93NUMPY" or len(data) < 12:
        raise ValueError("not an .npy payload")
    end = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    dtype, shape, fortran = _npy_header(bytes(data[:end]))
    count = math.prod(shape)
    if count * dtype.itemsize > len(data) - end:  # also keeps a huge declared shape from reaching numpy
        raise ValueError(f".npy header declares {shape} {dtype}, more than the {max(len(data) - end, 0)} bytes of data")
    array = np.frombuffer(data, dtype, count=count, offset=end)
    return array.reshape(shape, order="F" if fortran else "C").copy()


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    f = io.BytesIO(header)
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f".npy format version {version} is not supported")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    try:
        shape, fortran, dtype = read_header(f)
    except (SyntaxError, TypeError, tokenize.TokenError) as e:  # numpy lets these through from a garbled header
        raise ValueError(f"unreadable .npy header ({type(e).__name__}: {e})") from e
    if dtype.hasobject:
        raise ValueError("object arrays (pickles) are not allowed")
    if dtype.itemsize == 0 or min(shape, default=0) < 0:
        raise ValueError(f".npy header declares an impossible array: shape {shape}, dtype {dtype}")
    return dtype, shape, fortran


def make_sample(meta: dict, xyz: np.ndarray, rgb: np.ndarray, where: str) -> Sample:
    if rgb.dtype == np.uint8:
        rgb = rgb.astype(np.float32) / np.float32(255.0)
    if (
        xyz.dtype != np.float32
        or rgb.dtype != np.float32
        or xyz.ndim != 2
        or xyz.shape[1:] != (3,)
        or rgb.shape != xyz.shape
    ):
        raise ShardError(
            f"{where}: arrays have unexpected shapes/dtypes xyz {xyz.dtype}{xyz.shape}, rgb {rgb.dtype}{rgb.shape}"
        )
    try:
        return Sample(
            int(meta["index"]), xyz, rgb, int(meta["pid"]), int(meta["camid"]), int(meta["label"]), str(meta["path"])
        )
    except (KeyError, TypeError, ValueError, OverflowError) as e:  # OverflowError: int(Infinity)
        raise ShardError(f"{where}: sample metadata is malformed ({e})") from e


def stream_split(
    location: str | os.PathLike, cache_dir: str | os.PathLike | None = None, **webdataset_kwargs
) -> Iterator[Sample]:
    """Sequential read of a packed split with a plain webdataset pipeline, in sample order.

    Remote shards go through the same local cache as `ShardReader`. Extra keyword arguments go to
    `webdataset.WebDataset` (for example `nodesplitter`/`workersplitter` to split shards).
    """
    import webdataset as wds

    reader = ShardReader(location, cache_dir)
    urls = [str(reader.shard_path(i)) for i in range(len(reader.index.shards))]
    for url, entry in zip(urls, reader.index.shards):  # a truncated or missing shard fails here, by name
        try:
            size = os.path.getsize(url)
        except OSError as e:
            raise ShardError(f"{url}: missing or unreadable shard ({e.strerror or e})") from e
        if size != entry["bytes"]:
            raise ShardError(f"{url}: {size} bytes, the index says {entry['bytes']} (truncated or replaced)")
    # tarfile's stream mode takes a corrupt header for the end of the archive, so webdataset can end
    # a shard early without an error: each shard must yield its samples in order and completely.
    counts = [int(entry["num_samples"]) for entry in reader.index.shards]
    first = dict(zip(urls, np.cumsum([0] + counts[:-1]).tolist()))
    expected = dict(zip(urls, counts))
    url, read = None, 0

    def check_complete() -> None:
        if url is not None and read != expected[url]:
            raise ShardError(f"{url}: {read} samples read, the index lists {expected[url]} (corrupt tar data)")

    kwargs = {
        "shardshuffle": False,
        "nodesplitter": None,
        "workersplitter": None,
        "empty_check": False,
        **webdataset_kwargs,
    }
    where = f"{location}, before the first sample"
    try:
        for sample in wds.WebDataset(urls, **kwargs):
            if sample["__url__"] != url:
                check_complete()
                url, read = sample["__url__"], 0
            key = sample["__key__"]
            where = f"{url}, sample {key}"
            i = first[url] + read
            if key != reader.index.key(i):
                raise ShardError(f"{where}: expected sample {reader.index.key(i)} here (corrupt tar data)")
            read += 1
            members = {f"{key}.{k}": v for k, v in sample.items() if not k.startswith("__")}
            yield decode_sample(members, key, where, reader.foreign_meta(i))
    except tarfile.TarError as e:  # webdataset appends the failing shard's URL to the message
        raise ShardError(f"corrupt tar data after {where} ({e})") from e
    check_complete()
