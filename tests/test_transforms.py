"""Per-sample transforms against the original's semantics (reference section 2), step by step."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ognet.data.transforms import TransformConfig, is_blank, slim_indices, transform
from ognet.errors import ConfigError

NONE = TransformConfig(slim=1.0, flip=False, scale=False, rotate=False, erase=0.0)  # only centre + colour shift
SEEDS = range(200)


def person(n: int = 400, blanks: np.ndarray | list[int] = (), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small off-centre cloud; colours avoid white and 0.5, except the listed blank (white) points."""
    rng = np.random.default_rng(seed)
    xyz = (rng.normal(size=(n, 3)) * [0.3, 0.8, 0.2] + [5.0, -2.0, 10.0]).astype(np.float32)
    rgb = rng.uniform(0.02, 0.98, size=(n, 3)).astype(np.float32)
    rgb[np.asarray(blanks, dtype=int)] = 1.0
    return xyz, rgb


def centred(xyz: np.ndarray) -> np.ndarray:
    return (xyz - xyz.astype(np.float64).mean(axis=0)).astype(np.float32)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def linspace_pick(candidates: np.ndarray, count: int) -> np.ndarray:
    return candidates[np.linspace(0, len(candidates) - 1, count).astype(int)]


# ------------------------------------------------------------------------------------------------
# Centre, colour shift, P


def test_test_time_without_slim_only_centres_and_shifts_colours():
    xyz, rgb = person(blanks=[3, 7])
    xyz0, rgb0 = xyz.copy(), rgb.copy()
    out_xyz, out_rgb = transform(xyz, rgb, NONE, None)
    assert out_xyz.dtype == out_rgb.dtype == np.float32
    np.testing.assert_allclose(out_xyz, centred(xyz), atol=1e-6)
    np.testing.assert_array_equal(out_rgb, rgb - 0.5)
    assert (out_rgb[[3, 7]] == 0.5).all()  # without slim, white stays white: no blank reset
    np.testing.assert_array_equal(xyz, xyz0)  # inputs untouched
    np.testing.assert_array_equal(rgb, rgb0)


def test_centring_uses_all_n_points_before_slim():
    n = 400
    xyz, rgb = person(n, blanks=np.arange(300, 400))
    xyz[300:, 0] += 50.0  # the blank points sit far away; slim drops them (P = 200 <= 300 coloured)
    out_xyz, _ = transform(xyz, rgb, TransformConfig(slim=0.5), None)
    keep = linspace_pick(np.arange(300), 200)
    np.testing.assert_allclose(out_xyz, centred(xyz)[keep], atol=1e-5)
    assert out_xyz[:, 0].mean() < -10  # centred on all N points, not on the 200 kept


@pytest.mark.parametrize(
    "n,slim,p",
    [
        (8192, 0.5, 4096),
        (6890, 0.5, 3445),
        (400, 0.3, 120),
        (400, 1.0, 400),
        (401, 0.5, 200),
        (403, 0.5, 202),
        (10, 0.25, 2),
    ],
)
def test_slim_keeps_round_n_times_slim_points(n, slim, p):
    """P = round(N * slim) with Python's round (halves to even: 200.5 -> 200, 201.5 -> 202)."""
    assert p == round(n * slim)
    xyz, rgb = person(n)
    out_xyz, out_rgb = transform(xyz, rgb, TransformConfig(slim=slim), None)
    assert out_xyz.shape == out_rgb.shape == (p, 3)


@pytest.mark.parametrize("config", [NONE, TransformConfig(), TransformConfig(rotate=True, erase=0.5)])
def test_colours_come_out_in_minus_half_to_half(config):
    xyz, rgb = person(blanks=[0, 1, 2])
    rgb[5] = 0.0
    for seed in range(20):
        _, out_rgb = transform(xyz, rgb, config, rng(seed))
        assert out_rgb.min() >= -0.5 and out_rgb.max() <= 0.5


# ------------------------------------------------------------------------------------------------
# Blank points


