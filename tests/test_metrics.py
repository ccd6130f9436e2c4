"""Market-protocol ranking: a hand-worked example, a literal per-query reference loop, slicing
across "ranks", bad input."""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ognet import metrics
from ognet.errors import ConfigError, DataError
from ognet.metrics import (
    PerQueryResult,
    evaluate_ranking,
    format_result_line,
    rank_queries,
    reduce_results,
)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: intra-op thread hand-offs cost more than the work (seconds on a
    busy machine). Results do not depend on the thread count (tested below)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(qf, ql, qc, gf, gl, gc, ap="trapezoid"):
    """Reference section 6, one query at a time (evaluate_gpu.py), with two documented choices:
    ties go to the lower gallery index (stable sort of -score instead of argsort reversed), and
    a gallery item of pid -1 is junk even when the query has pid -1 (the original crashes).
    Returns per-query AP, INP and CMC rows (CMC of a query without good match is all 0)."""
    aps, inps, cmcs = [], [], []
    for q in range(len(ql)):
        score = gf @ qf[q]
        index = np.argsort(-score, kind="stable")
        query_index = np.argwhere(gl == ql[q]).flatten()
        camera_index = np.argwhere(gc == qc[q]).flatten()
        good_index = np.setdiff1d(query_index, camera_index, assume_unique=True)
        junk_index = np.append(np.intersect1d(query_index, camera_index), np.argwhere(gl == -1))
        good_index = np.setdiff1d(good_index, junk_index)  # no-op unless the query pid is -1
        cmc = np.zeros(len(gl), dtype=np.int64)
        cmcs.append(cmc)
        if good_index.size == 0:
            aps.append(0.0)
            inps.append(0.0)
            continue
        index = index[np.isin(index, junk_index, invert=True)]  # np.in1d in the original
        rows_good = np.argwhere(np.isin(index, good_index)).flatten()
        cmc[rows_good[0] :] = 1
        ngood = len(good_index)
        ap_value = 0.0
        for i in range(ngood):
            precision = (i + 1) * 1.0 / (rows_good[i] + 1)
            if ap == "trapezoid":
                d_recall = 1.0 / ngood
                old_precision = i * 1.0 / rows_good[i] if rows_good[i] != 0 else 1.0
                ap_value = ap_value + d_recall * (old_precision + precision) / 2
            else:
                ap_value += precision
        if ap == "noninterp":
            ap_value /= ngood
        aps.append(ap_value)
        inps.append(ngood / (rows_good[-1] + 1.0))
    return np.array(aps), np.array(inps), np.array(cmcs)


def random_set(rng, num_query, num_gallery, dim, num_pids, num_cams, integer=False):
    """Random query/gallery with same-camera matches, distractors (pid 0), junk (pid -1) and
    query pids absent from the gallery (no good match). Integer features make many exact ties."""
    if integer:
        qf = rng.integers(-2, 3, (num_query, dim)).astype(np.float64)
        gf = rng.integers(-2, 3, (num_gallery, dim)).astype(np.float64)
    else:
        qf = rng.standard_normal((num_query, dim))
        gf = rng.standard_normal((num_gallery, dim))
    ql = rng.integers(1, num_pids + 2, num_query)  # pid num_pids + 1 is never in the gallery
    gl = rng.integers(-1, num_pids + 1, num_gallery)
    qc = rng.integers(0, num_cams, num_query)
    gc = rng.integers(0, num_cams, num_gallery)
    return qf, ql, qc, gf, gl, gc


