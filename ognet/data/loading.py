"""What training and evaluation build from the config's data section: the reader of a split and
the training data of one rank (index, stratified sampler, augmenting dataset, loader)."""

from __future__ import annotations

from torch.utils.data import DataLoader

from ognet import dist
from ognet.config import Config, DataConfig, train_transforms
from ognet.data.dataset import TrainSet, train_loader
from ognet.data.fetch import ReadOptions
from ognet.data.sampler import StratifiedSampler
from ognet.data.shards import ShardReader, join_location


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