def test_blank_is_mean_colour_within_1e_5_of_one():
    rgb = np.float32(
        [[1, 1, 1], [1, 1, 1 - 2e-5], [1, 1, 1 - 4e-5], [0.99999, 1, 1], [0.9, 1, 1], [0, 0, 0], [1, 0.5, 0.5]]
    )
    np.testing.assert_array_equal(is_blank(rgb), [True, True, False, True, False, False, False])


def test_blank_colour_becomes_zero_after_the_shift():
    blanks = np.arange(0, 250)
    xyz, rgb = person(400, blanks=blanks)  # 150 coloured < P = 200: 50 blanks are kept
    out_xyz, out_rgb = transform(xyz, rgb, TransformConfig(slim=0.5), None)
    keep = slim_indices(rgb, 0.5, None)
    kept_blank = np.isin(keep, blanks)
    assert kept_blank.sum() == 50
    assert (out_rgb[kept_blank] == 0).all()
    np.testing.assert_array_equal(out_rgb[~kept_blank], rgb[keep[~kept_blank]] - 0.5)


# ------------------------------------------------------------------------------------------------
# Slim selection


def test_test_time_selection_is_evenly_spaced_coloured_points():
    blanks = np.array([0, 5, 6, 7, 100, 101, 250, 399])
    xyz, rgb = person(400, blanks=blanks)
    coloured = np.setdiff1d(np.arange(400), blanks)
    keep = slim_indices(rgb, 0.5, None)
    np.testing.assert_array_equal(keep, linspace_pick(coloured, 200))
    out_xyz, out_rgb = transform(xyz, rgb, TransformConfig(slim=0.5), None)
    np.testing.assert_allclose(out_xyz, centred(xyz)[keep], atol=1e-6)
    np.testing.assert_array_equal(out_rgb, rgb[keep] - 0.5)
    # deterministic
    np.testing.assert_array_equal(transform(xyz, rgb, TransformConfig(slim=0.5), None)[0], out_xyz)


def test_train_selection_half_random_from_the_first_coloured_minus_one():
    blanks = np.array([0, 5, 6, 7, 100, 101, 250, 399])
    _, rgb = person(400, blanks=blanks)
    coloured = np.setdiff1d(np.arange(400), blanks)  # 392 coloured, the last one is 398
    evenly = linspace_pick(coloured, 200)
    random_draws = []
    for seed in SEEDS:
        keep = slim_indices(rgb, 0.5, rng(seed))
        assert len(keep) == 200
        if np.array_equal(keep, evenly):
            continue
        random_draws.append(keep)
        assert (np.diff(keep) > 0).all()  # sorted ascending, no repeats: file order is kept
        assert np.isin(keep, coloured[:-1]).all()  # never a blank, never the last coloured point
    assert 70 <= len(random_draws) <= 130  # python random < 0.5: about half of the draws
    counts = np.bincount(np.concatenate(random_draws), minlength=400)
    assert counts[398] == 0
    picked = counts[coloured[:-1]]
    assert picked.min() > 0  # every other coloured point is picked at some time
    # uniform without replacement: each of the 391 candidates is picked with probability 200/391
    expected = len(random_draws) * 200 / 391
    assert abs(picked.mean() - expected) < 1e-9 and picked.std() < 0.2 * expected


def test_train_selection_when_p_equals_coloured_returns_p_minus_one_points():
    """The original permutes range(#coloured - 1): with P == #coloured only P - 1 points come back."""
    blanks = np.arange(1, 400, 2)  # 200 coloured (the even indices), 200 blanks, P = 200
    xyz, rgb = person(400, blanks=blanks)
    coloured = np.arange(0, 400, 2)
    sizes = set()
    for seed in range(40):
        keep = slim_indices(rgb, 0.5, rng(seed))
        if len(keep) == 199:
            np.testing.assert_array_equal(keep, coloured[:-1])
        else:
            np.testing.assert_array_equal(keep, coloured)  # the evenly spaced branch takes them all
        sizes.add(len(keep))
        config = TransformConfig(slim=0.5, flip=False, scale=False)
        assert len(transform(xyz, rgb, config, rng(seed))[0]) == len(keep)
    assert sizes == {199, 200}