def assert_matches_reference(inputs, ap, chunk_size=None, max_rank=None):
    ref_ap, ref_inp, ref_cmc = reference(*inputs, ap=ap)
    per_query = rank_queries(*inputs, ap=ap, chunk_size=chunk_size)
    np.testing.assert_allclose(per_query.ap.numpy(), ref_ap, rtol=1e-12, atol=0)
    np.testing.assert_allclose(per_query.inp.numpy(), ref_inp, rtol=1e-12, atol=0)
    first = np.where(ref_cmc.any(axis=1), ref_cmc.argmax(axis=1), -1)
    assert per_query.first_good.tolist() == first.tolist()

    max_rank = max_rank or ref_cmc.shape[1]
    result = evaluate_ranking(*inputs, ap=ap, chunk_size=chunk_size, max_rank=max_rank)
    cmc = ref_cmc.sum(axis=0) / len(ref_cmc)
    assert result["cmc"] == cmc[:max_rank].tolist()
    assert result["mAP"] == pytest.approx(ref_ap.sum() / len(ref_ap), rel=1e-12, abs=0)
    assert result["mINP"] == pytest.approx(ref_inp.sum() / len(ref_inp), rel=1e-12, abs=0)
    assert result["num_queries"] == len(ref_ap)
    assert result["num_valid_queries"] == int(ref_cmc.any(axis=1).sum())


def hand_worked_example():
    # One-dimensional features, all queries [1.0]: a gallery item's score is its feature.
    # gallery index:    0    1    2    3    4    5    6    7
    gf = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]]).T
    gl = np.array([1, 2, 1, 0, -1, 1, 2, 3])  # 3: distractor pid 0, 4: junk pid -1
    gc = np.array([1, 2, 2, 1, 2, 3, 1, 1])
    qf = np.ones((4, 1))
    ql = np.array([1, 2, 3, 1])
    qc = np.array([1, 1, 1, 2])
    return qf, ql, qc, gf, gl, gc


def test_hand_worked_example():
    # Ranking for every query: 0 1 2 3 4 5 6 7. Ranks below are in the junk-filtered ranking.
    # Query 0 (pid 1, cam 1): junk {0 (same camera), 4 (pid -1)}, good {2, 5}.
    #   filtered 1 2 3 5 6 7: good at ranks 1 and 3 (3 is a distractor in front of 5).
    #   trapezoid AP = 1/2 (0/1 + 1/2)/2 + 1/2 (1/3 + 2/4)/2 = 1/8 + 5/24 = 1/3
    #   non-interpolated AP = (1/2 + 2/4)/2 = 1/2;  INP = 2/(3+1) = 1/2
    # Query 1 (pid 2, cam 1): junk {6, 4}, good {1}; filtered 0 1 2 3 5 7: good at rank 1.
    #   trapezoid AP = 1 (0/1 + 1/2)/2 = 1/4;  non-interpolated 1/2;  INP = 1/2
    # Query 2 (pid 3, cam 1): 7 is the only pid-3 item, same camera: junk. No good match:
    #   CMC 0, AP 0, INP 0, and it still counts in every denominator.
    # Query 3 (pid 1, cam 2): junk {2, 4}, good {0, 5}; filtered 0 1 3 5 6 7: ranks 0 and 3.
    #   trapezoid AP = 1/2 (1 + 1/1)/2 + 1/2 (1/3 + 2/4)/2 = 1/2 + 5/24 = 17/24
    #   (the precision before a good item at rank 0 counts as 1)
    #   non-interpolated AP = (1/1 + 2/4)/2 = 3/4;  INP = 2/4 = 1/2
    # CMC: first good ranks 1, 1, none, 0 -> CMC[0] = 1/4, CMC[r >= 1] = 3/4.
    # mAP = (1/3 + 1/4 + 0 + 17/24)/4 = 31/96; non-interpolated (1/2 + 1/2 + 0 + 3/4)/4 = 7/16
    # mINP = (1/2 + 1/2 + 0 + 1/2)/4 = 3/8
    inputs = hand_worked_example()
    per_query = rank_queries(*inputs)
    assert per_query.first_good.tolist() == [1, 1, -1, 0]
    assert per_query.valid.tolist() == [True, True, False, True]
    assert per_query.ap.tolist() == pytest.approx([1 / 3, 1 / 4, 0, 17 / 24], rel=1e-15)
    assert per_query.inp.tolist() == [0.5, 0.5, 0.0, 0.5]

    result = evaluate_ranking(*inputs, max_rank=8)
    assert result["cmc"] == [0.25] + [0.75] * 7
    assert (result["rank1"], result["rank5"], result["rank10"]) == (0.25, 0.75, 0.75)
    assert result["mAP"] == pytest.approx(31 / 96, rel=1e-15)
    assert result["mINP"] == 0.375
    assert (result["num_queries"], result["num_valid_queries"]) == (4, 3)
    assert format_result_line(result) == "Rank@1:0.250000 Rank@5:0.750000 Rank@10:0.750000 mAP:0.322917"

    noninterp = evaluate_ranking(*inputs, ap="noninterp")
    assert noninterp["mAP"] == 7 / 16
    assert len(noninterp["cmc"]) == 50  # beyond the 6 to 7 ranked items the CMC stays flat
    assert noninterp["cmc"][-1] == 0.75


