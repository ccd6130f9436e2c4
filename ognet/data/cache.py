"""The node-local cache of remote shards: whole shards (one download per node) or blocks of them.

Both are keyed by content (the shard's sha256 in the index), never by URL: any spelling of a
location shares them, and a re-packed split never reads stale bytes.

- `ShardCache`: `<dir>/<sha256 prefix>/<shard name>`, downloaded once per node: the first process
  takes a file lock beside it, the others wait on the lock and then find the file. The download
  streams to a temporary file (never the whole shard in memory), is checked against its sha256
  and renamed into place.
- `BlockCache`: `<dir>/blocks/<sha256 prefix>/<block number>`, fixed-size blocks of a shard, so
  random access reads a few blocks, not the shard; bounded by `max_bytes` (least recently
  written blocks go first). Blocks are written atomically; two processes that miss the same block
  both fetch it, which costs bytes but never correctness.

The default folder is node-local: `$OGNET_CACHE`, else `$SLURM_TMPDIR`, `$TMPDIR` or the system
temporary folder, under `ognet-<uid>/shards`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from filelock import FileLock

from ognet.data.remote import PermanentError, RemoteOptions, open_stream, read_range, with_retries
from ognet.io import atomic_write

COPY_CHUNK = 2**20


def default_cache_dir() -> Path:
    if os.environ.get("OGNET_CACHE"):
        return Path(os.environ["OGNET_CACHE"])
    tmp = os.environ.get("SLURM_TMPDIR") or tempfile.gettempdir()  # gettempdir() honours $TMPDIR
    return Path(tmp) / f"ognet-{os.getuid()}" / "shards"


class ShardCache:
    """Whole shards, downloaded once per node and checked against their sha256."""

    def __init__(self, folder: str | os.PathLike, options: RemoteOptions):
        self.folder, self.options = Path(folder), options

    def path(self, url: str, entry: dict) -> Path:
        """The local copy of the shard `entry` (from the index) of `url`, fetched if missing."""
        cached = self.folder / entry["sha256"][:32] / entry["name"]
        if cached.exists():
            return cached
        cached.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cached) + ".lock"):  # one download per node; the others wait, then find it
            if not cached.exists():
                with_retries(url, lambda: self._download(url, entry, cached), self.options)
        return cached

    def _download(self, url: str, entry: dict, cached: Path) -> None:
        digest, size = hashlib.sha256(), 0
        with atomic_write(cached) as out, open_stream(url, entry["bytes"], self.options) as stream:
            while chunk := stream.read(COPY_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            if (
                size != entry["bytes"] or digest.hexdigest() != entry["sha256"]
            ):  # raising here keeps it out of the cache
                raise PermanentError(
                    f"fetched shard does not match the index ({size} bytes, the index says {entry['bytes']}; "
                    "sha256 differs): it changed or is corrupt"
                )


class BlockCache:
    """Byte ranges of shards through fixed-size cached blocks, bounded in total size."""

    def __init__(self, folder: str | os.PathLike, options: RemoteOptions, block_bytes: int, max_bytes: int):
        if block_bytes < 1:
            raise ValueError(f"block_bytes must be >= 1, got {block_bytes}")
        self.folder, self.options = Path(folder) / "blocks", options
        self.block_bytes, self.max_bytes = block_bytes, max_bytes
        self._written = 0  # bytes this process wrote since it last trimmed the cache
        self.fetched = 0  # bytes this process fetched from the remote (for the benchmark)

    def read(self, url: str, entry: dict, start: int, end: int) -> bytes:
        """Bytes [start, end) of the shard `entry` at `url`."""
        if self.max_bytes <= 0:  # no cache: exactly the range asked for
            self.fetched += end - start
            return read_range(url, start, end, self.options)
        b = self.block_bytes
        first, last = start // b, (end - 1) // b
        blocks = {}
        missing = []
        for k in range(first, last + 1):
            data = self._load(entry, k)
            if data is None:
                missing.append(k)
            else:
                blocks[k] = data
        for lo, hi in _runs(missing):  # consecutive missing blocks: one request
            data = read_range(url, lo * b, min((hi + 1) * b, entry["bytes"]), self.options)
            self.fetched += len(data)
            for k in range(lo, hi + 1):
                blocks[k] = data[(k - lo) * b : (k - lo + 1) * b]
                self._store(entry, k, blocks[k])
        joined = b"".join(blocks[k] for k in range(first, last + 1))
        return joined[start - first * b : end - first * b]

    def _block_path(self, entry: dict, k: int) -> Path:
        return self.folder / entry["sha256"][:32] / f"{k:08d}"

    def _load(self, entry: dict, k: int) -> bytes | None:
        try:
            return self._block_path(entry, k).read_bytes()
        except FileNotFoundError:  # never fetched, or trimmed by another process meanwhile
            return None

    def _store(self, entry: dict, k: int, data: bytes) -> None:
        with atomic_write(self._block_path(entry, k)) as f:
            f.write(data)
        self._written += len(data)
        if self._written > self.max_bytes // 8:  # a scan of the folder per eighth of the bound written
            self._written = 0
            trim(self.folder, self.max_bytes)


def trim(folder: Path, max_bytes: int) -> None:
    """Delete the least recently written files of `folder` until it holds at most `max_bytes`."""
    files = []
    for path in folder.glob("*/*"):
        if path.name.startswith("."):  # a block being written (atomic_write's temporary file)
            continue
        try:
            st = path.stat()
        except FileNotFoundError:  # another process trimmed it
            continue
        files.append((st.st_mtime_ns, st.st_size, path))
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= max_bytes:
            break
        path.unlink(missing_ok=True)
        total -= size


def _runs(ks: list[int]) -> list[tuple[int, int]]:
    """[1, 2, 3, 7, 8] -> [(1, 3), (7, 8)]."""
    runs: list[tuple[int, int]] = []
    for k in ks:
        if runs and runs[-1][1] == k - 1:
            runs[-1] = (runs[-1][0], k)
        else:
            runs.append((k, k))
    return runs
