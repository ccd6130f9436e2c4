"""The distributed stratified sampler: a pure function of (seed, epoch, step, rank, world size).

Every rank draws the same global batch schedule from the same seed and keeps its own contiguous
part of each global batch, so no communication is needed, every rank runs the same number of
steps, and resuming at any (epoch, step) replays exactly the same stream. The global batch size
is fixed whatever the world size.

Modes:
- `balance`: the original `--balance`: N draws with replacement, weight N/count(class).
- `class_sampler`: the original `--class_sampler K`: ceil(N/C/K) shuffled passes over C*K items,
  item i -> a random image of class i mod C, drop_last per pass.
- `shuffle`: a permutation per epoch.
- `pk`: P = B/K identities x K instances; each rank's slice holds whole identities.
All modes drop the last incomplete batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal, get_args

import numpy as np

from ognet.errors import ConfigError

SamplerMode = Literal["balance", "class_sampler", "shuffle", "pk"]
MODES: tuple[str, ...] = get_args(SamplerMode)


class StratifiedSampler:
    """Sample indices of a training set with labels (and cameras), batch by batch.

    `k` is the images per class per pass in `class_sampler` mode and the instances per identity
    in `pk` mode; `camera_aware` (pk only) picks an identity's instances from as many different
    cameras as possible.
    """

    def __init__(
        self,
        labels: Sequence[int],
        camids: Sequence[int] | None = None,
        *,
        global_batch_size: int,
        mode: SamplerMode = "balance",
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        k: int = 4,
        camera_aware: bool = False,
    ) -> None:
        labels = np.asarray(labels)
        self.check_options(mode, k, camera_aware, global_batch_size)
        if labels.ndim != 1 or len(labels) == 0:
            raise ConfigError(f"the sampler needs a non-empty 1-D list of labels, got shape {labels.shape}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        if global_batch_size % world_size:
            raise ConfigError(
                f"global_batch_size {global_batch_size} is not a positive multiple of the world size "
                f"{world_size}: every rank must get the same number of samples"
            )
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        if camera_aware and (camids is None or len(camids) != len(labels)):
            raise ConfigError("camera_aware needs one camera id per sample")

        self.mode, self.seed, self.k, self.camera_aware = mode, seed, k, camera_aware
        self.world_size, self.rank = world_size, rank
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.camids = None if camids is None else np.asarray(camids)
        self.num_samples = len(labels)

        _, class_of = np.unique(labels, return_inverse=True)
        self.counts = np.bincount(class_of)
        self.num_classes = len(self.counts)
        # Sample indices grouped by class: class c owns by_class[starts[c] : starts[c] + counts[c]].
        self.by_class = np.argsort(class_of, kind="stable")
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.balance_p = 1.0 / self.counts[class_of]
        self.balance_p /= self.balance_p.sum()

        self.steps_per_epoch = self._count_steps()
        self._cache: tuple[int, np.ndarray] | None = None

    @staticmethod
    def check_options(mode: str, k: int, camera_aware: bool, global_batch_size: int) -> None:
        """What the options alone decide, before any label is read (the config calls it too)."""
        if mode not in MODES:
            raise ConfigError(f"sampler.mode {mode!r} is not one of {', '.join(MODES)}")
        if k < 1 or global_batch_size < 1:
            raise ConfigError(f"sampler.k and global_batch_size must be >= 1, got {k} and {global_batch_size}")
        if camera_aware and mode != "pk":
            raise ConfigError(f"sampler.camera_aware applies to sampler.mode pk only, not {mode!r}")
        if mode == "pk" and global_batch_size % k:
            raise ConfigError(
                f"train.global_batch_size {global_batch_size} is not a multiple of sampler.k {k} "
                "(P identities x K instances)"
            )

    def _count_steps(self) -> int:
        n, c, b, k = self.num_samples, self.num_classes, self.global_batch_size, self.k
        if self.mode == "pk":
            if b % k or (b // k) % self.world_size:
                raise ConfigError(
                    f"pk sampling: global_batch_size {b} must be P*k identities x instances with "
                    f"k {k} and P divisible by the world size {self.world_size}, so that every "
                    "rank gets whole identities"
                )
            steps = c // (b // k)
        elif self.mode == "class_sampler":
            steps = self.passes * (c * k // b)
        else:
            steps = n // b
        if steps == 0:
            raise ConfigError(
                f"sampler mode {self.mode!r}: {n} samples of {c} classes give no full batch of "
                f"global_batch_size {b}: lower global_batch_size (or use fewer ranks)"
            )
        return steps

    @property
    def passes(self) -> int:
        """Passes over the C*K items per epoch in class_sampler mode: ceil(N / C / K) as the original."""
        return -(-self.num_samples // (self.num_classes * self.k))

    def global_batch(self, epoch: int, step: int) -> np.ndarray:
        """Sample indices of the whole global batch, identical on every rank."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} is outside the epoch's {self.steps_per_epoch} steps")
        return self._schedule(epoch)[step].copy()

    def local_batch(self, epoch: int, step: int) -> np.ndarray:
        """This rank's contiguous part of the global batch: positions [r*B/W, (r+1)*B/W)."""
        start = self.rank * self.local_batch_size
        return self.global_batch(epoch, step)[start : start + self.local_batch_size]

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[np.ndarray]:
        """This rank's batches of one epoch from `start_step` on (a resume starts mid-epoch)."""
        for step in range(start_step, self.steps_per_epoch):
            yield self.local_batch(epoch, step)

    def _schedule(self, epoch: int) -> np.ndarray:
        """The epoch's (steps, B) index table, drawn once from (seed, epoch) and kept for the epoch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._cache = (epoch, self._draw(rng))
        return self._cache[1]

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        steps, b = self.steps_per_epoch, self.global_batch_size
        if self.mode == "shuffle":
            flat = rng.permutation(self.num_samples)
        elif self.mode == "balance":
            flat = rng.choice(self.num_samples, size=self.num_samples, replace=True, p=self.balance_p)
        elif self.mode == "class_sampler":
            per_pass = steps // self.passes * b
            flat = np.concatenate([self._class_pass(rng)[:per_pass] for _ in range(self.passes)])
        else:
            ids = rng.permutation(self.num_classes)[: steps * (b // self.k)]
            flat = np.concatenate([self._instances(rng, c) for c in ids])
        return flat[: steps * b].reshape(steps, b)

    def _class_pass(self, rng: np.random.Generator) -> np.ndarray:
        """C*K items, item i -> a uniformly random image of class i mod C, shuffled."""
        cls = np.arange(self.num_classes * self.k) % self.num_classes
        picks = self.by_class[self.starts[cls] + rng.integers(0, self.counts[cls])]
        return rng.permutation(picks)

    def _instances(self, rng: np.random.Generator, c: int) -> np.ndarray:
        """K images of class c: distinct when it has K, topped up with repeats only when it has fewer."""
        members = rng.permutation(self.by_class[self.starts[c] : self.starts[c] + self.counts[c]])
        if self.camera_aware:
            members = _interleave_cameras(rng, members, self.camids[members])
        if len(members) >= self.k:
            return members[: self.k]
        return np.concatenate([members, rng.choice(members, self.k - len(members))])


def _interleave_cameras(rng: np.random.Generator, members: np.ndarray, cams: np.ndarray) -> np.ndarray:
    """Reorder (already shuffled) images in rounds of one image per camera, cameras in random order,
    so that the first K images cover as many cameras as there are."""
    _, cam = np.unique(cams, return_inverse=True)
    cam_rank = rng.permutation(cam.max() + 1)[cam]
    by_cam = np.argsort(cam, kind="stable")
    first_of_cam = np.searchsorted(cam[by_cam], cam[by_cam])
    round_of = np.empty(len(members), dtype=np.int64)
    round_of[by_cam] = np.arange(len(members)) - first_of_cam
    return members[np.lexsort((cam_rank, round_of))]