@pytest.mark.parametrize("ap", ["trapezoid", "noninterp"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, None])
def test_matches_reference_loop(seed, ap, chunk_size):
    rng = np.random.default_rng(seed)
    inputs = random_set(rng, num_query=40, num_gallery=300, dim=16, num_pids=25, num_cams=4)
    assert_matches_reference(inputs, ap, chunk_size)


@pytest.mark.parametrize("seed", [3, 4])
def test_ties_go_to_the_lower_gallery_index(seed):
    rng = np.random.default_rng(seed)
    inputs = random_set(rng, 30, 250, dim=2, num_pids=6, num_cams=3, integer=True)
    for ap in ("trapezoid", "noninterp"):
        assert_matches_reference(inputs, ap, chunk_size=4)
    qf, ql, qc, gf, gl, gc = inputs
    identical = (np.ones_like(qf), ql, qc, np.ones_like(gf), gl, gc)  # a collapsed model
    assert_matches_reference(identical, "trapezoid")


@pytest.mark.parametrize("bins", [(1, 1), (1, 2), (1, 7), (2, 4096)])
def test_bin_count_changes_speed_not_results(monkeypatch, bins):
    monkeypatch.setattr(metrics, "_ITEMS_PER_BIN", bins[0])
    monkeypatch.setattr(metrics, "_MAX_BINS", bins[1])
    rng = np.random.default_rng(5)
    assert_matches_reference(random_set(rng, 25, 200, 8, 10, 3), "trapezoid", chunk_size=6)
    assert_matches_reference(random_set(rng, 25, 200, 2, 10, 3, integer=True), "trapezoid")


def test_float32_features_rank_like_a_full_sort():
    # Small integers are exact in float32, so every summation order gives the same scores.
    rng = np.random.default_rng(6)
    qf, ql, qc, gf, gl, gc = random_set(rng, 30, 400, 3, 8, 3, integer=True)
    f32 = (qf.astype(np.float32), ql, qc, gf.astype(np.float32), gl, gc)
    expected = evaluate_ranking(qf, ql, qc, gf, gl, gc)
    assert evaluate_ranking(*f32) == expected
    assert evaluate_ranking(*(torch.from_numpy(x) for x in f32)) == expected


def test_slices_reduce_like_one_call():
    rng = np.random.default_rng(7)
    qf, ql, qc, gf, gl, gc = random_set(rng, 37, 300, 8, 20, 4)
    whole = rank_queries(qf, ql, qc, gf, gl, gc)
    expected = reduce_results([whole])
    assert expected == evaluate_ranking(qf, ql, qc, gf, gl, gc)
    for bounds in ([0, 37], [0, 5, 37], [0, 1, 30, 37], [0, 12, 13, 37]):  # 1, 2, 3 "ranks"
        parts = [
            rank_queries(qf[a:b], ql[a:b], qc[a:b], gf, gl, gc, chunk_size=b - a if a else 2)
            for a, b in zip(bounds, bounds[1:])
        ]
        merged = PerQueryResult.cat(parts)
        assert torch.equal(merged.ap, whole.ap) and torch.equal(merged.inp, whole.inp)
        assert torch.equal(merged.first_good, whole.first_good)
        assert reduce_results(parts) == expected


