"""Torch datasets over packed splits: what a DataLoader worker turns into tensors.

Training items are (epoch, position, sample index) triples produced by `SamplerBatches` from the
stratified sampler, so a worker knows which augmentation to draw without any shared state: the
generator is seeded by (seed, epoch, position in the epoch's global stream, sample index). The
same sample drawn twice in an epoch is augmented differently; the same run replays identically
on any number of workers and ranks.

An unreadable sample (corrupt, truncated, or in a missing shard) is an error naming the shard and
the sample. With `data.bad_samples=skip` a training sample is replaced by a readable one of the
same identity and an evaluation sample is left out; either way the worker logs a warning naming
it and the count reaches the training log, TensorBoard and the metrics: never silently.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from typing import Literal, get_args

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ognet.data.sampler import StratifiedSampler
from ognet.data.shards import Sample, ShardReader
from ognet.data.transforms import TransformConfig, transform
from ognet.errors import DataError, ShardError

BadSamples = Literal["error", "skip"]  # data.bad_samples
BAD_SAMPLES: tuple[str, ...] = get_args(BadSamples)
log = logging.getLogger(__name__)


def _check_bad_samples(bad_samples: str) -> str:
    if bad_samples not in BAD_SAMPLES:
        raise ValueError(f"bad_samples must be one of {BAD_SAMPLES}, got {bad_samples!r}")
    return bad_samples


class TrainSet(Dataset):
    """Augmented training items (xyz, rgb, label).

    With `bad_samples="skip"` an unreadable sample is replaced by a readable one of the same
    identity, so labels, batch shapes and the P x K structure stay, and every rank keeps its batch
    size for the all-gathered circle loss. Items then carry a fourth field, 1 where the sample was
    replaced, which the training loop sums over ranks and reports.
    """

    def __init__(self, reader: ShardReader, config: TransformConfig, seed: int, bad_samples: str = "error"):
        self.reader, self.config, self.seed, self.bad_samples = reader, config, seed, _check_bad_samples(bad_samples)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, item: tuple[int, int, int]) -> tuple:
        epoch, position, index = item
        if self.bad_samples == "error":
            return self._load(epoch, position, index)
        try:
            return *self._load(epoch, position, index), 0
        except (ShardError, DataError) as e:
            return *self._replacement(epoch, position, index, e), 1

    def _load(self, epoch: int, position: int, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        sample = self.reader[index]
        return *augment(sample, self.config, self.seed, epoch, position), sample.label

    def _replacement(
        self, epoch: int, position: int, index: int, error: Exception
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The first readable sample of the same identity, in an order drawn from (seed, epoch,
        position, index): the same on every run, and a bad sample drawn K times in a P x K batch
        gets different replacements where its identity has them."""
        labels = self.reader.index.labels
        others = np.flatnonzero(labels == labels[index])
        others = others[others != index]
        for candidate in np.random.default_rng([self.seed, epoch, position, index]).permutation(others):
            try:
                item = self._load(epoch, position, int(candidate))
            except (ShardError, DataError):
                continue
            log.warning(f"{error}; replaced by sample {candidate} of the same identity (data.bad_samples=skip)")
            return item
        raise ShardError(
            f"{error}; no other sample of its identity (pid {self.reader.index.pids[index]}, "
            f"{len(others) + 1} samples) is readable either, so data.bad_samples=skip cannot replace it"
        )


def augment(
    sample: Sample, config: TransformConfig, seed: int, epoch: int, position: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training transform of a sample drawn at `position` of the epoch's global stream, seeded by
    (seed, epoch, position, sample index): the same wherever and however often it is computed."""
    rng = np.random.default_rng([seed, epoch, position, sample.index])
    xyz, rgb = transform(sample.xyz, sample.rgb, config, rng)
    return torch.from_numpy(xyz), torch.from_numpy(rgb)


class EvalSet(Dataset):
    """Deterministic test-time transform; items carry their sample index for merging across ranks.

    With `bad_samples="skip"` an unreadable sample becomes `(None, None, index)`: `collate_eval`
    takes it out of the batch and lists it, so evaluation can leave it out of the ranking.
    """

    def __init__(self, reader: ShardReader, config: TransformConfig, bad_samples: str = "error"):
        self.reader, self.config, self.bad_samples = reader, config, _check_bad_samples(bad_samples)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        try:
            sample = self.reader[index]
            xyz, rgb = transform(sample.xyz, sample.rgb, self.config, None)
        except (ShardError, DataError) as e:
            if self.bad_samples == "error":
                raise
            log.warning(f"{e}; left out of the evaluation (data.bad_samples=skip)")
            return None, None, index
        return torch.from_numpy(xyz), torch.from_numpy(rgb), index


def collate_eval(items: list[tuple]) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(xyz, rgb, indices) of the readable items of a batch, plus the indices of the unreadable
    ones; xyz and rgb are None when no item was readable."""
    good = [item for item in items if item[0] is not None]
    bad = torch.tensor([item[2] for item in items if item[0] is None], dtype=torch.long)
    if not good:
        return None, None, torch.zeros(0, dtype=torch.long), bad
    xyz, rgb, index = default_collate(good)
    return xyz, rgb, index, bad


class SamplerBatches(Sampler[list[tuple[int, int, int]]]):
    """This rank's batches of one epoch, steps [start_step, end_step), as (epoch, position, index) items."""

    def __init__(self, sampler: StratifiedSampler, epoch: int, start_step: int = 0, end_step: int | None = None):
        self.sampler, self.epoch, self.start_step = sampler, epoch, start_step
        self.end_step = sampler.steps_per_epoch if end_step is None else min(end_step, sampler.steps_per_epoch)

    def __len__(self) -> int:
        return max(self.end_step - self.start_step, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        s = self.sampler
        first = s.rank * s.local_batch_size
        for step in range(self.start_step, self.end_step):
            base = step * s.global_batch_size + first
            yield [(self.epoch, base + j, int(i)) for j, i in enumerate(s.local_batch(self.epoch, step))]


def ignore_preemption_signal(worker_id: int) -> None:
    """DataLoader workers ignore SIGUSR1: SLURM delivers it to every process of the job step and
    only the training process acts on it (under `fork` they inherit its handler anyway; under
    `spawn`/`forkserver` the default action would kill them)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def train_loader(
    dataset: TrainSet,
    sampler: StratifiedSampler,
    epoch: int,
    start_step: int = 0,
    num_workers: int = 2,
    pin_memory: bool = False,
    end_step: int | None = None,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=SamplerBatches(sampler, epoch, start_step, end_step),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
        worker_init_fn=ignore_preemption_signal,
    )
