"""EdgeConv without the edge tensor.

The original EdgeConv builds [x_j - x_i ; x_i] (B, 2C, N, k), runs a 1x1 conv (W, b) over its N·k
columns, a BatchNorm, then pools over the k neighbours. Two exact rewrites make it cheaper:

- `gather`: W·[x_j - x_i ; x_i] + b = W1·x_j + ((W2 - W1)·x_i + b). One matmul over N columns
  gives a neighbour term y and a centre term z (B, C', N); the conv output is y gathered by the
  kNN indices plus z broadcast: k times fewer matmul FLOPs, no (B, 2C, N, k) tensor.
- `fused`: BatchNorm is a per-channel affine map a·e + c, and pooling commutes with it: the
  max of a·e + c is a·max(e) + c where a >= 0 and a·min(e) + c where a < 0 (a max of the
  sign-flipped terms), the mean is a·mean(e) + c. Max and mean of e = y_j + z_i over the
  neighbours are max / sum of the gathered y plus z. The batch statistics of e come from
  (B, C', N) sums too: sum e² = sum_p count_p·y_p² + 2·sum_i z_i·(sum_j y_j) + k·sum_i z_i², with
  count_p how often point p is a neighbour. So nothing of size (B, C', N, k) is kept for backward,
  and the only such tensor (the gather inside `NeighbourMaxSum`) lives for one reduction.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ognet.dist import SyncBatchNorm, global_batch_stats, synchronises, update_running_stats
from ognet.model.blocks import MaxMeanPool, MaxPool, PointwiseConv
from ognet.model.ops import group_points

Pool = MaxMeanPool | MaxPool


def per_point_terms(conv: PointwiseConv, h: Tensor) -> tuple[Tensor, Tensor]:
    """Neighbour term W1·h and centre term (W2 - W1)·h + b, each (B, C', N), from one matmul."""
    b, c, _ = h.shape
    w = conv.weight.view(conv.out_channels, 2 * c)
    w_neighbour = w[:, :c]
    both = torch.cat([w_neighbour, w[:, c:] - w_neighbour])  # (2C', C)
    y = torch.bmm(both.unsqueeze(0).expand(b, -1, -1), h)  # bmm: matmul's broadcast copies h
    neighbour, centre = y.split(conv.out_channels, dim=1)
    if conv.bias is not None:
        centre = centre + conv.bias.to(y.dtype).unsqueeze(-1)
    return neighbour, centre


def edge_conv_gathered(conv: PointwiseConv, h: Tensor, idx: Tensor) -> Tensor:
    """conv(edge_features(h, idx)) (B, C', N, k) without the edge tensor."""
    neighbour, centre = per_point_terms(conv, h)
    return group_points(neighbour, idx) + centre.unsqueeze(-1)


class NeighbourMaxSum(torch.autograd.Function):
    """Max (one winner per row, as `max_last`) and sum of y (B, C, N) over neighbours idx (B, M, k).

    The gathered (B, C, M, k) tensor is freed after the forward; backward scatters the max's
    gradient to the winners (saved as point indices, (B, C, M) int64) and the sum's to every
    neighbour.
    """

    @staticmethod
    def forward(ctx, y: Tensor, idx: Tensor, with_sum: bool) -> tuple[Tensor, Tensor | None]:
        b, c, n = y.shape
        gathered = group_points(y, idx)
        maximum, arg = gathered.max(dim=-1)
        total = gathered.sum(dim=-1) if with_sum else None
        del gathered
        winner = idx.unsqueeze(1).expand(b, c, *idx.shape[1:]).gather(3, arg.unsqueeze(-1)).squeeze(-1)
        ctx.n = n
        ctx.save_for_backward(idx, winner)
        return maximum, total

    @staticmethod
    def backward(ctx, grad_max: Tensor | None, grad_sum: Tensor | None) -> tuple[Tensor, None, None]:
        idx, winner = ctx.saved_tensors
        b, c, m = winner.shape
        grad = winner.new_zeros((b, c, ctx.n), dtype=(grad_max if grad_max is not None else grad_sum).dtype)
        if grad_max is not None:
            grad.scatter_add_(2, winner, grad_max)
        if grad_sum is not None:
            k = idx.shape[-1]
            spread = grad_sum.unsqueeze(-1).expand(b, c, m, k).reshape(b, c, m * k)
            grad.scatter_add_(2, idx.reshape(b, 1, m * k).expand(b, c, m * k), spread)
        return grad, None, None


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
    y, z = per_point_terms(conv, h)
    if y.dtype in (torch.float16, torch.bfloat16):  # autocast: statistics and pooling in float32
        y, z = y.float(), z.float()
    # Centring by the per-channel means (constants: the result does not depend on them) keeps the
    # sums of squares of batch statistics free of cancellation. Only then: with running statistics a
    # cloud's features must not depend, even by rounding, on the other clouds of its batch.
    if uses_batch_stats(norm):
        y_mean, z_mean = y.detach().mean((0, 2)), z.detach().mean((0, 2))
        y, z = y - y_mean.unsqueeze(-1), z - z_mean.unsqueeze(-1)
        shift = (y_mean + z_mean).unsqueeze(-1)
    else:
        shift = y.new_zeros(y.shape[1], 1)
    if norm_after_pool:
        maximum, total = NeighbourMaxSum.apply(y, idx, pool.uses_mean)
        k = idx.shape[-1]
        mean = total / k + z if pool.uses_mean else None
        return norm(pool.combine(maximum + z, mean) + shift)
    return _batch_norm_pooled(norm, pool, y, z, shift, idx)


def _batch_norm_pooled(norm: nn.Module, pool: Pool, y: Tensor, z: Tensor, shift: Tensor, idx: Tensor) -> Tensor:
    """BatchNorm2d over e = y_j + z_i + shift (B, C, N, k), then pooled over k, from (B, C, N) terms."""
    k = idx.shape[-1]
    weight = norm.weight if norm.weight is not None else y.new_ones(y.shape[1])
    bias = norm.bias if norm.bias is not None else torch.zeros_like(weight)
    sign = torch.where(weight.detach() < 0, -1.0, 1.0).to(y.dtype).unsqueeze(-1)  # max of a·e = a·min(e), a < 0
    signed_max, signed_sum = NeighbourMaxSum.apply(y * sign, idx, True)
    extreme, total = sign * signed_max + z, sign * signed_sum  # max / min of e - shift; sum of y_j
    if uses_batch_stats(norm):
        count = idx.new_zeros(idx.shape[0], y.shape[2], dtype=y.dtype)
        count.scatter_add_(1, idx.reshape(idx.shape[0], -1), torch.ones_like(idx, dtype=y.dtype).view(idx.shape[0], -1))
        n = idx.numel()
        centred_mean = (total.sum((0, 2)) + k * z.sum((0, 2))) / n  # mean of e - shift
        squares = (count.unsqueeze(1) * y.square()).sum((0, 2)) + 2 * (z * total).sum((0, 2))
        var = (squares + k * z.square().sum((0, 2))) / n - centred_mean.square()
        mean = centred_mean + shift.squeeze(-1)
        if synchronises(norm):  # the statistics of every rank's batch (equal on every rank)
            mean, var, n = global_batch_stats(mean, var, n)
            centred_mean = mean - shift.squeeze(-1)
        if norm.training and norm.track_running_stats:
            update_running_stats(norm, mean.detach(), var.detach(), n)
    else:
        centred_mean, var = norm.running_mean - shift.squeeze(-1), norm.running_var
    scale = weight * torch.rsqrt(var + norm.eps)
    mean = total / k + z if pool.uses_mean else None
    pooled = pool.combine(extreme, mean)  # pooled e - shift
    return scale.unsqueeze(-1) * (pooled - centred_mean.unsqueeze(-1)) + bias.unsqueeze(-1)
