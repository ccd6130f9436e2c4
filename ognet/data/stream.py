"""Streaming mode (`data.access=stream`): shards read front to back by DataLoader workers, with
identity-balanced batches drawn from a bounded buffer, for data that does not fit a node or lives
in object storage. The pattern is OpenCLIP's webdataset pipeline:

    shard list -> shuffle with (seed, epoch), the same on every rank -> split by rank -> split by
    worker -> read shards as streams -> samples -> identity-balanced buffer -> batches

Every rank runs the same number of steps: each worker's shard stream is endless (after its
shards it starts them again, in a new order) and the worker yields exactly its share of the
epoch's steps. One epoch reads each worker's shards about once. Step s of an epoch comes from
the logical worker s mod W, whose stream, buffer and draws are a function of (seed, epoch, rank,
worker) only, so the batches do not depend on timing; resuming at step s replays the logical
workers' streams from the start of the epoch, skipping (not decoding) the batches before s, so a
resume is exact at any step, at the cost of re-reading the epoch's data up to s. The world size
and data.num_workers must stay the same to replay the same batches.

Samples are checked against the index's crc32 as they arrive (the shard's bytes are read once,
never copied to disk) and decoded only when drawn. Evaluation streams each rank's shards and
carries the sample index from the index, so features merge as in indexed mode.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from ognet.data.balance import IdentityBuffer
from ognet.data.dataset import augment, collate_eval
from ognet.data.shards import Sample, ShardReader
from ognet.data.transforms import TransformConfig, transform
from ognet.errors import ConfigError, DataError, ShardError

log = logging.getLogger(__name__)
STREAM_MODES = ("balance", "pk")


def epoch_shards(num_shards: int, seed: int, epoch: int, rank: int, world: int, workers: int) -> list[np.ndarray]:
    """Per logical worker of this rank, its shards in the epoch (shuffled alike on every rank,
    then split by rank, then by worker: no two readers share a shard)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_shards)
    mine = order[rank::world]
    return [mine[w::workers] for w in range(workers)]


def shard_samples(reader: ShardReader, shard: int, skip_bad: bool) -> Iterator[tuple[int, bytes | None]]:
    """(sample index, its bytes) of one shard, read front to back and checked against the
    index's crc32. With `skip_bad` an unreadable sample gives None (a failed stream: the rest of
    the shard); otherwise a ShardError naming the URL and the sample."""
    index, fetcher = reader.index, reader.fetcher
    samples = np.flatnonzero(index.shard_ids == shard)
    samples = samples[np.argsort(index.locations[samples, 0], kind="stable")]
    url, pos, done = fetcher.url(shard), 0, 0
    try:
        with fetcher.stream(shard) as stream:
            for i in samples.tolist():
                offset, length, crc = (int(v) for v in index.locations[i])
                _skip(stream, offset - pos)
                data = stream.read(length)
                pos = offset + len(data)
                if len(data) < length:
                    raise ShardError(
                        f"{url}, sample {i}: shard is truncated ({len(data)} of {length} bytes at offset {offset})"
                    )
                if zlib.crc32(data) != crc:
                    if not skip_bad:
                        raise ShardError(
                            f"{url}, sample {i}: checksum mismatch, the shard is corrupt or changed under its index"
                        )
                    log.warning(f"{url}, sample {i}: checksum mismatch; left out (data.bad_samples=skip)")
                    data = None
                yield i, data
                done += 1
    except ShardError as e:
        if done >= len(samples):  # every sample was read: nothing is lost
            return
        if not skip_bad:
            raise e if f"sample {samples[done]}" in str(e) else ShardError(f"sample {samples[done]}: {e}") from e
        log.warning(f"{e}; samples {samples[done]}..{samples[-1]} of the shard left out (data.bad_samples=skip)")
        for i in samples[done:].tolist():
            yield i, None


def _skip(stream, n: int) -> None:
    while n > 0:
        got = len(stream.read(min(n, 2**20)))
        if not got:
            return
        n -= got


