"""What training and evaluation build from the config's data section: the reader of a split and
the training data of one rank (index, stratified sampler, augmenting dataset, loader).

`data.access` picks how: `indexed` reads the samples the exact stratified sampler gives each rank,
by offset; `stream` reads shards front to back and draws identity-balanced batches from a buffer
(ognet.data.stream). Both give the trainer the same interface (`train_data`), and evaluation the
same batches (`stream_eval_loader` for stream mode)."""

from __future__ import annotations

from torch.utils.data import DataLoader

from ognet import dist
from ognet.config import Config, DataConfig, eval_transforms, train_transforms
from ognet.data.dataset import TrainSet, ignore_preemption_signal, train_loader
from ognet.data.fetch import ReadOptions
from ognet.data.sampler import StratifiedSampler
from ognet.data.shards import ShardReader, join_location
from ognet.data.stream import StreamConfig, StreamEvalSet, StreamTrainSet


def open_split(data: DataConfig, split: str) -> ShardReader:
    """The reader of `<data.root>/<split>` (a folder, fsspec URL or `pipe:` template), reading
    remote shards as the data.* keys say (ognet.data.fetch)."""
    return ShardReader(join_location(data.root, split), options=ReadOptions.from_config(data))


class TrainData:
    """This rank's training batches, read by index from the packed split: every rank draws the same
    global schedule from the stratified sampler and reads only its part of each batch."""

    def __init__(self, config: Config, info: dist.DistInfo):
        t, s = config.train, config.sampler
        self.reader = open_split(config.data, config.data.train_split)
        self.num_samples, self.num_classes = len(self.reader), self.reader.index.num_classes
        self.sampler = StratifiedSampler(
            self.reader.index.labels,
            self.reader.index.camids,
            global_batch_size=t.global_batch_size,
            mode=s.mode,
            seed=t.seed,
            world_size=info.world_size,
            rank=info.rank,
            k=s.k,
            camera_aware=s.camera_aware,
        )
        self.local_batch_size = self.sampler.local_batch_size
        steps = self.sampler.steps_per_epoch
        self.steps_per_epoch = min(steps, t.max_steps_per_epoch) if t.max_steps_per_epoch else steps
        self.dataset = TrainSet(self.reader, train_transforms(config.data), t.seed, config.data.bad_samples)
        self.num_workers, self.pin_memory = config.data.num_workers, info.device.type == "cuda"

    def loader(self, epoch: int, start_step: int = 0) -> DataLoader:
        """Batches (xyz, rgb, labels[, replaced]) of `epoch` from `start_step` on; `replaced` (with
        data.bad_samples=skip) marks samples that stand in for unreadable ones."""
        return train_loader(
            self.dataset, self.sampler, epoch, start_step, self.num_workers, self.pin_memory, self.steps_per_epoch
        )


class StreamTrainData(TrainData):
    """This rank's training batches streamed from the shards (data.access=stream): the same
    interface, the exact sampler's number of steps per epoch (the index says how many samples
    there are), batches drawn by identity-balanced buffers in the DataLoader workers."""

    def __init__(self, config: Config, info: dist.DistInfo):
        super().__init__(config, info)  # the index, and the exact sampler's steps per epoch
        t, s = config.train, config.sampler
        self.stream = StreamConfig(
            mode=s.mode,
            k=s.k,
            camera_aware=s.camera_aware,
            seed=t.seed,
            rank=info.rank,
            world_size=info.world_size,
            global_batch_size=t.global_batch_size,
            steps_per_epoch=self.steps_per_epoch,
            buffer=config.data.stream_buffer,
            transforms=train_transforms(config.data),
            bad_samples=config.data.bad_samples,
        )

    def loader(self, epoch: int, start_step: int = 0) -> DataLoader:
        """Batches (xyz, rgb, labels[, left_out]) of `epoch` from `start_step` on; `left_out` (with
        data.bad_samples=skip) sums to the unreadable samples the stream skipped or replaced."""
        return DataLoader(
            StreamTrainSet(self.reader, self.stream, epoch, start_step),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=2 if self.num_workers else None,
            worker_init_fn=ignore_preemption_signal,
        )


def train_data(config: Config, info: dist.DistInfo) -> TrainData:
    """The training data of this rank as `data.access` says."""
    return (StreamTrainData if config.data.access == "stream" else TrainData)(config, info)


def stream_eval_loader(reader: ShardReader, config: Config, info: dist.DistInfo) -> DataLoader:
    """This rank's part of an evaluation split in stream mode (shard i on rank i mod world size),
    as `collate_eval` batches (xyz, rgb, sample indices, unreadable sample indices)."""
    dataset = StreamEvalSet(
        reader,
        eval_transforms(config.data),
        info.rank,
        info.world_size,
        config.eval.batch_size,
        config.data.bad_samples,
    )
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=config.data.num_workers,
        pin_memory=info.device.type == "cuda",
        worker_init_fn=ignore_preemption_signal,
    )
