"""Point operations of OG-Net in pure PyTorch: kNN, farthest point sampling, ball query, gathers.

They reproduce the semantics of the original code (a dense matmul kNN and the modified
`pointnet2_ops` CUDA kernels, reference sections 3.2 and 3.4) on any device, batched and
vectorised. The index-producing ops (kNN, FPS, ball query) are reachable through one small
interface, `PointOps`, so that a faster implementation (a Triton or CUDA kernel, torch_cluster)
can replace them with `set_point_ops`; the functions here stay as the always-available reference
and the test oracle. `get_point_ops` names the implementations: "reference" (these) and "triton"
(`ognet.model.triton_ops`, imported only when asked for). Index ops return int64 indices on the
input's device and carry no gradient.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from ognet.errors import ConfigError

# kNN and ball query work on blocks of B x rows x N scores/distances of at most this many elements
# instead of B x N x N, so memory stays bounded for any N. On CPU, blocks that fit in cache (4 MiB
# of float32) made both ops 1.5-2.5x faster than whole matrices (B=8, N=4096, 1 and 2 threads;
# on cores shared with other busy processes the many small parallel ops lose instead). On
# accelerators a block only has to fit in memory (1 GiB), and fewer blocks mean fewer launches.
CPU_BLOCK_ELEMENTS = 2**20
DEVICE_BLOCK_ELEMENTS = 2**28

# The FPS kernel skips points with squared norm <= 1e-3 (clouds are centred, so these sit at
# the origin); it compares a float against this double, hence the float64 test below.
FPS_MIN_SQUARED_NORM = 1e-3


def _index_dtype(x: Tensor) -> torch.dtype:
    """Distances for neighbour search in float32 at least, so bf16/fp16 runs pick the same points."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_chunks(batch: int, rows: int, cols: int, max_elements: int | None, device: torch.device) -> Iterator[slice]:
    if max_elements is None:
        max_elements = CPU_BLOCK_ELEMENTS if device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
    step = max(1, max_elements // max(1, batch * cols))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


@torch.no_grad()
def knn(x: Tensor, k: int, max_elements: int | None = None) -> Tensor:
    """Indices (B, N, k) of the k nearest points of every point of x (B, C, N), itself included.

    Ranks by score = -|a|^2 + 2 a.b - |b|^2 from one matrix product, as the original `knn`, with
    topk(largest, sorted), so the point itself (score 0) normally comes first. Rows are processed
    in chunks so that at most `max_elements` scores (default: per device, above) exist at once.
    """
    with torch.autocast(x.device.type, enabled=False):
        x = x.detach().to(_index_dtype(x))
        batch, _, n = x.shape
        if k > n:
            raise ValueError(f"knn: k={k} neighbours requested but the cloud has only {n} points")
        points = x.transpose(1, 2)  # (B, N, C)
        sq = x.square().sum(1).unsqueeze(1)  # (B, 1, N); beta=-1 below: no negation op
        parts = []
        for rows in _row_chunks(batch, n, n, max_elements, x.device):
            # -|a|^2 is the same for a whole row and cannot change its ranking: leave it out.
            score = torch.baddbmm(sq, points[:, rows], x, beta=-1.0, alpha=2.0)
            parts.append(score.topk(k, dim=-1).indices)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # one block: no copy


@torch.no_grad()
def farthest_point_sample(xyz: Tensor, m: int) -> Tensor:
    """Indices (B, m) of m points of xyz (B, N, 3) picked by farthest point sampling.

    As the modified CUDA kernel: the first index is 0; squared distances to the picked set start
    at 1e10; points with squared norm <= 1e-3 are never picked after the first; if no valid point
    exists the pick is 0. Ties go to the lowest index; the CUDA kernel's tree reduction resolves
    exact ties differently, which only matters for exactly equal float distances. Works on
    detached float32 coordinates; loops over the m picks, vectorised over batch and points.
    """
    with torch.autocast(xyz.device.type, enabled=False):
        p = xyz.detach().float()
        batch, n, _ = p.shape
        x, y, z = (c.contiguous() for c in p.unbind(-1))  # (B, N) planes: cheap per-step ops
        norm2 = x * x + y * y + z * z
        # Invalid points hold -1 forever: min(-1, d) = -1 for any d >= 0, so argmax never picks
        # them, and an all-invalid row gives argmax 0.
        dist = torch.where(norm2.double() > FPS_MIN_SQUARED_NORM, 1e10, -1.0).to(torch.float32)
        picks = [torch.zeros(batch, 1, dtype=torch.long, device=p.device)]
        d = torch.empty_like(dist)
        for _ in range(1, m):
            last = picks[-1]
            torch.sub(x, x.gather(1, last), out=d).square_()
            d.add_((y - y.gather(1, last)).square_())
            d.add_((z - z.gather(1, last)).square_())
            torch.minimum(dist, d, out=dist)
            picks.append(dist.argmax(dim=1, keepdim=True))  # first maximum: ties to the lowest index
        return torch.cat(picks, dim=1)


def _squared_distances(centres: Tensor, xyz: Tensor) -> Tensor:
    """(B, M, N) squared distances, coordinate by coordinate like the kernel (no cancellation)."""
    d = (centres[..., 0:1] - xyz[..., 0].unsqueeze(1)).square_()
    d += (centres[..., 1:2] - xyz[..., 1].unsqueeze(1)).square_()
    d += (centres[..., 2:3] - xyz[..., 2].unsqueeze(1)).square_()
    return d


def squared_radius(radius: float, dtype: torch.dtype) -> float:
    """radius^2 rounded like the kernel's `float radius2 = radius * radius` (in float64 for float64
    input), computed by numpy on the host: a torch scalar read back would be an aten op per call."""
    r = np.float64(radius) if dtype == torch.float64 else np.float32(radius)
    return float(r * r)


def _first_in_radius(d2: Tensor, radius2: float, nsample: int) -> Tensor:
    """First `nsample` indices by index order with d2 < radius2, padded with the first hit, else 0."""
    n = d2.shape[-1]
    order = torch.arange(n, dtype=torch.int32, device=d2.device)
    keys = torch.where(d2 < radius2, order, n)  # out of radius -> n, sorts last
    picked = keys.topk(min(nsample, n), dim=-1, largest=False).values  # topk beats sort on CPU
    first = picked[..., :1]
    picked = torch.where(picked == n, first, picked)
    picked = torch.where(first == n, 0, picked)
    if nsample > n:  # fewer points than slots: the kernel pads with the first hit
        picked = torch.cat([picked, picked[..., :1].expand(*picked.shape[:-1], nsample - n)], -1)
    return picked.long()


@torch.no_grad()
def ball_query(
    xyz: Tensor,
    centres: Tensor,
    radii: Sequence[float],
    nsamples: Sequence[int],
    max_elements: int | None = None,
) -> list[Tensor]:
    """For each (radius, nsample): indices (B, M, nsample) of points of xyz (B, N, 3) near centres.

    As the kernel: the first `nsample` points in index order (not the nearest) with squared
    distance strictly below radius^2, padded with the first hit; all zeros without a hit. Several
    radii share one distance computation (a multi-scale layer asks for three), done in chunks of
    centres so at most `max_elements` distances exist at once.
    """
    if len(radii) != len(nsamples):
        raise ValueError(f"ball_query: {len(radii)} radii but {len(nsamples)} nsamples")
    with torch.autocast(xyz.device.type, enabled=False):
        dtype = _index_dtype(xyz)
        xyz, centres = xyz.detach().to(dtype), centres.detach().to(dtype)
        batch, m, _ = centres.shape
        # radius^2 rounded like the kernel's `float radius2 = radius * radius`
        radii2 = [squared_radius(r, dtype) for r in radii]
        parts: list[list[Tensor]] = [[] for _ in radii]
        for rows in _row_chunks(batch, m, xyz.shape[1], max_elements, xyz.device):
            d2 = _squared_distances(centres[:, rows], xyz)
            for out, r2, ns in zip(parts, radii2, nsamples):
                out.append(_first_in_radius(d2, r2, ns))
        return [torch.cat(p, dim=1) for p in parts]


def gather_points(features: Tensor, idx: Tensor) -> Tensor:
    """features (B, C, N), idx (B, M) -> (B, C, M); differentiable (backward is a scatter-add)."""
    return features.gather(2, idx.unsqueeze(1).expand(-1, features.shape[1], -1))


def group_points(features: Tensor, idx: Tensor) -> Tensor:
    """features (B, C, N), idx (B, M, S) -> (B, C, M, S); differentiable."""
    b, m, s = idx.shape
    return gather_points(features, idx.reshape(b, m * s)).view(b, features.shape[1], m, s)


@dataclass(frozen=True)
class PointOps:
    """The index-producing point ops the model calls, and the kernels of its neighbourhood
    gathers and scatters. Replace with `set_point_ops`."""

    knn: Callable[[Tensor, int], Tensor] = knn
    farthest_point_sample: Callable[[Tensor, int], Tensor] = farthest_point_sample
    ball_query: Callable[[Tensor, Tensor, Sequence[float], Sequence[int]], list[Tensor]] = ball_query
    # The fused EdgeConv's gather/pool/statistics and its backward's scatters (kernels of
    # ognet.model.triton_edgeconv); None: ognet.model.edgeconv's PyTorch code.
    pool_edges: Callable[..., tuple] | None = None
    scatter_edges: Callable[..., None] | None = None


REFERENCE_OPS = PointOps()
_active_ops = REFERENCE_OPS


def point_ops() -> PointOps:
    """The implementation in use (the pure-PyTorch reference unless replaced)."""
    return _active_ops


def set_point_ops(ops: PointOps) -> PointOps:
    """Use `ops` from now on in every model; returns the previous implementation."""
    global _active_ops
    previous, _active_ops = _active_ops, ops
    return previous


@contextlib.contextmanager
def using_point_ops(ops: PointOps) -> Iterator[None]:
    """Use `ops` inside a `with` block (tests, benchmarks comparing implementations)."""
    previous = set_point_ops(ops)
    try:
        yield
    finally:
        set_point_ops(previous)


PointOpsName = Literal["auto", "reference", "triton"]  # the config key model.point_ops
POINT_OPS_CHOICES: tuple[str, ...] = get_args(PointOpsName)


def get_point_ops(name: str) -> PointOps:
    """The implementation called `name`: "reference" or "triton" (a ConfigError naming
    `model.point_ops` when Triton is not installed)."""
    if name == "reference":
        return REFERENCE_OPS
    if name != "triton":
        raise ConfigError(f"model.point_ops = {name!r} is not one of {', '.join(POINT_OPS_CHOICES)}")
    try:
        from ognet.model.triton_ops import TRITON_OPS  # lazy: CPU users need no Triton
    except ImportError as e:
        raise ConfigError(f"model.point_ops=triton needs the triton package (pip install triton): {e}") from e
    return TRITON_OPS


def select_point_ops(name: str, device: torch.device) -> PointOps:
    """`model.point_ops` for a run on `device`: auto is Triton on CUDA when it imports, else the
    reference; triton off CUDA needs Triton's interpreter (TRITON_INTERPRET=1, slow: for tests)."""
    if name == "auto":
        if device.type != "cuda":
            return REFERENCE_OPS
        try:
            return get_point_ops("triton")
        except ConfigError:
            return REFERENCE_OPS
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            f"model.point_ops=triton runs on CUDA, not {device.type} (or under TRITON_INTERPRET=1, slowly); "
            "use auto or reference"
        )
    return get_point_ops(name)
