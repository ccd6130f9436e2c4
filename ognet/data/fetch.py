"""Bytes of the shards of one split, wherever they are: the one place that knows the location kinds.

- a local folder: files opened once per process and read by offset;
- an fsspec URL with `remote_cache="range"` (the default): each read is a byte-range request
  through the node-local block cache; the object's size is checked against the index once per
  shard and process, so a shard that changed under its index is named, not misread;
- an fsspec URL with `remote_cache="shard"`, or any `pipe:` command (a command cannot seek):
  the shard is downloaded whole once per node into the cache, checked against its sha256, and
  read like a local file.

Streams (`stream`) read a shard front to back without any local copy.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from ognet.data.cache import BlockCache, ShardCache, default_cache_dir
from ognet.data.locations import file_location, is_pipe, is_remote
from ognet.data.remote import RemoteOptions, open_stream, read_whole, remote_size
from ognet.errors import ShardError

Access = Literal["indexed", "stream"]  # data.access: how training and evaluation read a split
RemoteCache = Literal["range", "shard"]  # data.remote_cache
CACHE_MODES = typing.get_args(RemoteCache)


@dataclass(frozen=True)
class ReadOptions:
    """How shards are read (the `data.*` config keys of the same names)."""

    remote_cache: RemoteCache = "range"  # range: byte ranges through a block cache | shard: whole shards
    cache_dir: str | None = None  # None: default_cache_dir(), node-local
    block_bytes: int = 2**20  # block cache: bytes per block
    cache_bytes: int = 4 * 2**30  # block cache: bound on its size (0: no cache, exact ranges)
    remote: RemoteOptions = field(default_factory=RemoteOptions)

    def __post_init__(self) -> None:
        if self.remote_cache not in CACHE_MODES:
            raise ValueError(f"remote_cache must be one of {CACHE_MODES}, got {self.remote_cache!r}")

    @classmethod
    def from_config(cls, data) -> ReadOptions:
        """From a DataConfig (ognet.config)."""
        remote = RemoteOptions(data.remote_timeout_s, data.remote_retries, data.remote_backoff_s, data.storage_options)
        return cls(data.remote_cache, data.cache_dir, data.block_bytes, data.cache_bytes, remote)


class ShardFetcher:
    """Byte ranges and streams of the shards listed in an index. Safe to pickle into DataLoader
    workers: open files and checked sizes are per process."""

    def __init__(self, location: str, shards: list[dict], options: ReadOptions):
        self.location, self.shards, self.options = location, shards, options
        folder = Path(options.cache_dir) if options.cache_dir else default_cache_dir()
        self.shard_cache = ShardCache(folder, options.remote)
        self.block_cache = BlockCache(folder, options.remote, options.block_bytes, options.cache_bytes)
        self.whole = is_pipe(location) or options.remote_cache == "shard"
        self._files: dict[int, BinaryIO] = {}
        self._sized: set[int] = set()
        self._pid = os.getpid()

    def url(self, shard: int) -> str:
        return file_location(self.location, self.shards[shard]["name"])

    def read(self, shard: int, start: int, end: int, where: str | None = None) -> bytes:
        """Bytes [start, end) of a shard, checked to exist in full (not their content: the caller
        checks that against the index's crc32). `where` names the sample in a truncation error."""
        if is_remote(self.location) and not self.whole:
            self._check_size(shard)
            return self.block_cache.read(self.url(shard), self.shards[shard], start, end)
        f = self._open(shard)
        size = os.fstat(f.fileno()).st_size  # checked first: read() allocates the length it is asked for
        if end > size:
            raise ShardError(
                f"{where or self.url(shard)}: shard is truncated ({max(size - start, 0)} of {end - start} bytes at offset {start})"
            )
        f.seek(start)
        return f.read(end - start)

    def local_path(self, shard: int) -> Path:
        """A local file holding the shard, downloading it whole first if it is remote."""
        if not is_remote(self.location):
            return Path(self.url(shard))
        return self.shard_cache.path(self.url(shard), self.shards[shard])

    def stream(self, shard: int) -> BinaryIO:
        """The shard front to back, without a local copy (a local file is just opened)."""
        return open_stream(self.url(shard), self.shards[shard]["bytes"], self.options.remote)

    def _check_size(self, shard: int) -> None:
        self._reset_after_fork()
        if shard in self._sized:
            return
        size = remote_size(self.url(shard), self.options.remote)
        if size != self.shards[shard]["bytes"]:
            raise ShardError(
                f"{self.url(shard)}: {size} bytes, the index says {self.shards[shard]['bytes']}: "
                "the shard changed under its index (re-pack or re-index it)"
            )
        self._sized.add(shard)

    def _open(self, shard: int) -> BinaryIO:
        self._reset_after_fork()
        f = self._files.get(shard)
        if f is None:
            path = self.local_path(shard)
            try:
                f = self._files[shard] = open(path, "rb")  # noqa: SIM115 (kept open for the fetcher's lifetime)
            except OSError as e:
                raise ShardError(f"{path}: cannot open shard ({e.strerror or e})") from e
        return f

    def _reset_after_fork(self) -> None:
        if self._pid != os.getpid():  # forked into a DataLoader worker: do not share file offsets
            self._files, self._sized, self._pid = {}, set(), os.getpid()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self) -> dict:  # open files do not travel to worker processes
        return {**self.__dict__, "_files": {}, "_sized": set()}


def read_index_bytes(location: str, name: str, options: RemoteOptions) -> bytes:
    """A small file (the index) of a location of any kind."""
    return read_whole(file_location(location, name), options, "shard index")
