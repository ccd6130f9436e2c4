"""Triton kernels for farthest point sampling and ball query: one launch per call, the batch in the grid.

The reference ops (`ognet.model.ops`) issue one small op after another: FPS about 14 per pick, so
an OG-Net forward makes some 20,000 launches, each 5-10 us of host time on a GPU. These kernels
give the same indices (the tests compare them with the reference under `TRITON_INTERPRET=1`) in
one launch: FPS keeps a whole cloud in one program and loops over the picks inside it, as the
original CUDA kernel does; ball query gives each program a tile of centres and scans the points
in blocks, ranking the in-radius points by a running count.

Exactness: distances are summed in the reference's order, and floating-point contraction is off
(`enable_fp_fusion=False`): an FMA would round differently from the reference's separate ops.
Every launch sits in a profiler range named `triton_launch::<kernel>` so budgets can count it.
Import this module only where Triton is wanted: `ognet.model.ops.get_point_ops` does it lazily.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.profiler import record_function

from ognet.model import ops, triton_edgeconv

# The reference keeps a point when float64(norm2) > 1e-3. For a float32 norm2 this is norm2 >= the
# smallest float32 above 1e-3, a comparison the kernel can make in float32.
_threshold = torch.tensor(ops.FPS_MIN_SQUARED_NORM, dtype=torch.float32)
if _threshold.double() <= ops.FPS_MIN_SQUARED_NORM:
    _threshold = torch.nextafter(_threshold, torch.tensor(float("inf")))
FPS_MIN_NORM2_F32 = float(_threshold)

BALL_RADII_PER_LAUNCH = 3  # OG-Net's multi-scale layers ask for three radii: one launch each
BALL_BLOCK_M = 16  # centres per program
BALL_BLOCK_N = 128  # points per scanned block: a 16 x 128 tile of distances in registers
FPS_MAX_POINTS = 2**16  # one program holds a whole cloud in registers


@triton.jit
def _fps_kernel(xyz_ptr, out_ptr, n, m, stride_b, min_norm2, BLOCK_N: tl.constexpr):
    """One program per cloud: dist = min over picks of the squared distance, pick its first maximum."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    inside = offs < n
    base = xyz_ptr + b * stride_b
    x = tl.load(base + offs * 3, mask=inside, other=0.0)
    y = tl.load(base + offs * 3 + 1, mask=inside, other=0.0)
    z = tl.load(base + offs * 3 + 2, mask=inside, other=0.0)
    norm2 = x * x + y * y + z * z
    # Invalid points hold -1 forever (never the maximum while a valid point is left, and argmax 0
    # for an all-invalid row, as the reference); padding lanes hold -2 and are never picked.
    dist = tl.where(norm2 >= min_norm2, 1e10, -1.0)
    dist = tl.where(inside, dist, -2.0)
    last = tl.zeros((), dtype=tl.int64)
    tl.store(out_ptr + b * m, last)
    for i in range(1, m):
        dx = x - tl.load(base + last * 3)
        dy = y - tl.load(base + last * 3 + 1)
        dz = z - tl.load(base + last * 3 + 2)
        d = dx * dx + dy * dy + dz * dz
        dist = tl.minimum(dist, d)
        best = tl.max(dist, axis=0)
        last = tl.min(tl.where(dist == best, offs, BLOCK_N), axis=0).to(tl.int64)  # ties: lowest index
        tl.store(out_ptr + b * m + i, last)