def test_float32_results_do_not_depend_on_slicing_or_threads():
    # Unit features at a realistic size: many same-pid items and scores a few ulps apart, where
    # products of a few query rows (rounded differently by MKL) changed 3 of 40 APs before chunks
    # were padded to _MIN_ROWS.
    g = torch.Generator().manual_seed(0)
    qf = torch.nn.functional.normalize(torch.randn(40, 512, generator=g), dim=1)
    gf = torch.nn.functional.normalize(torch.randn(20000, 512, generator=g), dim=1)
    qp, qc = torch.randint(0, 10, (40,), generator=g), torch.randint(0, 6, (40,), generator=g)
    gp, gc = torch.randint(0, 10, (20000,), generator=g), torch.randint(0, 6, (20000,), generator=g)
    whole = rank_queries(qf, qp, qc, gf, gp, gc)
    for bounds, chunk_size in (([0, 1, 3, 40], None), ([0, 7, 40], 5), ([0, 40], 1)):
        parts = PerQueryResult.cat(
            [
                rank_queries(qf[a:b], qp[a:b], qc[a:b], gf, gp, gc, chunk_size=chunk_size)
                for a, b in zip(bounds, bounds[1:])
            ]
        )
        assert torch.equal(parts.ap, whole.ap) and torch.equal(parts.first_good, whole.first_good)
    torch.set_num_threads(2)
    assert torch.equal(rank_queries(qf, qp, qc, gf, gp, gc, chunk_size=7).ap, whole.ap)


def test_cmc_length_and_short_gallery():
    qf, ql, qc, gf, gl, gc = hand_worked_example()
    short = evaluate_ranking(qf, ql, qc, gf, gl, gc, max_rank=3)
    assert short["cmc"] == [0.25, 0.75, 0.75] and short["rank10"] == 0.75
    # A gallery shorter than 10: ranks past its end keep the last CMC value.
    tiny = evaluate_ranking(qf[:1], ql[:1], qc[:1], gf[2:4], gl[2:4], gc[2:4])
    assert tiny["cmc"] == [1.0] * 50 and tiny["mAP"] == 1.0


def test_gallery_of_junk_only():
    qf, ql, qc, gf, gl, gc = hand_worked_example()
    result = evaluate_ranking(qf, ql, qc, gf, np.full_like(gl, -1), gc)
    assert result["num_valid_queries"] == 0 and result["mAP"] == 0.0 and result["rank1"] == 0.0


def test_descending_key_orders_like_a_stable_descending_sort():
    tiny = torch.finfo(torch.float32).tiny
    values = [0.0, -0.0, 1.0, -1.0, tiny / 4, -tiny / 4, 3e38, -3e38, 0.5, -0.5, 0.0, 1.0]
    for dtype in (torch.float32, torch.float64):
        scores = torch.tensor(values, dtype=dtype)
        by_key = torch.argsort(metrics._descending_key(scores), stable=True)
        assert by_key.tolist() == torch.sort(scores, descending=True, stable=True).indices.tolist()


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_query=st.integers(1, 12),
    num_gallery=st.integers(1, 60),
    num_pids=st.integers(1, 6),
    integer=st.booleans(),
    chunk_size=st.integers(1, 13),
    ap=st.sampled_from(["trapezoid", "noninterp"]),
)
def test_property_matches_reference(seed, num_query, num_gallery, num_pids, integer, chunk_size, ap):
    rng = np.random.default_rng(seed)
    inputs = random_set(rng, num_query, num_gallery, 3, num_pids, 3, integer)
    assert_matches_reference(inputs, ap, chunk_size)


