"""The original's schedule as pure functions of (epoch, step): a resume recomputes it exactly."""

from __future__ import annotations

import math

import numpy as np

from ognet.config import OptimConfig


def learning_rate(optim: OptimConfig, epochs: int, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Cosine annealing stepped once per epoch down to min_lr_ratio * lr (the original), with an
    optional linear warm-up over the first `lr_warmup_epochs` (per step)."""
    o = optim
    lr = o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * (1 + math.cos(math.pi * epoch / epochs)) / 2)
    if epoch < o.lr_warmup_epochs:
        lr *= (epoch * steps_per_epoch + step + 1) / (o.lr_warmup_epochs * steps_per_epoch)
    return lr


def averages_epoch(epoch: int, wa_start: float, epochs: int) -> bool:
    """Whether weight averaging takes the weights after `epoch`: the original compares
    `epoch >= wa_start * epochs` as floats (so 0.9 x 15 = 13.5 starts at epoch 14)."""
    return epoch >= wa_start * epochs


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The seed of the step's dropout (torch's global generator), the same on every replay."""
    return int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1)[0])
