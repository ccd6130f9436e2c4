"""EdgeConv without the edge tensor.

The original EdgeConv builds [x_j - x_i ; x_i] (B, 2C, N, k), runs a 1x1 conv (W, b) over its N·k
columns, a BatchNorm, then pools over the k neighbours. Two exact rewrites make it cheaper:

- `gather`: W·[x_j - x_i ; x_i] + b = W1·x_j + ((W2 - W1)·x_i + b). One matmul by [W1 ; W2 - W1]
  over N columns gives y = W1·x and z = (W2 - W1)·x + b (B, C', N); the conv output is
  e_ij = y_j + z_i: y gathered by the kNN indices plus z broadcast, k times fewer matmul FLOPs, no
  (B, 2C, N, k) input.
- `fused`: BatchNorm is a per-channel affine map a·(e - mu) + beta (a = gamma / sqrt(var + eps)),
  and pooling commutes with it: the max of a·e is a·max(e) where a >= 0 and a·min(e) where a < 0
  (a max of the sign-flipped e), the mean is a·mean(e). `PooledEdgeNorm` gathers e once, takes
  its signed max and mean over the neighbours and its batch statistics (combined over the ranks
  under a synchronised BatchNorm), and frees it: nothing of size (B, C', N, k) is kept for
  backward. The statistics: on accelerators two centred passes over e (few launches); on CPU
  from (B, C', N) sums (sum e² = sum_p count_p·y_p² + k·sum_i z_i·(2·mean_j e_ij - z_i), y and z
  centred), where a pass costs more than an op. Its backward is written by hand from
  (B, C', N) terms, so autograd replays no chain of small ops. With o = a·(e - mu) + beta pooled
  to out = s·o_j* + (1 - s)·mean_j o and g = dL/d out, BatchNorm's batch-statistics gradient is
  de_ij = a·(go_ij - (gb + gg·xhat_ij) / n), go_ij = g_i·(s·[j = j*] + (1 - s) / k),
  gb = sum g, gg = sum g·pooled xhat, xhat = (e - mu)·rstd, n = B·N·k. Writing xhat_ij through
  y_j + z_i: dz_i = sum_j de_ij = a·g_i - k·(lam·mean_j e_ij + nu), and dy_p = sum over the edges
  (i, j) into p of de_ij = (s·a·g scattered to the winners) + ((1 - s)/k·a·g - lam·z - nu
  scattered to every neighbour) - lam·count_p·y_p, with lam = a·rstd·gg / n and
  nu = a·(gb - rstd·gg·mu) / n (both 0 with running statistics: then de = a·go; synchronised,
  gb, gg and n are every rank's). About 60 device ops per EdgeConv forward + backward (its conv,
  pooling weight and activation included), from ~125 when autograd differentiated the same
  formulas op by op (benchmarks/results/step_budget.md). Point ops with kernels (Triton,
  `model.point_ops`) take the gather, pooling and statistics (`pool_edges`) and the backward's
  scatters (`scatter_edges`) in 3 launches instead of about 21.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ognet.dist import SyncBatchNorm, all_reduce_sum, global_batch_stats, synchronises, update_running_stats
from ognet.model.blocks import MaxMeanPool, MaxPool, PointwiseConv
from ognet.model.ops import group_points, point_ops

Pool = MaxMeanPool | MaxPool


def _constant(values: float | tuple, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small constant tensor made once per device and dtype (a launch or host copy per call
    otherwise); made afresh while torch.compile or torch.export trace (a cached one would be theirs).
    Only ever read."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached_constant(values, device, dtype)


@functools.cache
def _cached_constant(values: float | tuple, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _one(device: torch.device, dtype: torch.dtype) -> Tensor:
    return _constant(1.0, device, dtype)


def _neighbour_centre(device: torch.device, dtype: torch.dtype) -> Tensor:
    """[[1, 0], [-1, 1]]: [W1, W2] -> [W1, W2 - W1] in one matmul."""
    return _constant(((1.0, 0.0), (-1.0, 1.0)), device, dtype)


def per_point_products(conv: PointwiseConv, h: Tensor) -> Tensor:
    """(B, C', 2, N): [:, :, 0] = W1·h, [:, :, 1] = (W2 - W1)·h, from one bmm.

    (W2 - W1)·h, not W2·h - W1·h: features with a large common offset would cancel in the latter
    (measured: 20x the float32 gradient error of the edge-tensor path on OG-Net-Small, norm bn).
    """
    b, c, n = h.shape
    w = conv.weight.view(conv.out_channels, 2, c)
    both = torch.matmul(_neighbour_centre(w.device, w.dtype), w).view(2 * conv.out_channels, c)
    return torch.bmm(both.unsqueeze(0).expand(b, -1, -1), h).view(b, conv.out_channels, 2, n)


def per_point_terms(conv: PointwiseConv, h: Tensor) -> tuple[Tensor, Tensor]:
    """Neighbour term W1·h and centre term (W2 - W1)·h + b, each (B, C', N)."""
    y, centre = per_point_products(conv, h).unbind(2)
    if conv.bias is not None:
        centre = centre + conv.bias.to(y.dtype).unsqueeze(-1)
    return y, centre


def edge_conv_gathered(conv: PointwiseConv, h: Tensor, idx: Tensor) -> Tensor:
    """conv(edge_features(h, idx)) (B, C', N, k) without the edge tensor."""
    neighbour, centre = per_point_terms(conv, h)
    return group_points(neighbour, idx) + centre.unsqueeze(-1)


def fusable(norm: nn.Module) -> bool:
    """The fused path restates BatchNorm1d/2d and ognet's SyncBatchNorm; any other norm takes `gather`."""
    return type(norm) in (nn.BatchNorm1d, nn.BatchNorm2d, SyncBatchNorm)


def uses_batch_stats(norm: nn.Module) -> bool:
    """Whether BatchNorm normalises by the batch's statistics (training, or no running ones)."""
    return norm.training or (norm.running_mean is None and norm.running_var is None)


def edge_conv_pooled(
    conv: PointwiseConv, norm: nn.Module, pool: Pool, h: Tensor, idx: Tensor, *, norm_after_pool: bool
) -> Tensor:
    """pool(norm(conv(edge features))), or norm(pool(conv(...))) with `norm_after_pool` (a BatchNorm1d).

    (B, C', N) before the activation, equal to the edge-tensor computation up to rounding.
    """
    v = per_point_products(conv, h)
    if v.dtype in (torch.float16, torch.bfloat16):  # autocast: statistics and pooling in float32
        v = v.float()
    bias = conv.bias.to(v.dtype) if conv.bias is not None else None
    mix = torch.sigmoid(pool.p) if pool.uses_mean else None
    if norm_after_pool:
        return norm(PooledEdgeNorm.apply(v, bias, idx, mix, None, None, None, uses_batch_stats(norm)))
    return PooledEdgeNorm.apply(v, bias, idx, mix, norm, norm.weight, norm.bias, uses_batch_stats(norm))


# Counted device ops (benchmarks/step_budget.py) are those of a GPU run: it sets this to True to take
# the accelerator's branch on CPU too.
COUNT_AS_ON_ACCELERATORS = False


def _pass_statistics(e: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of e (B, C, N, k) from its mean over k: centred in place,
    then batched dots (7 launches; `var_mean` is 2 fewer but 4x slower on CPU). Accelerators."""
    mu = mean.mean((0, 2))
    rows = e.sub_(mu.view(-1, 1, 1)).view(-1, 1, e.shape[2] * e.shape[3])  # (B·C, 1, N·k)
    return mu, torch.bmm(rows, rows.transpose(1, 2)).view(e.shape[:2]).sum(0).div_(e.numel() // e.shape[1])


def _sums_statistics(y: Tensor, z: Tensor, mean: Tensor, idx: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of e_ij = y_j + z_i (y, z centred; `mean` = mean_j e_ij)
    from (B, C, N) sums: sum e² = sum_p count_p·y_p² + k·sum_i z_i·(2·mean_i - z_i), count_p how
    often point p is a neighbour. No pass over (B, C, N, k) (CPU: the passes cost more than launches).
    Returns the mean of e + shift (the uncentred one) and the variance."""
    b, n, k = idx.shape
    count = y.new_zeros(b, 1, n).scatter_add_(2, idx.view(b, 1, -1), _one(y.device, y.dtype).expand(b, 1, n * k))
    squares = torch.addcmul(count * y.square(), z, torch.lerp(z, mean, 2.0), value=k).sum((0, 2)) / idx.numel()
    mu = mean.mean((0, 2))
    return mu + shift, torch.addcmul(squares, mu, mu, value=-1)


def _pool_in_torch(  # noqa: PLR0913
    v: Tensor, conv_bias: Tensor | None, idx: Tensor, gamma: Tensor | None, batch: bool, need_mean: bool
) -> tuple:
    """`triton_edgeconv.pool_edges` in PyTorch ops (some 14 launches): y, z, the max, mean and
    winners over the neighbours and the statistics; on CPU the statistics come from per-point sums
    of y and z centred by `shift` (see `_sums_statistics`), which the result holds last."""
    by_sums = batch and v.device.type == "cpu" and not COUNT_AS_ON_ACCELERATORS
    shift = None
    if by_sums:  # centred by the channel means of y and z (constants: the statistics do not change)
        centre = v.mean((0, 3), keepdim=True)
        y, z = (v - centre).unbind(2)  # z without the conv bias: batch statistics remove it
        shift = centre.sum(2).view(-1) if conv_bias is None else centre.sum(2).view(-1) + conv_bias
    else:
        y, z = v.unbind(2)
        if conv_bias is not None:
            z = z + conv_bias.unsqueeze(-1)
    # The max over the neighbours compares y_j alone (sign-flipped where gamma < 0: exact), so
    # adding z_i cannot round near-ties into ties.
    sign = None
    if gamma is not None:  # max of a·e = a·min(e) where a < 0: a max of -e
        sign = torch.where(gamma < 0, -1.0, 1.0).to(v.dtype).unsqueeze(-1)  # (copysign: no ONNX export)
    gathered = group_points(y if sign is None else y * sign, idx)  # (B, C, N, k): the only one, freed on return
    extreme, arg = gathered.max(-1)
    extreme = extreme.add_(z) if sign is None else torch.addcmul(z, extreme, sign)
    winner = idx.unsqueeze(1).expand(*gathered.shape).gather(3, arg.unsqueeze(-1)).squeeze(-1)  # point indices
    if by_sums:
        mean = gathered.mean(-1)
        mean = mean.add_(z) if sign is None else torch.addcmul(z, mean, sign)
        return y, z, extreme, mean, winner, _sums_statistics(y, z, mean, idx, shift), shift
    if not (need_mean or batch):
        return y, z, extreme, None, winner, None, None
    # e = y_j + z_i in place; batch: mean_j e_ij enters dz
    e = (
        gathered.add_(z.unsqueeze(-1))
        if sign is None
        else torch.addcmul(z.unsqueeze(-1), gathered, sign.unsqueeze(-1), out=gathered)
    )
    mean = e.mean(-1)
    return y, z, extreme, mean, winner, _pass_statistics(e, mean) if batch else None, None


def _scatter_in_torch(  # noqa: PLR0913
    dy: Tensor, idx: Tensor, winner: Tensor, win: Tensor, spread: Tensor | None, lam: Tensor | None, y: Tensor
) -> None:
    """`triton_edgeconv.scatter_edges` in PyTorch ops (up to 7 launches): dy := win at the winners
    + spread_i + lam·y_j at every neighbour j of i (lam·y_p once per edge into p: count_p times)."""
    b, c, n = dy.shape
    k = idx.shape[-1]
    if lam is None:
        dy.zero_()
    else:
        count = y.new_zeros(b, 1, n).scatter_add_(2, idx.view(b, 1, -1), _one(y.device, y.dtype).expand(b, 1, n * k))
        torch.mul(count * lam, y, out=dy)
    dy.scatter_add_(2, winner, win)
    if spread is not None:
        neighbours = idx.view(b, 1, n * k).expand(b, c, -1)
        dy.scatter_add_(2, neighbours, spread.unsqueeze(-1).expand(b, c, n, k).reshape(b, c, -1))


class PooledEdgeNorm(torch.autograd.Function):
    """pool_k(BatchNorm2d(e)) (B, C, N) of e_ij = y_j + z_i, from v (B, C, 2, N) = [y ; z - conv bias].

    `norm` None: pooling only (BatchNorm1d follows). `mix` = sigmoid(p) of max/mean pooling, None
    for max pooling. `bias_cancels`: batch statistics normalise the result (here or after), so the
    conv bias's gradient is exactly 0. Maths and gradient: the module docstring.
    """

    @staticmethod
    def forward(ctx, v, conv_bias, idx, mix, norm, gamma, beta, bias_cancels):  # noqa: PLR0913 (autograd's)
        batch = norm is not None and uses_batch_stats(norm)
        kernels = point_ops().pool_edges
        if kernels is not None:  # two launches (ognet.model.triton_edgeconv)
            y, z = v.unbind(2)
            z = z if conv_bias is None else z + conv_bias.unsqueeze(-1)
            extreme, mean, winner, stats = kernels(y, z, idx, gamma, batch)
            shift = None
        else:
            y, z, extreme, mean, winner, stats, shift = _pool_in_torch(v, conv_bias, idx, gamma, batch, mix is not None)
        mu = rstd = None
        if norm is not None:
            if batch:
                count = idx.numel()
                mu, var = stats
                ctx.synchronised = synchronises(norm)
                if ctx.synchronised:  # the statistics of every rank's batch; backward sums its sums too
                    mu, var, count = global_batch_stats(mu, var, count)
                ctx.count = count
                if norm.training and norm.track_running_stats:
                    update_running_stats(norm, mu, var, count)
                if shift is not None:
                    mu = mu - shift  # the centred terms' mean
            else:
                mu, var = norm.running_mean.to(v.dtype), norm.running_var.to(v.dtype)
            mu, rstd = mu.unsqueeze(-1), (var + norm.eps).rsqrt().unsqueeze(-1)
        pooled = torch.lerp(mean, extreme, mix) if mix is not None else extreme
        xhat = (pooled - mu).mul_(rstd) if norm is not None else pooled  # pooled normalised e
        out = xhat if gamma is None else torch.addcmul(beta.unsqueeze(-1), gamma.unsqueeze(-1), xhat)
        if gamma is None and beta is not None:
            out = out + beta.unsqueeze(-1)
        ctx.batch, ctx.has_bias, ctx.bias_cancels = batch, conv_bias is not None, bias_cancels
        ctx.scatter = point_ops().scatter_edges or _scatter_in_torch  # backward's, chosen with forward's
        ctx.save_for_backward(y, z, idx, winner, mean, extreme, xhat, mix, mu, rstd, gamma)
        return out

    @staticmethod
    def backward(ctx, g):
        y, z, idx, winner, mean, extreme, xhat, mix, mu, rstd, gamma = ctx.saved_tensors
        b, c, n = g.shape
        k = idx.shape[-1]
        a = gamma.unsqueeze(-1) if gamma is not None else None  # BatchNorm's scale gamma·rstd
        a = rstd if a is None else (a if rstd is None else a * rstd)
        ag = g if a is None else g * a  # dL/d(pooled e)
        need = ctx.needs_input_grad
        grad_mix = torch.dot(ag.flatten(), (extreme - mean).flatten()).view(1) if need[3] else None
        gg = (g * xhat).sum((0, 2)) if ctx.batch or (gamma is not None and need[5]) else None
        gb = g.sum((0, 2)) if ctx.batch or need[6] else None
        win = ag if mix is None else ag * mix  # the max's share, to the winners
        spread = None if mix is None else ag - win  # k times the mean's share, to every neighbour
        grad_v = torch.empty(b, c, 2, n, dtype=g.dtype, device=g.device)
        dy, dz = grad_v.unbind(2)
        if ctx.batch:  # BatchNorm's statistics: -lam, -nu of the module docstring
            sum_g, sum_gx = gb, gg  # the parameters' gradients stay this rank's (DDP sums them)
            if ctx.synchronised:  # the statistics' terms need every rank's sums
                sum_g, sum_gx = all_reduce_sum(torch.cat([gb, gg])).chunk(2)
            t = sum_gx.unsqueeze(-1) * rstd
            a_n = a * (-1.0 / ctx.count)
            neg_lam = a_n * t
            neg_nu = a_n * torch.addcmul(sum_g.unsqueeze(-1), t, mu, value=-1)
            torch.add(ag, torch.addcmul(neg_nu, neg_lam, mean), alpha=k, out=dz)
            stats = torch.addcmul(neg_nu, neg_lam, z)
            spread = stats if spread is None else torch.add(stats, spread, alpha=1 / k)
        else:
            dz.copy_(ag)
            neg_lam = None
            spread = None if spread is None else spread.div_(k)
        ctx.scatter(dy, idx, winner, win, spread, neg_lam, y)
        grad_bias = None
        if ctx.has_bias:  # batch statistics (here or in the BatchNorm1d after) remove the bias: exactly 0
            grad_bias = g.new_zeros(c) if ctx.bias_cancels else dz.sum((0, 2))
        return grad_v, grad_bias, None, grad_mix, None, gg if gamma is not None else None, gb, None
