"""Per-sample transforms of the original (`market3d.Market3DFolder.__getitem__`), step by step.

Training: centre -> flip -> slim -> scale + clipped jitter -> rotate -> erase -> colour shift.
Test: centre -> slim (deterministic, evenly spaced) -> colour shift.

All randomness comes from the `numpy.random.Generator` passed in, which the dataset seeds from
(seed, epoch, stream position, sample index): every worker and rank draws differently, and a run
replays exactly. The original drew from unseeded python `random` and a numpy state that
DataLoader workers did not reseed (its draws repeated across workers and epochs); we keep its
distributions and constants, not that bug.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ognet.errors import ConfigError

BLANK_TOLERANCE = 1e-5  # a point is blank (pure white) if mean(r, g, b) is within this of 1


@dataclass(frozen=True)
class TransformConfig:
    slim: float = 0.5  # keep round(N * slim) points; 1 keeps all (no blank handling)
    flip: bool = True  # train: x <- -x with probability 0.5
    scale: bool = True  # train: per-axis factor ~ U(0.75, 1.33), then jitter N(0, 0.01^2) clipped to +-0.01
    rotate: bool = False  # train: rotation about the vertical axis by U[0, 2 pi)
    erase: float = 0.0  # train: grey out a contiguous index block of up to erase * P points

    def __post_init__(self) -> None:
        if not 0 < self.slim <= 1:
            raise ConfigError(f"data.slim must be in (0, 1], got {self.slim}")
        if not 0 <= self.erase <= 1:
            raise ConfigError(f"data.erase must be in [0, 1], got {self.erase}")


def transform(
    xyz: np.ndarray, rgb: np.ndarray, config: TransformConfig, rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the original's per-sample pipeline. `rng=None` means test time (deterministic).

    Returns float32 xyz (P, 3) and rgb (P, 3) with colours shifted to [-0.5, 0.5].
    """
    train = rng is not None
    xyz = xyz - column_means(xyz).astype(np.float32)
    if train and config.flip and rng.random() < 0.5:
        xyz[:, 0] = -xyz[:, 0]
    if config.slim < 1:
        keep = slim_indices(rgb, config.slim, rng)
        # np.take: a fancy-index gather of rows costs several times more
        xyz, rgb = np.take(xyz, keep, axis=0), np.take(rgb, keep, axis=0)
        rgb[is_blank(rgb)] = 0.5  # blankness is per point: testing the kept ones is enough
    else:
        rgb = rgb.copy()
    if train and config.scale:
        xyz = xyz * rng.uniform(0.75, 1.33, size=3).astype(np.float32)
        xyz = xyz + np.clip(rng.normal(0.0, 0.01, size=xyz.shape), -0.01, 0.01).astype(np.float32)
    if train and config.rotate:
        theta = rng.uniform(0, 2 * np.pi)
        c, s = np.cos(theta), np.sin(theta)
        x, z = xyz[:, 0].copy(), xyz[:, 2].copy()
        xyz[:, 0], xyz[:, 2] = x * c - z * s, x * s + z * c
    if train and config.erase > 0:
        length = int(round(rng.random() * config.erase * len(rgb)))
        start = int(rng.integers(0, max(len(rgb) - length, 1)))
        rgb[start : start + length] = 0.5
    return xyz.astype(np.float32, copy=False), (rgb - 0.5).astype(np.float32, copy=False)


def column_means(a: np.ndarray) -> np.ndarray:
    """Float64 mean of each column; `a.mean(axis=0)` of an (N, 3) array runs a slow 3-long inner loop."""
    return np.array([a[:, k].sum(dtype=np.float64) for k in range(a.shape[1])]) / len(a)


def is_blank(rgb: np.ndarray) -> np.ndarray:
    # the same float32 sums as rgb.mean(axis=1), without its slow 3-long inner loop
    return np.abs((rgb[:, 0] + rgb[:, 1] + rgb[:, 2]) / 3 - 1.0) < BLANK_TOLERANCE


def slim_indices(rgb: np.ndarray, slim: float, rng: np.random.Generator | None) -> np.ndarray:
    """Indices of the points the original keeps, ascending (file order preserved).

    P = round(N * slim). Coloured (non-blank) points are preferred: in training, half of the time
    a random subset of the first #coloured - 1 coloured points (the original's permutation of
    range(#coloured - 1): the last coloured point is never picked, and only P - 1 points come back
    when P equals #coloured); otherwise evenly spaced coloured points. When there are fewer
    coloured points than P, all of them plus evenly spaced blank points.
    """
    n = len(rgb)
    p = int(round(n * slim))
    blank = is_blank(rgb)
    coloured, blanks = np.flatnonzero(~blank), np.flatnonzero(blank)
    if p <= len(coloured):
        if rng is not None and rng.random() < 0.5:
            # sorting the first p entries of the permutation, by marking them: O(N), no sort
            picked = np.zeros(len(coloured) - 1, dtype=bool)
            picked[rng.permutation(len(coloured) - 1)[:p]] = True
            return coloured[:-1][picked]
        return coloured[np.linspace(0, len(coloured) - 1, p).astype(int)]  # already ascending
    extra = blanks[np.linspace(0, len(blanks) - 1, p - len(coloured)).astype(int)]
    return np.sort(np.concatenate([coloured, extra]))