@torch.no_grad()
def farthest_point_sample(xyz: Tensor, m: int) -> Tensor:
    """`ops.farthest_point_sample` in one launch (B programs)."""
    batch, n, _ = xyz.shape
    if n > FPS_MAX_POINTS:
        return ops.farthest_point_sample(xyz, m)
    with torch.autocast(xyz.device.type, enabled=False):
        p = xyz.detach().float().contiguous()
    out = torch.empty(batch, m, dtype=torch.long, device=xyz.device)
    block = triton.next_power_of_2(n)
    warps = max(4, min(16, block // 512))
    with record_function("triton_launch::fps"):
        _fps_kernel[(batch,)](
            p, out, n, m, p.stride(0), FPS_MIN_NORM2_F32, BLOCK_N=block, num_warps=warps, enable_fp_fusion=False
        )
    return out


@triton.jit
def _ball_radius(d2, keys, offs_n, count, first, r2, ns, out_ptr, row, mask_m):
    """One radius over one block of points: store the in-radius points' indices at their rank."""
    hit = (d2 < r2) & mask_m[:, None]
    rank = count[:, None] + tl.cumsum(hit.to(tl.int32), axis=1) - 1
    tl.store(out_ptr + row[:, None] * ns + rank, keys, mask=hit & (rank < ns))
    first = tl.minimum(first, tl.min(tl.where(hit, offs_n[None, :], 2147483647), axis=1))
    return count + tl.sum(hit.to(tl.int32), axis=1), first


@triton.jit
def _ball_pad(count, first, ns, out_ptr, row, mask_m, BLOCK_S: tl.constexpr):
    """Slots past the hits hold the first hit, or 0 without a hit."""
    slots = tl.arange(0, BLOCK_S)
    fill = tl.where(count > 0, first, 0).to(tl.int64)
    pad = mask_m[:, None] & (slots[None, :] >= count[:, None]) & (slots[None, :] < ns)
    value = tl.zeros((1, BLOCK_S), dtype=tl.int64) + fill[:, None]
    tl.store(out_ptr + row[:, None] * ns + slots[None, :], value, mask=pad)


@triton.jit
def _ball_query_kernel(
    xyz_ptr,
    centres_ptr,
    out0_ptr,
    out1_ptr,
    out2_ptr,
    n,
    m,
    r2_0,
    r2_1,
    r2_2,
    ns0,
    ns1,
    ns2,
    NUM_RADII: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Program (b, tile of centres): scan the points in blocks, up to three radii at once."""
    b = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < m
    row = b * m + offs_m  # (b, centre) row of the (B, M, ns) outputs
    c = centres_ptr + row * 3
    cx = tl.load(c, mask=mask_m, other=0.0)
    cy = tl.load(c + 1, mask=mask_m, other=0.0)
    cz = tl.load(c + 2, mask=mask_m, other=0.0)
    zero = tl.zeros((BLOCK_M,), dtype=tl.int32)
    count0, count1, count2 = zero, zero, zero
    first0, first1, first2 = zero + 2147483647, zero + 2147483647, zero + 2147483647
    for start in range(0, n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        inside = offs_n < n
        p = xyz_ptr + b * n * 3 + offs_n * 3
        dx = cx[:, None] - tl.load(p, mask=inside, other=0.0)[None, :]
        dy = cy[:, None] - tl.load(p + 1, mask=inside, other=0.0)[None, :]
        dz = cz[:, None] - tl.load(p + 2, mask=inside, other=0.0)[None, :]
        d2 = dx * dx + dy * dy + dz * dz
        d2 = tl.where(inside[None, :], d2, float("inf"))
        keys = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int64) + offs_n[None, :].to(tl.int64)
        count0, first0 = _ball_radius(d2, keys, offs_n, count0, first0, r2_0, ns0, out0_ptr, row, mask_m)
        if NUM_RADII > 1:
            count1, first1 = _ball_radius(d2, keys, offs_n, count1, first1, r2_1, ns1, out1_ptr, row, mask_m)
        if NUM_RADII > 2:
            count2, first2 = _ball_radius(d2, keys, offs_n, count2, first2, r2_2, ns2, out2_ptr, row, mask_m)
    _ball_pad(count0, first0, ns0, out0_ptr, row, mask_m, BLOCK_S)
    if NUM_RADII > 1:
        _ball_pad(count1, first1, ns1, out1_ptr, row, mask_m, BLOCK_S)
    if NUM_RADII > 2:
        _ball_pad(count2, first2, ns2, out2_ptr, row, mask_m, BLOCK_S)


@torch.no_grad()
def ball_query(xyz: Tensor, centres: Tensor, radii: Sequence[float], nsamples: Sequence[int]) -> list[Tensor]:
    """`ops.ball_query` in one launch per three radii (grid: batch x tiles of centres).

    float64 coordinates go to the reference (the kernel computes in float32, as FPS does)."""
    if len(radii) != len(nsamples):
        raise ValueError(f"ball_query: {len(radii)} radii but {len(nsamples)} nsamples")
    if xyz.dtype == torch.float64 or centres.dtype == torch.float64:
        return ops.ball_query(xyz, centres, radii, nsamples)
    with torch.autocast(xyz.device.type, enabled=False):
        p = xyz.detach().float().contiguous()
        c = centres.detach().float().contiguous()
    batch, n, _ = p.shape
    m = c.shape[1]
    radii2 = [ops.squared_radius(r, torch.float32) for r in radii]
    outs = [torch.empty(batch, m, ns, dtype=torch.long, device=xyz.device) for ns in nsamples]
    for i in range(0, len(radii), BALL_RADII_PER_LAUNCH):
        group = range(i, min(i + BALL_RADII_PER_LAUNCH, len(radii)))
        pick = [group[min(j, len(group) - 1)] for j in range(BALL_RADII_PER_LAUNCH)]  # unused slots repeat
        block_s = triton.next_power_of_2(max(nsamples[j] for j in group))
        with record_function("triton_launch::ball_query"):
            _ball_query_kernel[(batch, triton.cdiv(m, BALL_BLOCK_M))](
                p,
                c,
                *(outs[j] for j in pick),
                n,
                m,
                *(radii2[j] for j in pick),
                *(nsamples[j] for j in pick),
                NUM_RADII=len(group),
                BLOCK_M=BALL_BLOCK_M,
                BLOCK_N=BALL_BLOCK_N,
                BLOCK_S=block_s,
                enable_fp_fusion=False,
            )
    return outs


TRITON_OPS = ops.PointOps(
    farthest_point_sample=farthest_point_sample,
    ball_query=ball_query,
    pool_edges=triton_edgeconv.pool_edges,
    scatter_edges=triton_edgeconv.scatter_edges,
)