def test_more_p_than_coloured_adds_evenly_spaced_blanks():
    blanks = np.r_[np.arange(0, 100), np.arange(250, 400)]  # 150 coloured, 250 blanks, P = 200
    _, rgb = person(400, blanks=blanks)
    expected = np.sort(np.r_[np.arange(100, 250), linspace_pick(blanks, 50)])
    np.testing.assert_array_equal(slim_indices(rgb, 0.5, None), expected)
    for seed in range(10):  # no randomness in this branch, in training either
        np.testing.assert_array_equal(slim_indices(rgb, 0.5, rng(seed)), expected)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(2, 300),
    slim=st.floats(0.05, 0.99),
    blank_fraction=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
    train=st.booleans(),
)
def test_slim_selection_invariants(n, slim, blank_fraction, seed, train):
    g = rng(seed)
    rgb = g.uniform(0, 0.9, size=(n, 3)).astype(np.float32)
    blank = g.random(n) < blank_fraction
    blank[0] = False  # at least one coloured point
    rgb[blank] = 1.0
    coloured, blanks = np.flatnonzero(~blank), np.flatnonzero(blank)
    p = round(n * slim)
    keep = slim_indices(rgb, slim, g if train else None)
    assert (np.diff(keep) > 0).all()
    if p <= len(coloured):
        assert np.isin(keep, coloured).all()
        if len(keep) != p:
            assert train and p == len(coloured) and len(keep) == p - 1
    else:
        assert len(keep) == p
        assert np.isin(coloured, keep).all()
        np.testing.assert_array_equal(np.setdiff1d(keep, coloured), linspace_pick(blanks, p - len(coloured)))


# ------------------------------------------------------------------------------------------------
# Training augmentations, one at a time


def test_flip_negates_x_half_of_the_time():
    xyz, rgb = person()
    c = centred(xyz)
    flipped = 0
    for seed in SEEDS:
        out, _ = transform(xyz, rgb, TransformConfig(slim=1.0, flip=True, scale=False), rng(seed))
        np.testing.assert_allclose(out[:, 1:], c[:, 1:], atol=1e-6)
        if np.allclose(out[:, 0], -c[:, 0], atol=1e-6):
            flipped += 1
        else:
            np.testing.assert_allclose(out[:, 0], c[:, 0], atol=1e-6)
    assert 70 <= flipped <= 130


