"""The training and evaluation data of a run, as the trainer sees it: one object per
`data.access` mode with the same small interface.

    data = train_data(config, info)
    data.num_samples, data.num_classes, data.steps_per_epoch   # steps capped by train.max_steps_per_epoch
    for xyz, rgb, labels, *replaced in data.loader(epoch, start_step): ...
    for xyz, rgb, index, unreadable in eval_batches(config, info, config.data.query_split): ...

`indexed` reads the samples the exact stratified sampler gives each rank, by offset; `stream`
reads shards front to back and draws identity-balanced batches from a buffer (ognet.data.stream).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch.utils.data import DataLoader, Subset

from ognet.data.dataset import EvalSet, TrainSet, collate_eval, ignore_preemption_signal, train_loader
from ognet.data.sampler import StratifiedSampler
from ognet.data.shards import ShardIndex, open_split
from ognet.data.stream import StreamConfig, StreamEvalSet, StreamTrainSet
from ognet.data.transforms import TransformConfig


def transforms_of(config) -> TransformConfig:
    d = config.data
    return TransformConfig(slim=d.slim, flip=d.flip, scale=d.scale, rotate=d.rotate, erase=d.erase)


class IndexedTrainData:
    """Exact stratified sampling (ognet.data.sampler), samples read by offset."""

    def __init__(self, config, info):
        t = config.train
        self.reader = open_split(config.data, config.data.train_split)
        self.index: ShardIndex = self.reader.index
        self.sampler = StratifiedSampler(
            self.index.labels,
            self.index.camids,
            global_batch_size=t.global_batch_size,
            mode=config.sampler.mode,
            seed=t.seed,
            world_size=info.world_size,
            rank=info.rank,
            k=config.sampler.k,
            camera_aware=config.sampler.camera_aware,
        )
        self.steps_per_epoch = _capped(self.sampler.steps_per_epoch, t.max_steps_per_epoch)
        self.dataset = TrainSet(self.reader, transforms_of(config), t.seed, config.data.bad_samples)
        self.num_workers, self.pin_memory = config.data.num_workers, info.device.type == "cuda"

    @property
    def num_samples(self) -> int:
        return len(self.index)

    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    @property
    def local_batch_size(self) -> int:
        """Samples per rank and step (DeepSpeed's micro-batch)."""
        return self.sampler.local_batch_size

    def loader(self, epoch: int, start_step: int = 0) -> Iterable:
        return train_loader(self.dataset, self.sampler, epoch, start_step, self.num_workers, self.pin_memory)


class StreamTrainData(IndexedTrainData):
    """Shards streamed by the DataLoader workers, identity-balanced batches from a buffer. The
    epoch has as many steps as the exact sampler's (the index says how many samples there are)."""

    def __init__(self, config, info):
        super().__init__(config, info)  # the index and the exact sampler's step count
        t = config.train
        self.stream = StreamConfig(
            mode=config.sampler.mode,
            k=config.sampler.k,
            camera_aware=config.sampler.camera_aware,
            seed=t.seed,
            rank=info.rank,
            world_size=info.world_size,
            global_batch_size=t.global_batch_size,
            steps_per_epoch=self.steps_per_epoch,
            buffer=config.data.stream_buffer,
            transforms=transforms_of(config),
            bad_samples=config.data.bad_samples,
        )

    def loader(self, epoch: int, start_step: int = 0) -> Iterable:
        return DataLoader(
            StreamTrainSet(self.reader, self.stream, epoch, start_step),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=2 if self.num_workers else None,
            worker_init_fn=ignore_preemption_signal,
        )


def train_data(config, info) -> IndexedTrainData:
    """The training data component for `config.data.access`."""
    return (StreamTrainData if config.data.access == "stream" else IndexedTrainData)(config, info)


def eval_batches(config, info, split: str) -> tuple[ShardIndex, Iterable]:
    """The index of an evaluation split and this rank's batches of it: (xyz, rgb, sample indices,
    unreadable sample indices), as `collate_eval` makes them. Indexed: a contiguous slice of the
    samples; stream: every world_size-th shard, streamed."""
    reader = open_split(config.data, split)
    transforms = TransformConfig(slim=config.data.slim)
    if config.data.access == "stream":
        dataset = StreamEvalSet(
            reader, transforms, info.rank, info.world_size, config.eval.batch_size, config.data.bad_samples
        )
        kwargs = {"batch_size": None}
    else:
        from ognet.evaluate import rank_slice  # the lead's module; imported late: it imports this package

        dataset = Subset(EvalSet(reader, transforms, config.data.bad_samples), rank_slice(len(reader), info).tolist())
        kwargs = {"batch_size": config.eval.batch_size, "collate_fn": collate_eval}
    loader = DataLoader(
        dataset,
        num_workers=config.data.num_workers,
        pin_memory=info.device.type == "cuda",
        worker_init_fn=ignore_preemption_signal,
        **kwargs,
    )
    return reader.index, loader


def _capped(steps: int, max_steps: int) -> int:
    return min(steps, max_steps) if max_steps else steps
