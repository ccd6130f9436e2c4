"""Torch datasets over packed splits: what a DataLoader worker turns into tensors.

Training items are (epoch, position, sample index) triples produced by `SamplerBatches` from the
stratified sampler, so a worker knows which augmentation to draw without any shared state: the
generator is seeded by (seed, epoch, position in the epoch's global stream, sample index). The
same sample drawn twice in an epoch is augmented differently; the same run replays identically
on any number of workers and ranks.
"""

from __future__ import annotations

import signal
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ognet.data.sampler import StratifiedSampler
from ognet.data.shards import ShardReader
from ognet.data.transforms import TransformConfig, transform


class TrainSet(Dataset):
    def __init__(self, reader: ShardReader, config: TransformConfig, seed: int):
        self.reader, self.config, self.seed = reader, config, seed

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, item: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        epoch, position, index = item
        sample = self.reader[index]
        rng = np.random.default_rng([self.seed, epoch, position, index])
        xyz, rgb = transform(sample.xyz, sample.rgb, self.config, rng)
        return torch.from_numpy(xyz), torch.from_numpy(rgb), sample.label


class EvalSet(Dataset):
    """Deterministic test-time transform; items carry their sample index for merging across ranks."""

    def __init__(self, reader: ShardReader, config: TransformConfig):
        self.reader, self.config = reader, config

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        sample = self.reader[index]
        xyz, rgb = transform(sample.xyz, sample.rgb, self.config, None)
        return torch.from_numpy(xyz), torch.from_numpy(rgb), index


class SamplerBatches(Sampler[list[tuple[int, int, int]]]):
    """This rank's batches of one epoch from `start_step` on, as (epoch, position, index) items."""

    def __init__(self, sampler: StratifiedSampler, epoch: int, start_step: int = 0):
        self.sampler, self.epoch, self.start_step = sampler, epoch, start_step

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        s = self.sampler
        first = s.rank * s.local_batch_size
        for step in range(self.start_step, s.steps_per_epoch):
            base = step * s.global_batch_size + first
            yield [(self.epoch, base + j, int(i)) for j, i in enumerate(s.local_batch(self.epoch, step))]


def ignore_preemption_signal(worker_id: int) -> None:
    """DataLoader workers ignore SIGUSR1: SLURM delivers it to every process of the job step and
    only the training process acts on it (under `fork` they inherit its handler anyway; under
    `spawn`/`forkserver` the default action would kill them)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def train_loader(dataset: TrainSet, sampler: StratifiedSampler, epoch: int, start_step: int = 0,
                 num_workers: int = 2, pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_sampler=SamplerBatches(sampler, epoch, start_step), num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=False, prefetch_factor=4 if num_workers else None,
                      worker_init_fn=ignore_preemption_signal)
