"""The distributed stratified sampler: same global stream on every rank and at every world size,
the original's iteration counts, the modes' statistics, exact resume, and clear errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ognet.data.sampler import MODES, StratifiedSampler
from ognet.errors import ConfigError


def imbalanced_labels(num_classes: int = 40, seed: int = 0) -> np.ndarray:
    """Classes of 1 to 20 images each, shuffled: class c has 1 + c % 20 images."""
    labels = np.repeat(np.arange(num_classes), 1 + np.arange(num_classes) % 20)
    return np.random.default_rng(seed).permutation(labels)


def market_labels() -> np.ndarray:
    """Market-1501 train_all sizes: 751 identities, 12,936 images."""
    counts = np.full(751, 12936 // 751)
    counts[: 12936 % 751] += 1
    return np.repeat(np.arange(751), counts)


def samplers(labels, world_size, **kw) -> list[StratifiedSampler]:
    return [StratifiedSampler(labels, world_size=world_size, rank=r, **kw) for r in range(world_size)]


@pytest.mark.parametrize("mode", MODES)
def test_every_rank_sees_the_same_global_stream_at_every_world_size(mode):
    labels = imbalanced_labels()
    reference = StratifiedSampler(labels, global_batch_size=24, mode=mode, seed=7, k=2)
    for world_size in (1, 2, 3, 4):  # pk: P = 12 identities, divisible by each
        ranks = samplers(labels, world_size, global_batch_size=24, mode=mode, seed=7, k=2)
        assert {s.steps_per_epoch for s in ranks} == {reference.steps_per_epoch}
        for epoch, step in [(0, 0), (0, reference.steps_per_epoch - 1), (3, 1)]:
            expected = reference.global_batch(epoch, step)
            assert len(expected) == 24
            for s in ranks:
                np.testing.assert_array_equal(s.global_batch(epoch, step), expected)
            np.testing.assert_array_equal(np.concatenate([s.local_batch(epoch, step) for s in ranks]), expected)
            assert all(len(s.local_batch(epoch, step)) == 24 // world_size for s in ranks)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=30),
    mode=st.sampled_from(MODES),
    world_size=st.integers(1, 4),
    per_rank=st.integers(1, 4),
    seed=st.integers(0, 2**32),
)
def test_local_slices_tile_the_global_batch(sizes, mode, world_size, per_rank, seed):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    k = 2 if mode in ("pk", "class_sampler") else 4
    batch = world_size * per_rank * (k if mode == "pk" else 1)
    try:
        ranks = samplers(labels, world_size, global_batch_size=batch, mode=mode, seed=seed, k=k)
    except ConfigError:
        return  # too few samples (or identities) for one batch: covered by the error tests
    for epoch in (0, 1):
        for step in range(ranks[0].steps_per_epoch):
            glob = ranks[0].global_batch(epoch, step)
            assert glob.min() >= 0 and glob.max() < len(labels)
            np.testing.assert_array_equal(np.concatenate([s.local_batch(epoch, step) for s in ranks]), glob)


def test_class_sampler_count_equals_the_original_market_schedule():
    # Market-1501 train_all: 751 identities, 12,936 images; --class_sampler 3 at batch 36 gives
    # ceil(12936/751/3) = 6 passes of floor(751*3/36) = 62 iterations.
    labels = market_labels()
    s = StratifiedSampler(labels, global_batch_size=36, mode="class_sampler", k=3, seed=0)
    assert (s.passes, s.steps_per_epoch) == (6, 372)
    schedule = np.stack([s.global_batch(0, step) for step in range(372)])
    for one_pass in schedule.reshape(6, 62 * 36):
        per_class = np.bincount(labels[one_pass], minlength=751)
        assert per_class.max() <= 3 and per_class.sum() == 62 * 36  # K per class, drop_last per pass


def test_balance_and_shuffle_step_counts_equal_the_original():
    labels = market_labels()
    for batch, steps in [(36, 359), (30, 431)]:
        for mode in ("balance", "shuffle"):
            assert StratifiedSampler(labels, global_batch_size=batch, mode=mode).steps_per_epoch == steps


def chi_square_vs_uniform(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def test_balance_draws_every_class_equally_often():
    labels = imbalanced_labels(num_classes=40)
    s = StratifiedSampler(labels, global_batch_size=10, mode="balance", seed=1)
    drawn = np.concatenate([s.global_batch(e, i) for e in range(60) for i in range(s.steps_per_epoch)])
    dof = 40 - 1  # chi-square mean dof, sd sqrt(2 dof): 6 sd is far beyond chance
    assert chi_square_vs_uniform(np.bincount(labels[drawn], minlength=40)) < dof + 6 * np.sqrt(2 * dof)
    # The same test tells plain shuffling (frequencies follow class sizes) apart.
    s = StratifiedSampler(labels, global_batch_size=10, mode="shuffle", seed=1)
    drawn = np.concatenate([s.global_batch(e, i) for e in range(60) for i in range(s.steps_per_epoch)])
    assert chi_square_vs_uniform(np.bincount(labels[drawn], minlength=40)) > 10 * dof


def test_shuffle_is_a_permutation_with_drop_last():
    s = StratifiedSampler(np.arange(50) % 7, global_batch_size=8, mode="shuffle", seed=3)
    drawn = np.concatenate(list(s.epoch_batches(0)))
    assert s.steps_per_epoch == 6 and len(np.unique(drawn)) == 48


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_pk_batches_hold_p_identities_of_k_and_ranks_hold_whole_identities(world_size):
    labels = imbalanced_labels(num_classes=40)
    counts = np.bincount(labels)
    k, p = 4, 6
    ranks = samplers(labels, world_size, global_batch_size=p * k, mode="pk", k=k, seed=5)
    assert ranks[0].steps_per_epoch == 40 // p
    seen = []
    for step in range(ranks[0].steps_per_epoch):
        batch = ranks[0].global_batch(2, step)
        ids = labels[batch].reshape(p, k)
        assert (ids == ids[:, :1]).all() and len(np.unique(ids[:, 0])) == p  # P blocks of K
        for block, pid in zip(batch.reshape(p, k), ids[:, 0]):
            # Distinct images when the identity has K; repeats only to top up smaller ones.
            assert len(np.unique(block)) == min(k, counts[pid])
        slices = [labels[s.local_batch(2, step)] for s in ranks]
        for r, mine in enumerate(slices):
            others = np.concatenate([sl for q, sl in enumerate(slices) if q != r] or [np.array([], int)])
            assert not np.isin(mine, others).any()
            assert (np.bincount(mine)[np.unique(mine)] == k).all()
        seen.extend(ids[:, 0])
    assert len(seen) == len(set(seen))  # each identity at most once per epoch


def test_camera_aware_pk_prefers_distinct_cameras():
    # Identity i has 8 images: 5 from camera 0 and one each from cameras 1, 2, 3.
    labels = np.repeat(np.arange(12), 8)
    camids = np.tile([0, 0, 0, 0, 0, 1, 2, 3], 12)
    aware = StratifiedSampler(labels, camids, global_batch_size=16, mode="pk", k=4, camera_aware=True)
    plain = StratifiedSampler(labels, camids, global_batch_size=16, mode="pk", k=4)
    distinct = {"aware": [], "plain": []}
    for name, s in (("aware", aware), ("plain", plain)):
        for epoch in range(20):
            for batch in s.epoch_batches(epoch):
                distinct[name] += [len(np.unique(camids[block])) for block in batch.reshape(4, 4)]
    assert set(distinct["aware"]) == {4}
    assert np.mean(distinct["plain"]) < 3.5


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_and_resumes_at_any_step(mode):
    labels = imbalanced_labels()
    kw = dict(global_batch_size=12, mode=mode, seed=11, k=3, world_size=2, rank=1)
    s = StratifiedSampler(labels, **kw)
    for epoch in (0, 5):
        full = list(s.epoch_batches(epoch))
        assert len(full) == s.steps_per_epoch
        start = s.steps_per_epoch // 2
        resumed = StratifiedSampler(labels, **kw).epoch_batches(epoch, start_step=start)
        for a, b in zip(full[start:], resumed, strict=True):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(s.global_batch(0, 0), s.global_batch(1, 0))
    other_seed = StratifiedSampler(labels, **{**kw, "seed": 12})
    assert not np.array_equal(s.global_batch(0, 0), other_seed.global_batch(0, 0))


def test_returned_batches_do_not_alias_the_schedule():
    s = StratifiedSampler(np.arange(20) % 5, global_batch_size=4, mode="shuffle")
    before = s.global_batch(0, 0)
    s.local_batch(0, 0)[:] = -1
    np.testing.assert_array_equal(s.global_batch(0, 0), before)


def test_clear_errors():
    labels = np.arange(40) % 8
    with pytest.raises(ConfigError, match="global_batch_size 10 .* world size 4"):
        StratifiedSampler(labels, global_batch_size=10, world_size=4, rank=0)
    with pytest.raises(ConfigError, match="no full batch of global_batch_size 64"):
        StratifiedSampler(labels, global_batch_size=64, mode="shuffle")
    with pytest.raises(ConfigError, match="no full batch"):  # more ranks than samples
        StratifiedSampler(np.arange(3), global_batch_size=4, world_size=4, rank=0)
    with pytest.raises(ConfigError, match="whole identities"):
        StratifiedSampler(labels, global_batch_size=12, mode="pk", k=4, world_size=2, rank=0)  # P = 3
    with pytest.raises(ConfigError, match="no full batch"):  # 8 identities < P = 10
        StratifiedSampler(labels, global_batch_size=20, mode="pk", k=2)
    with pytest.raises(ConfigError, match="not one of"):
        StratifiedSampler(labels, global_batch_size=4, mode="random")
    with pytest.raises(ConfigError, match="camera id"):
        StratifiedSampler(labels, global_batch_size=4, mode="pk", k=2, camera_aware=True)
    with pytest.raises(ConfigError, match="rank 2 is outside"):
        StratifiedSampler(labels, global_batch_size=4, world_size=2, rank=2)
    s = StratifiedSampler(labels, global_batch_size=4)
    with pytest.raises(IndexError):
        s.global_batch(0, s.steps_per_epoch)