def scale_interval(out: np.ndarray, c: np.ndarray, jitter: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Per axis, the factors f with |out - f * c| <= jitter at every point: [lo, hi] (empty if lo > hi)."""
    a, b = (out - jitter) / c, (out + jitter) / c
    return np.minimum(a, b).max(axis=0), np.maximum(a, b).min(axis=0)


def test_scale_factors_per_axis_in_range_with_clipped_jitter():
    xyz, rgb = person()
    c = centred(xyz)
    factors = []
    for seed in SEEDS:
        out, _ = transform(xyz, rgb, TransformConfig(slim=1.0, flip=False, scale=True), rng(seed))
        lo, hi = scale_interval(out, c, 0.01 + 1e-6)
        assert (lo <= hi).all()  # one factor per axis explains every point up to a jitter of 0.01
        assert (hi >= 0.75).all() and (lo <= 1.33).all(), (lo, hi)
        assert (hi - lo < 0.02).all()  # and it is pinned down tightly, so the range check means something
        factors.append((lo + hi) / 2)
    factors = np.array(factors)
    assert factors.min() < 0.78 and factors.max() > 1.30  # the whole range is used
    assert np.abs(np.corrcoef(factors.T)[np.triu_indices(3, 1)]).max() < 0.3  # independent per axis


def test_jitter_is_normal_001_clipped_to_001():
    xyz = np.tile(np.float32([3, 4, 5]), (400, 1))  # all points equal: centred to 0, scale has no effect
    rgb = np.full((400, 3), 0.3, np.float32)
    out, _ = transform(xyz, rgb, TransformConfig(slim=1.0, flip=False, scale=True), rng(0))
    assert np.abs(out).max() == np.float32(0.01)
    clipped = (np.abs(out) == np.float32(0.01)).mean()
    assert 0.27 < clipped < 0.37  # P(|N(0, 1)| > 1) = 0.317
    assert 0.0065 < out.std() < 0.0079  # the std of N(0, 0.01^2) clipped at one sigma is 0.00718


def test_rotate_about_the_vertical_axis_as_the_reference_matrix():
    xyz, rgb = person()
    c = centred(xyz)
    angles = []
    for seed in range(50):
        out, _ = transform(xyz, rgb, TransformConfig(slim=1.0, flip=False, scale=False, rotate=True), rng(seed))
        np.testing.assert_allclose(out[:, 1], c[:, 1], atol=1e-6)  # y untouched
        np.testing.assert_allclose(np.hypot(out[:, 0], out[:, 2]), np.hypot(c[:, 0], c[:, 2]), rtol=1e-5, atol=1e-6)
        # (x, z) row vector times [[cos, sin], [-sin, cos]]: recover cos and sin, then compare every point
        x, z, x2, z2 = c[:, 0], c[:, 2], out[:, 0], out[:, 2]
        norm = (x * x + z * z).sum()
        cos, sin = (x * x2 + z * z2).sum() / norm, (x * z2 - z * x2).sum() / norm
        assert abs(cos * cos + sin * sin - 1) < 1e-4
        np.testing.assert_allclose(out[:, [0, 2]], c[:, [0, 2]] @ np.array([[cos, sin], [-sin, cos]]), atol=1e-5)
        angles.append(np.arctan2(sin, cos) % (2 * np.pi))
        # the direction too: theta is this configuration's only draw, U[0, 2 pi) from the generator
        assert abs(angles[-1] - rng(seed).uniform(0, 2 * np.pi)) < 1e-4
    assert min(angles) < 0.5 and max(angles) > 2 * np.pi - 0.5  # U[0, 2 pi)


def test_erase_greys_one_contiguous_block():
    xyz, rgb = person()
    lengths = []
    for seed in SEEDS:
        _, out = transform(xyz, rgb, TransformConfig(slim=1.0, flip=False, scale=False, erase=0.5), rng(seed))
        grey = np.flatnonzero((out == 0).all(axis=1))  # 0.5 before the shift; the input never has 0.5
        if len(grey):
            np.testing.assert_array_equal(grey, np.arange(grey[0], grey[0] + len(grey)))
        assert len(grey) <= round(0.5 * 400)
        rest = np.setdiff1d(np.arange(400), grey)
        np.testing.assert_array_equal(out[rest], rgb[rest] - 0.5)
        lengths.append(len(grey))
    assert 80 < np.mean(lengths) < 120  # L = round(U[0, 1) * erase * P): 100 on average


# ------------------------------------------------------------------------------------------------
# Randomness and configuration

FULL = TransformConfig(slim=0.5, flip=True, scale=True, rotate=True, erase=0.3)


def test_deterministic_given_the_generator_and_inputs_untouched():
    xyz, rgb = person(blanks=[1, 2, 3])
    xyz0, rgb0 = xyz.copy(), rgb.copy()
    a = transform(xyz, rgb, FULL, rng(7))
    b = transform(xyz, rgb, FULL, rng(7))
    c = transform(xyz, rgb, FULL, rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    np.testing.assert_array_equal(xyz, xyz0)
    np.testing.assert_array_equal(rgb, rgb0)


def test_test_time_ignores_the_training_augmentations():
    xyz, rgb = person(blanks=[1, 2, 3])
    a = transform(xyz, rgb, FULL, None)
    b = transform(xyz, rgb, TransformConfig(slim=0.5, flip=False, scale=False, rotate=False, erase=0.0), None)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize(
    "kwargs,message",
    [({"slim": 0.0}, "slim"), ({"slim": 1.5}, "slim"), ({"erase": -0.1}, "erase"), ({"erase": 2.0}, "erase")],
)
def test_config_is_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TransformConfig(**kwargs)