class StreamTrainSet(IterableDataset):
    """One epoch of this rank's training batches (xyz, rgb, labels, bad) from step `start_step`
    on, as a DataLoader with batch_size=None consumes them; `bad` sums to the samples left out
    since the previous batch (data.bad_samples=skip)."""

    def __init__(self, reader: ShardReader, config: StreamConfig, epoch: int, start_step: int = 0):
        self.reader, self.config, self.epoch, self.start_step = reader, config, epoch, start_step

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        logical = (worker + self.start_step) % workers  # the DataLoader asks worker 0 first: it plays start_step's
        c = self.config
        shards = epoch_shards(len(self.reader.index.shards), c.seed, self.epoch, c.rank, c.world_size, workers)[logical]
        if not len(shards):
            raise ConfigError(
                f"stream mode: {len(self.reader.index.shards)} shards for {c.world_size} ranks x {workers} workers; "
                "every worker needs one (fewer data.num_workers, or pack smaller shards)"
            )
        steps = list(range(logical, c.steps_per_epoch, workers))
        pipeline = wds.DataPipeline(
            lambda: worker_stream(shards, self._read_shard, c.seed, self.epoch, c.rank, logical),
            lambda samples: self._batches(samples, shards, steps, logical),
        )
        yield from pipeline

    def _batches(self, samples: Iterator, shards: np.ndarray, steps: list[int], logical: int) -> Iterator[tuple]:
        c, index = self.config, self.reader.index
        mine = np.isin(index.shard_ids, shards)
        labels, counts = np.unique(index.labels[mine], return_counts=True)
        rng = np.random.default_rng([c.seed, self.epoch, c.rank, logical, 0])  # round 0: the draws
        camids = index.camids if c.camera_aware else None
        buffer = IdentityBuffer(
            index.labels,
            c.buffer,
            min(c.buffer, c.per_identity),
            rng,
            dict(zip(labels.tolist(), counts.tolist())),
            camids,
        )
        draws = buffered_draws(samples, buffer, c.mode, c.local_batch_size, c.k, len(steps), int(mine.sum()))
        for step, (drawn, held, bad) in zip(steps, draws):
            if step >= self.start_step:  # earlier steps are replayed, not decoded
                yield self._collate(step, drawn, held, bad)

    def _read_shard(self, shard: int) -> Iterator[tuple[int, bytes | None]]:
        return shard_samples(self.reader, shard, self.config.bad_samples == "skip")

    def _collate(self, step: int, drawn: np.ndarray, held: dict, bad: int) -> tuple:
        c = self.config
        first = step * c.global_batch_size + c.rank * c.local_batch_size
        indices = drawn.tolist()
        samples = [self._decode(i, held, indices) for i in indices]
        items = [(*augment(s, c.transforms, c.seed, self.epoch, first + j), s.label) for j, s in enumerate(samples)]
        xyz, rgb, labels = default_collate(items)
        if c.bad_samples != "skip":
            return xyz, rgb, labels
        flags = torch.zeros(len(items), dtype=torch.long)
        flags[0] = bad + sum(
            s.index != i for s, i in zip(samples, indices)
        )  # the sum counts what was left out or replaced
        return xyz, rgb, labels, flags

    def _decode(self, i: int, held: dict, batch: list[int]) -> Sample:
        """Sample i (crc-checked already); with data.bad_samples=skip one that does not decode is
        replaced by a sample of the same identity in the batch."""
        try:
            return self.reader.decode(i, held[i])
        except (ShardError, DataError) as e:
            if self.config.bad_samples != "skip":
                raise
            for j in batch:
                if j != i and self.reader.index.labels[j] == self.reader.index.labels[i]:
                    log.warning(f"{e}; replaced by sample {j} of the same identity (data.bad_samples=skip)")
                    return self.reader.decode(j, held[j])
            raise


def worker_stream(
    shards: np.ndarray,
    read_shard: Callable[[int], Iterator[tuple[int, object]]],
    seed: int,
    epoch: int,
    rank: int,
    worker: int,
) -> Iterator[tuple[int, object]]:
    """A worker's shards again and again (its stream never ends, so every worker yields its share
    of steps), each round after the first in a new order drawn from (seed, epoch, rank, worker, round)."""
    order, round_ = shards, 0
    while True:
        for shard in order.tolist():
            yield from read_shard(shard)
        round_ += 1
        order = np.random.default_rng([seed, epoch, rank, worker, round_]).permutation(shards)


