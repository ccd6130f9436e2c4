"""Point ops against brute-force loops that restate the original kernels' semantics one point at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ognet.model import ops

F32 = np.float32


pytestmark = pytest.mark.usefixtures("one_thread")


def fps_brute(points: np.ndarray, m: int) -> list[int]:
    """The modified FPS kernel for one cloud, point by point, in float32 (ties: lowest index)."""
    p = points.astype(F32)
    valid = [float(x * x + y * y + z * z) > 1e-3 for x, y, z in p]
    dist = [F32(1e10)] * len(p)
    picked = [0]
    for _ in range(1, m):
        lx, ly, lz = p[picked[-1]]
        best, best_i = F32(-1), 0
        for k, (x, y, z) in enumerate(p):
            if not valid[k]:
                continue
            d = (x - lx) * (x - lx) + (y - ly) * (y - ly) + (z - lz) * (z - lz)
            dist[k] = min(d, dist[k])
            if dist[k] > best:
                best, best_i = dist[k], k
        picked.append(best_i)
    return picked


def ball_query_brute(points: np.ndarray, centres: np.ndarray, radius: float, nsample: int) -> list[list[int]]:
    """The ball-query kernel: scan in index order, keep the first nsample with d^2 < r^2, pad with the first."""
    p, c = points.astype(F32), centres.astype(F32)
    r2 = F32(radius) * F32(radius)
    out = []
    for cx, cy, cz in c:
        hits = []
        for k, (x, y, z) in enumerate(p):
            d2 = (cx - x) * (cx - x) + (cy - y) * (cy - y) + (cz - z) * (cz - z)
            if d2 < r2:
                hits.append(k)
                if len(hits) == nsample:
                    break
        out.append(hits + [hits[0]] * (nsample - len(hits)) if hits else [0] * nsample)
    return out


def knn_scores_brute(points: np.ndarray) -> np.ndarray:
    """-|a - b|^2 for every pair, in float64."""
    p = points.astype(np.float64)
    return -((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)


def grid_cloud(rng: np.random.Generator, batch: int, n: int) -> torch.Tensor:
    """Coordinates on a 0.25 grid (exact float arithmetic: exact ties, exact radius boundaries),
    with duplicated points and points at or near the origin."""
    pts = rng.integers(-4, 5, size=(batch, n, 3)).astype(F32) * F32(0.25)
    pts[:, 3] = pts[:, 1]  # duplicates
    pts[:, 5] = pts[:, 2]
    pts[:, 7] = 0.0  # at the origin: never picked by FPS
    pts[:, 8] = (0.01, 0.02, -0.01)  # |p|^2 = 6e-4 <= 1e-3: never picked
    pts[:, 9] = (0.02, 0.02, 0.02)  # |p|^2 = 1.2e-3 > 1e-3: valid
    return torch.from_numpy(pts)


def random_cloud(rng: np.random.Generator, batch: int, n: int) -> torch.Tensor:
    pts = rng.normal(scale=0.4, size=(batch, n, 3)).astype(F32)
    pts[:, 7] = 0.0  # near the origin, as in grid_cloud
    pts[:, 8] = (1e-2, 0.0, 0.0)
    return torch.from_numpy(pts)


CLOUDS = [("grid", grid_cloud), ("random", random_cloud)]


@pytest.mark.parametrize("name,make", CLOUDS)
def test_fps_matches_brute_force(name, make):
    rng = np.random.default_rng(0)
    xyz = make(rng, 3, 60)
    xyz[1, 0] = 0.0  # the first pick is index 0 even at the origin
    got = ops.farthest_point_sample(xyz, 40)
    assert got.dtype == torch.int64 and got.shape == (3, 40)
    for b in range(3):
        assert got[b].tolist() == fps_brute(xyz[b].numpy(), 40), f"{name} cloud {b}"
    assert not {7, 8} & set(got[0, 1:].tolist())  # near-origin points never picked


def test_fps_all_points_near_origin_gives_zero():
    xyz = torch.full((2, 10, 3), 0.001)
    assert ops.farthest_point_sample(xyz, 4).tolist() == [[0] * 4] * 2


def test_fps_more_picks_than_points_repeats_lowest_index():
    xyz = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    assert ops.farthest_point_sample(xyz, 5).tolist() == [fps_brute(xyz[0].numpy(), 5)]


@pytest.mark.parametrize("name,make", CLOUDS)
def test_ball_query_matches_brute_force(name, make):
    rng = np.random.default_rng(1)
    xyz = make(rng, 2, 70)
    centres = torch.cat([xyz[:, :20], torch.full((2, 1, 3), 5.0)], dim=1)  # last: no point near
    radii, nsamples = (0.25, 0.5, 0.75), (4, 8, 16)  # 0.5 on the grid: exact boundary distances
    got = ops.ball_query(xyz, centres, radii, nsamples)
    for g, r, ns in zip(got, radii, nsamples):
        assert g.dtype == torch.int64 and g.shape == (2, 21, ns)
        for b in range(2):
            assert g[b].tolist() == ball_query_brute(xyz[b].numpy(), centres[b].numpy(), r, ns), f"{name} r={r}"
    assert got[0][:, -1].eq(0).all()


def test_ball_query_chunking_and_separate_radii_agree():
    xyz = random_cloud(np.random.default_rng(2), 2, 200)
    centres = xyz[:, ::5]
    together = ops.ball_query(xyz, centres, (0.2, 0.4), (8, 32))
    chunked = ops.ball_query(xyz, centres, (0.2, 0.4), (8, 32), max_elements=2 * 200 * 3)
    alone = [ops.ball_query(xyz, centres, (r,), (n,))[0] for r, n in ((0.2, 8), (0.4, 32))]
    for a, b, c in zip(together, chunked, alone):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_ball_query_nsample_above_point_count_pads():
    xyz = torch.tensor([[[0.0, 0, 0], [0.1, 0, 0], [3.0, 0, 0]]])
    got = ops.ball_query(xyz, xyz[:, :1], (0.5,), (5,))[0]
    assert got.tolist() == [[[0, 1, 0, 0, 0]]]


def test_knn_matches_brute_force_without_ties():
    xyz = random_cloud(np.random.default_rng(3), 2, 80)[:, 10:]  # drop the planted points
    got = ops.knn(xyz.transpose(1, 2), 12)
    assert got.shape == (2, 70, 12) and got.dtype == torch.int64
    for b in range(2):
        scores = knn_scores_brute(xyz[b].numpy())
        want = np.argsort(-scores, axis=1, kind="stable")[:, :12]
        assert got[b].tolist() == want.tolist()
    assert torch.equal(got[..., 0], torch.arange(70).expand(2, 70))  # the point itself first


def test_knn_with_ties_returns_k_nearest_distances():
    xyz = grid_cloud(np.random.default_rng(4), 2, 50)
    got = ops.knn(xyz.transpose(1, 2), 10)
    for b in range(2):
        scores = knn_scores_brute(xyz[b].numpy())
        for i in range(50):
            idx = got[b, i].tolist()
            assert len(set(idx)) == 10
            assert sorted(scores[i, idx].tolist()) == np.sort(scores[i])[-10:].tolist()


def test_knn_chunked_equals_whole_and_feature_space():
    x = torch.randn(3, 16, 90, dtype=torch.float64)
    whole = ops.knn(x, 7, max_elements=2**30)
    assert torch.equal(whole, ops.knn(x, 7, max_elements=3 * 90 * 4))
    assert torch.equal(whole, ops.knn(x, 7, max_elements=1))
    big = torch.randn(1, 3, 1100)  # above the default CPU block size
    assert torch.equal(ops.knn(big, 5), ops.knn(big, 5, max_elements=2**30))


def test_knn_rejects_k_above_points():
    with pytest.raises(ValueError, match="k=5"):
        ops.knn(torch.randn(1, 3, 4), 5)


def test_index_ops_ignore_autocast_and_gradients():
    xyz = random_cloud(np.random.default_rng(5), 2, 64).requires_grad_()

    def all_ops() -> tuple[torch.Tensor, ...]:
        ball = ops.ball_query(xyz, xyz[:, :16], (0.3,), (8,))[0]
        return ops.farthest_point_sample(xyz, 16), ops.knn(xyz.transpose(1, 2), 8), ball

    plain = all_ops()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = all_ops()
    for a, b in zip(plain, auto):
        assert torch.equal(a, b) and not a.requires_grad


def test_gather_and_group_values():
    feats = torch.randn(2, 5, 30)
    idx = torch.randint(0, 30, (2, 7))
    group_idx = torch.randint(0, 30, (2, 7, 4))
    g = ops.gather_points(feats, idx)
    gg = ops.group_points(feats, group_idx)
    for b in range(2):
        for j in range(7):
            assert torch.equal(g[b, :, j], feats[b, :, idx[b, j]])
            for s in range(4):
                assert torch.equal(gg[b, :, j, s], feats[b, :, group_idx[b, j, s]])


def test_gather_and_group_gradients():
    feats = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 12, (2, 9))  # repeated indices exercise the scatter-add
    group_idx = torch.randint(0, 12, (2, 4, 5))
    assert torch.autograd.gradcheck(lambda f: ops.gather_points(f, idx), (feats,))
    assert torch.autograd.gradcheck(lambda f: ops.group_points(f, group_idx), (feats,))


def test_point_ops_can_be_replaced_and_restored():
    calls = []

    def counting_knn(x, k):
        calls.append(k)
        return ops.knn(x, k)

    replacement = ops.PointOps(knn=counting_knn)
    with ops.using_point_ops(replacement):
        assert ops.point_ops() is replacement
        ops.point_ops().knn(torch.randn(1, 3, 10), 4)
    assert calls == [4] and ops.point_ops() is ops.REFERENCE_OPS