def valid_inputs():
    qf, ql, qc, gf, gl, gc = hand_worked_example()
    return dict(
        query_features=qf,
        query_pids=ql,
        query_camids=qc,
        gallery_features=gf,
        gallery_pids=gl,
        gallery_camids=gc,
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(query_features=np.ones((0, 1)), query_pids=[], query_camids=[]), "query set is empty"),
        (dict(gallery_features=np.ones((0, 1)), gallery_pids=[], gallery_camids=[]), "gallery set is empty"),
        (dict(query_pids=np.array([1, 2, 3])), "query pids must be 1-D with one entry per feature row"),
        (dict(gallery_camids=np.ones(9, dtype=int)), "gallery camids must be 1-D"),
        (dict(query_pids=np.ones((4, 1), dtype=int)), "query pids must be 1-D"),
        (dict(gallery_pids=np.ones(8)), "gallery pids must be integers"),
        (dict(query_features=np.ones(4)), "query features must be 2-D"),
        (dict(gallery_features=np.ones((8, 1, 1))), "gallery features must be 2-D"),
        (dict(query_features=np.ones((4, 2))), "dimension 2 but gallery features 1"),
        (dict(query_features=np.array([[1.0], [np.nan], [1.0], [1.0]])), "NaN or inf (first at row 1)"),
        (dict(gallery_features=np.array([[1.0]] * 7 + [[np.inf]])), "gallery features contain NaN or inf"),
        (
            dict(
                query_features=np.full((4, 1), 1e30, dtype=np.float32),
                gallery_features=np.full((8, 1), 1e30, dtype=np.float32),
            ),
            "too large",
        ),
    ],
)
def test_bad_input_is_a_data_error(change, message):
    with pytest.raises(DataError, match=re.escape(message)):
        evaluate_ranking(**{**valid_inputs(), **change})


@pytest.mark.parametrize(
    "options, message",
    [(dict(ap="interp"), "ap must be one of"), (dict(chunk_size=0), "chunk_size"), (dict(max_rank=0), "max_rank")],
)
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        evaluate_ranking(**valid_inputs(), **options)


def test_reduce_needs_results():
    empty = PerQueryResult(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    for results in ([], [empty]):
        with pytest.raises(DataError, match="no query results"):
            reduce_results(results)


def test_chunk_size_follows_the_memory_budget(monkeypatch):
    seen = []
    real = metrics._rank_chunk
    monkeypatch.setattr(metrics, "_rank_chunk", lambda qf, *rest: seen.append(len(qf)) or real(qf, *rest))
    qf, ql, qc, gf, gl, gc = hand_worked_example()  # 7 gallery items after dropping pid -1
    qf, ql, qc = np.ones((10, 1)), np.ones(10, dtype=int), np.zeros(10, dtype=int)
    budget = 3 * 7 * 20  # three queries of float32 (2 x 4 + 12 bytes per entry)
    rank_queries(qf.astype(np.float32), ql, qc, gf.astype(np.float32), gl, gc, max_bytes=budget)
    assert seen == [3, 3, 3, 1]
    seen.clear()
    rank_queries(qf, ql, qc, gf, gl, gc, max_bytes=budget)  # float64: 2 x 8 + 12 bytes per entry
    assert seen == [2] * 5


def test_input_types():
    with pytest.raises(DataError, match="query pids are not an array of numbers"):
        evaluate_ranking(**{**valid_inputs(), "query_pids": ["a", "b", "c", "d"]})
    expected = evaluate_ranking(**valid_inputs())
    inputs = valid_inputs()
    for features in (inputs["gallery_features"][::-1][::-1], torch.from_numpy(inputs["gallery_features"])):
        assert evaluate_ranking(**{**inputs, "gallery_features": features}) == expected
    # Integer and float16 features (whose range difference overflows float16) are ranked in float32.
    large = {
        **inputs,
        "query_features": np.array([[6e4], [-6e4], [1], [1]], dtype=np.float16),
        "gallery_features": (inputs["gallery_features"] * 10).astype(np.int64) - 4,
    }
    assert evaluate_ranking(**large)["num_queries"] == 4


def reference_metrics(qf, ql, qc, gf, gl, gc, ap="trapezoid") -> dict:
    """The headline numbers of the per-query loop above: an independent check of a whole
    evaluation's metrics (other tests import it)."""
    aps, inps, cmcs = reference(np.asarray(qf), ql, qc, np.asarray(gf), gl, gc, ap)
    cmc = cmcs.mean(0)
    return {"rank1": cmc[0], "rank5": cmc[4], "rank10": cmc[9], "mAP": aps.mean(), "mINP": inps.mean()}


def assert_metrics_match_reference(metrics: dict, reference: dict) -> None:
    for key, value in reference.items():
        assert metrics[key] == pytest.approx(value, rel=0, abs=1e-12), key
