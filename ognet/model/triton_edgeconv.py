"""Triton kernels for the fused EdgeConv (`ognet.model.edgeconv.PooledEdgeNorm`): its gather,
pooling and batch statistics in two launches forward, its scatters in one launch backward.

In PyTorch ops the neighbour-wise part of one EdgeConv is some 14 launches forward (sign flip,
gather, max, the winners' indices, mean, five for the centred statistics ...) and 7 backward
(in-degree count, two scatters, the spread's expanded copy ...): with OG-Net-Deep's 14 EdgeConvs,
about 290 launches a step. Here:

- `pool_edges`: program (b, tile of points, tile of channels) gathers y at its points' neighbours
  (B, C, N, k never exists in memory), takes the max (sign-flipped per channel where gamma < 0),
  its first winner and the mean, adds z, and writes the tile's per-channel sum, centred sum of
  squares and count. A second launch merges those partials per channel (exact decomposition:
  mean from the sums, variance as the sum of the partials' own squares plus their counts times
  their means' squared offsets), in a fixed order: deterministic.
- `scatter_edges`: dy of every neighbour gets its share by atomic adds (as torch's `scatter_add_`
  on CUDA: the order of the additions, so the last bits, may vary between runs).

Same values as the PyTorch path up to summation order (tests/test_triton_ops.py compares them
under TRITON_INTERPRET=1). Launches sit in `triton_launch::<kernel>` profiler ranges. Import this
module only where Triton is wanted (via `ognet.model.triton_ops`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.profiler import record_function

BLOCK_C = 16  # channels per program
BLOCK_N = 16  # points per program: a 16 x 16 x next_power_of_2(k) tile of gathered features
BLOCK_P = 128  # partials merged at a time
# 8 warps: the gather and scatter tiles fit in registers (sm_90, ptxas -v: ~160 registers, no
# spills; 4 warps spill). Compiled for CUDA without a GPU by tests/test_triton_ops.py.
WARPS = 8
# Rounding is free here (no index depends on it): contraction into FMAs is on, said explicitly
# (Triton 3.9 warns when the default decides).


@triton.jit
def _pool_kernel(
    y_ptr, z_ptr, gamma_ptr, idx_ptr, extreme_ptr, mean_ptr, winner_ptr, part_ptr,
    C, N, K, n_blocks, n_parts, sy_b, sy_c, sz_b, sz_c,
    HAS_SIGN: tl.constexpr, STATS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (b·n_blocks + tile of points, tile of channels)."""
    part = tl.program_id(0)
    b = (part // n_blocks).to(tl.int64)
    offs_n = (part % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    mask_c, mask_n, mask_k = offs_c < C, offs_n < N, offs_k < K
    mask_nk = mask_n[:, None] & mask_k[None, :]
    nbr = tl.load(idx_ptr + (b * N + offs_n[:, None]) * K + offs_k[None, :], mask=mask_nk, other=0)  # (n, k)
    mask = mask_c[:, None, None] & mask_nk[None, :, :]  # (c, n, k)
    y = tl.load(y_ptr + b * sy_b + offs_c[:, None, None] * sy_c + nbr[None, :, :], mask=mask, other=0.0)
    mask_cn = mask_c[:, None] & mask_n[None, :]
    z = tl.load(z_ptr + b * sz_b + offs_c[:, None] * sz_c + offs_n[None, :], mask=mask_cn, other=0.0)
    flipped = y
    if HAS_SIGN:  # max of a·e = a·min(e) where a < 0: a max of -y
        gamma = tl.load(gamma_ptr + offs_c, mask=mask_c, other=1.0)
        sign = tl.where(gamma < 0, -1.0, 1.0).to(y.dtype)
        flipped = y * sign[:, None, None]
    flipped = tl.where(mask, flipped, float("-inf"))
    best = tl.max(flipped, axis=2)
    first = tl.min(tl.where(flipped == best[:, :, None], offs_k[None, None, :], BLOCK_K), axis=2)  # ties: lowest j
    winner = tl.sum(tl.where(offs_k[None, None, :] == first[:, :, None], nbr[None, :, :], 0), axis=2)
    if HAS_SIGN:
        best = best * sign[:, None]
    out = b * C * N + offs_c[:, None] * N + offs_n[None, :]
    tl.store(extreme_ptr + out, best + z, mask=mask_cn)
    tl.store(mean_ptr + out, tl.sum(y, axis=2) / K + z, mask=mask_cn)
    tl.store(winner_ptr + out, winner, mask=mask_cn)
    if STATS:  # this tile's sum, centred sum of squares and count of e = y_j + z_i, per channel
        e = y + z[:, :, None]
        count = (tl.sum(mask_n.to(tl.int32), axis=0) * K).to(y.dtype)
        total = tl.sum(tl.sum(tl.where(mask, e, 0.0), axis=2), axis=1)
        centred = tl.where(mask, e - (total / count)[:, None, None], 0.0)
        squares = tl.sum(tl.sum(centred * centred, axis=2), axis=1)
        tl.store(part_ptr + part * C + offs_c, total, mask=mask_c)
        tl.store(part_ptr + (n_parts + part) * C + offs_c, squares, mask=mask_c)
        tl.store(part_ptr + (2 * n_parts + part) * C + offs_c, tl.zeros_like(total) + count, mask=mask_c)


@triton.jit
def _merge_kernel(part_ptr, mu_ptr, var_ptr, C, n_parts, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (tile of channels): mean, then variance = (sum of squares + count·(mean_p - mean)²) / n."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    total = tl.zeros((BLOCK_C,), dtype=mu_ptr.dtype.element_ty)
    count = tl.zeros((BLOCK_C,), dtype=mu_ptr.dtype.element_ty)
    for start in range(0, n_parts, BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        mask = (offs_p < n_parts)[:, None] & mask_c[None, :]
        at = offs_p[:, None] * C + offs_c[None, :]
        total += tl.sum(tl.load(part_ptr + at, mask=mask, other=0.0), axis=0)
        count += tl.sum(tl.load(part_ptr + 2 * n_parts * C + at, mask=mask, other=0.0), axis=0)
    count = tl.where(mask_c, count, 1.0)  # channels past C: no 0/0
    mu = total / count
    squares = tl.zeros((BLOCK_C,), dtype=mu_ptr.dtype.element_ty)
    for start in range(0, n_parts, BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        mask = (offs_p < n_parts)[:, None] & mask_c[None, :]
        at = offs_p[:, None] * C + offs_c[None, :]
        n_p = tl.load(part_ptr + 2 * n_parts * C + at, mask=mask, other=1.0)
        offset = tl.load(part_ptr + at, mask=mask, other=0.0) / n_p - mu[None, :]
        own = tl.load(part_ptr + n_parts * C + at, mask=mask, other=0.0)
        squares += tl.sum(tl.where(mask, own + n_p * offset * offset, 0.0), axis=0)
    tl.store(mu_ptr + offs_c, mu, mask=mask_c)
    tl.store(var_ptr + offs_c, squares / count, mask=mask_c)


def _tiles(n: int, batch: int) -> tuple[int, int]:
    """(programs over batch x point tiles, point tiles per cloud)."""
    n_blocks = triton.cdiv(n, BLOCK_N)
    return batch * n_blocks, n_blocks


@torch.no_grad()
def pool_edges(
    y: Tensor, z: Tensor, idx: Tensor, gamma: Tensor | None, statistics: bool
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """e_ij = y_j + z_i over the kNN graph idx (B, N, k); y, z (B, C, N), unit stride along N.

    Returns the max over j of e (of -e where gamma < 0, sign restored), the mean over j, the
    winning point index (B, C, N each), and with `statistics` the per-channel mean and biased
    variance of e over every edge."""
    batch, c, n = y.shape
    k = idx.shape[-1]
    if y.stride(2) != 1 or z.stride(2) != 1:
        raise ValueError("pool_edges: y and z need unit stride along the points")
    idx = idx.contiguous()
    extreme, mean = torch.empty(2, batch, c, n, dtype=y.dtype, device=y.device).unbind()
    winner = torch.empty(batch, c, n, dtype=torch.long, device=y.device)
    n_parts, n_blocks = _tiles(n, batch)
    parts = torch.empty(3, n_parts, c, dtype=y.dtype, device=y.device) if statistics else extreme
    with record_function("triton_launch::pool_edges"):
        _pool_kernel[(n_parts, triton.cdiv(c, BLOCK_C))](
            y, z, gamma if gamma is not None else y, idx, extreme, mean, winner, parts,
            c, n, k, n_blocks, n_parts, y.stride(0), y.stride(1), z.stride(0), z.stride(1),
            HAS_SIGN=gamma is not None, STATS=statistics,
            BLOCK_C=BLOCK_C, BLOCK_N=BLOCK_N, BLOCK_K=triton.next_power_of_2(k),
            num_warps=WARPS, enable_fp_fusion=True,
        )  # fmt: skip
    if not statistics:
        return extreme, mean, winner, None
    mu, var = torch.empty(2, c, dtype=y.dtype, device=y.device).unbind()
    with record_function("triton_launch::merge_statistics"):
        _merge_kernel[(triton.cdiv(c, BLOCK_C),)](
            parts, mu, var, c, n_parts, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, enable_fp_fusion=True
        )
    return extreme, mean, winner, (mu, var)


@triton.jit
def _scatter_kernel(
    dy_ptr, idx_ptr, winner_ptr, win_ptr, spread_ptr, lam_ptr, y_ptr,
    C, N, K, n_blocks, sd_b, sd_c, sy_b, sy_c,
    HAS_SPREAD: tl.constexpr, HAS_LAM: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (b·n_blocks + tile of points i, tile of channels): dy[winner_i] += win_i and, per
    edge (i, j), dy[j] += spread_i + lam·y_j."""
    part = tl.program_id(0)
    b = (part // n_blocks).to(tl.int64)
    offs_n = (part % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c, mask_n = offs_c < C, offs_n < N
    mask_cn = mask_c[:, None] & mask_n[None, :]
    at = b * C * N + offs_c[:, None] * N + offs_n[None, :]
    dy = dy_ptr + b * sd_b + offs_c[:, None] * sd_c
    winner = tl.load(winner_ptr + at, mask=mask_cn, other=0)
    tl.atomic_add(dy + winner, tl.load(win_ptr + at, mask=mask_cn, other=0.0), mask=mask_cn)
    if HAS_SPREAD or HAS_LAM:
        offs_k = tl.arange(0, BLOCK_K)
        mask_nk = mask_n[:, None] & (offs_k < K)[None, :]
        nbr = tl.load(idx_ptr + (b * N + offs_n[:, None]) * K + offs_k[None, :], mask=mask_nk, other=0)
        mask = mask_c[:, None, None] & mask_nk[None, :, :]
        share = tl.zeros((BLOCK_C, BLOCK_N, BLOCK_K), dtype=dy_ptr.dtype.element_ty)
        if HAS_SPREAD:
            share += tl.load(spread_ptr + at, mask=mask_cn, other=0.0)[:, :, None]
        if HAS_LAM:
            lam = tl.load(lam_ptr + offs_c, mask=mask_c, other=0.0)
            y = tl.load(y_ptr + b * sy_b + offs_c[:, None, None] * sy_c + nbr[None, :, :], mask=mask, other=0.0)
            share += lam[:, None, None] * y
        tl.atomic_add(dy[:, :, None] + nbr[None, :, :], share, mask=mask)


@torch.no_grad()
def scatter_edges(
    dy: Tensor, idx: Tensor, winner: Tensor, win: Tensor, spread: Tensor | None, lam: Tensor | None, y: Tensor
) -> None:
    """dy (B, C, N, unit stride along N) := win scattered to the winners + for every edge (i, j)
    of idx, spread_i + lam·y_j at j (`lam` per channel; a None term is 0)."""
    batch, c, n = dy.shape
    k = idx.shape[-1]
    if dy.stride(2) != 1 or y.stride(2) != 1:
        raise ValueError("scatter_edges: dy and y need unit stride along the points")
    dy.zero_()
    n_parts, n_blocks = _tiles(n, batch)
    with record_function("triton_launch::scatter_edges"):
        _scatter_kernel[(n_parts, triton.cdiv(c, BLOCK_C))](
            dy, idx.contiguous(), winner.contiguous(), win.contiguous(),
            spread.contiguous() if spread is not None else win, lam.contiguous() if lam is not None else win, y,
            c, n, k, n_blocks, dy.stride(0), dy.stride(1), y.stride(0), y.stride(1),
            HAS_SPREAD=spread is not None, HAS_LAM=lam is not None,
            BLOCK_C=BLOCK_C, BLOCK_N=BLOCK_N, BLOCK_K=triton.next_power_of_2(k),
            num_warps=WARPS, enable_fp_fusion=True,
        )  # fmt: skip