def buffered_draws(
    samples: Iterator[tuple[int, object]],
    buffer: IdentityBuffer,
    mode: str,
    batch_size: int,
    k: int,
    n_batches: int,
    per_pass: int,
) -> Iterator[tuple[np.ndarray, dict, int]]:
    """Per batch: the drawn sample indices, the payloads held (index -> what the stream gave with
    it), and how many unreadable samples (payload None) the stream gave since the last batch.

    The buffer is first filled, then fed at the rate that reads `per_pass` samples (one pass
    over the worker's shards) over the `n_batches` batches, and faster while it cannot form a
    batch. Pure bookkeeping: the benchmark runs it on sample indices alone."""
    buffer.set_k(k if mode == "pk" else 0)
    p = batch_size // k
    fill = min(buffer.capacity, per_pass)
    held: dict[int, object] = {}
    read = bad = 0
    for j in range(n_batches):
        target = fill + min(
            per_pass - fill, math.ceil(j * per_pass / n_batches)
        )  # the pass ends fill/rate batches early: the last identities read stay as long as the first
        while read < target or not (buffer.ready_pk(p) if mode == "pk" else len(buffer)):
            i, payload = next(samples)
            read += 1
            if payload is None:
                bad += 1
                continue
            held.setdefault(i, payload)
            for gone in buffer.feed(i):
                held.pop(gone, None)
        drawn, gone = buffer.draw_pk(p, k) if mode == "pk" else (buffer.draw_balance(batch_size), [])
        yield drawn, held, bad
        bad = 0
        for i in gone:
            held.pop(i, None)


class StreamConfig:
    """What a streaming training set needs, fixed for the run (picklable into workers)."""

    def __init__(
        self,
        *,
        mode: str,
        k: int,
        camera_aware: bool,
        seed: int,
        rank: int,
        world_size: int,
        global_batch_size: int,
        steps_per_epoch: int,
        buffer: int,
        transforms: TransformConfig,
        bad_samples: str,
        per_identity: int = 64,
    ):
        if mode not in STREAM_MODES:
            raise ConfigError(
                f"sampler.mode={mode!r} is not available with data.access=stream (use {' or '.join(STREAM_MODES)})"
            )
        if global_batch_size % world_size:
            raise ConfigError(f"global_batch_size {global_batch_size} is not a multiple of the world size {world_size}")
        self.local_batch_size = global_batch_size // world_size
        if mode == "pk" and self.local_batch_size % k:
            raise ConfigError(
                f"pk sampling: each rank's batch of {self.local_batch_size} must hold whole identities of k {k}"
            )
        self.mode, self.k, self.camera_aware, self.seed = mode, k, camera_aware, seed
        self.rank, self.world_size, self.global_batch_size = rank, world_size, global_batch_size
        self.steps_per_epoch, self.buffer, self.per_identity = steps_per_epoch, buffer, per_identity
        self.transforms, self.bad_samples = transforms, bad_samples


class StreamEvalSet(IterableDataset):
    """This rank's samples for evaluation, batched in the workers as `collate_eval` batches
    (xyz, rgb, sample index, unreadable indices). Shard i goes to rank i mod world size."""

    def __init__(
        self,
        reader: ShardReader,
        config: TransformConfig,
        rank: int,
        world_size: int,
        batch_size: int,
        bad_samples: str,
    ):
        self.reader, self.config, self.batch_size, self.bad_samples = reader, config, batch_size, bad_samples
        self.shards = list(range(rank, len(reader.index.shards), world_size))

    def __iter__(self) -> Iterator[tuple]:
        pipeline = wds.DataPipeline(
            lambda: iter(self.shards),
            wds.split_by_worker,
            lambda shards: (item for shard in shards for item in self._samples(shard)),
            wds.batched(self.batch_size, collation_fn=collate_eval, partial=True),
        )
        yield from pipeline

    def _samples(self, shard: int) -> Iterator[tuple]:
        skip = self.bad_samples == "skip"
        for i, data in shard_samples(self.reader, shard, skip):
            if data is None:  # already named in a warning
                yield None, None, i
                continue
            try:
                sample = self.reader.decode(i, data)
                if sample.index != i:
                    raise ShardError(
                        f"{self.reader.fetcher.url(shard)}, sample {i}: the sample carries index {sample.index}"
                    )
                xyz, rgb = transform(sample.xyz, sample.rgb, self.config, None)
            except (ShardError, DataError) as e:
                if not skip:
                    raise
                log.warning(f"{e}; left out of the evaluation (data.bad_samples=skip)")
                yield None, None, i
                continue
            yield torch.from_numpy(xyz), torch.from_numpy(rgb), i
