"""Building blocks of OG-Net: EdgeConv pieces, the max/mean pooling, SE gate, multi-scale set abstraction.

Sub-module names (`mlps`, `se_reduce`, `se_expand`) and the position of every layer inside
`nn.Sequential` follow the original code, so state_dict keys match it (see `network`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ognet.model.ops import gather_points, group_points, point_ops


def edge_features(h: Tensor, idx: Tensor) -> Tensor:
    """EdgeConv input (B, 2C, N, k) = concat(neighbour - centre, centre) for h (B, C, N), idx (B, N, k)."""
    neighbours = group_points(h, idx)
    centres = h.unsqueeze(-1).expand_as(neighbours)
    return torch.cat([neighbours - centres, centres], dim=1)


def max_last(x: Tensor) -> Tensor:
    """Max over the last dim whose gradient goes to one maximum, as the original's max / max_pool2d.

    (`amax` splits it among ties and its backward makes several full-size passes.)
    """
    return x.max(dim=-1).values


class PointwiseConv(nn.Conv2d):
    """1x1 Conv2d computed as a batched matmul over the flattened positions.

    Same parameters (and state_dict keys) as nn.Conv2d(kernel_size=1). On CPU oneDNN's NCHW 1x1
    convolution and torch.matmul's broadcast (which copies the input) ran about 2x slower
    (forward + backward) on OG-Net's shapes.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        w = self.weight.view(1, self.out_channels, c).expand(b, -1, -1)
        if self.bias is None:
            y = torch.bmm(w, x.reshape(b, c, -1))
        else:  # the bias in the same op: one launch less
            y = torch.baddbmm(self.bias.to(x.dtype).view(1, -1, 1), w, x.reshape(b, c, -1))
        return y.view(b, self.out_channels, *x.shape[2:])


class MaxMeanPool(nn.Module):
    """sigmoid(p) * max + (1 - sigmoid(p)) * mean over the last dim, p a learned scalar (init 0).

    The original calls this GeM (`--gem`); it is a learned mix of max and mean pooling.
    """

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    uses_mean = True

    def forward(self, x: Tensor) -> Tensor:
        return self.combine(max_last(x), x.mean(dim=-1))

    def combine(self, maximum: Tensor, mean: Tensor) -> Tensor:
        """The pooled value from the max and the mean over the neighbours (EdgeConv's fused path)."""
        w = torch.sigmoid(self.p)
        return w * maximum + (1 - w) * mean


class MaxPool(nn.Module):
    """Max over the last dim: the aggregation without `--gem`."""

    uses_mean = False

    def forward(self, x: Tensor) -> Tensor:
        return max_last(x)

    def combine(self, maximum: Tensor, mean: Tensor | None) -> Tensor:
        return maximum


class SqueezeExcite(nn.Module):
    """Per-position SE gate of the modified pointnet2 MLP: no global pooling, swish inside."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = max(1, int(channels / 24))
        self.se_reduce = PointwiseConv(channels, squeezed)
        self.se_expand = PointwiseConv(squeezed, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.se_expand(F.silu(self.se_reduce(x))))


def branch_mlp(in_channels: int, channels: int, use_se: bool) -> nn.Sequential:
    """Conv(in -> C/2) -> BN -> [SE] -> Conv(C/2 -> C) -> BN -> ReLU, convs 1x1 without bias.

    As the original `build_shared_mlp` for [C(+3), C/2, C]: no activation between the convs.
    """
    mid = channels // 2
    layers: list[nn.Module] = [PointwiseConv(in_channels, mid, bias=False), nn.BatchNorm2d(mid)]
    if use_se:
        layers.append(SqueezeExcite(mid))
    layers += [PointwiseConv(mid, channels, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*layers)


class SetAbstraction(nn.Module):
    """Multi-scale set abstraction (PointnetSAModuleMSG with fuse='add').

    FPS picks `npoint` centres; each radius branch groups its ball-query neighbours as
    concat(xyz offset (not divided by the radius), features), runs its MLP, takes the max over
    neighbours; the branch outputs are summed.
    """

    def __init__(
        self,
        npoint: int,
        channels: int,
        radii: Sequence[float],
        nsamples: Sequence[int],
        use_xyz: bool = True,
        use_se: bool = True,
        conv_before_grouping: bool = False,
    ) -> None:
        super().__init__()
        self.conv_before_grouping = conv_before_grouping
        self.npoint = npoint
        self.radii = tuple(radii)
        self.nsamples = tuple(nsamples)
        self.use_xyz = use_xyz
        in_channels = channels + 3 if use_xyz else channels
        self.mlps = nn.ModuleList(branch_mlp(in_channels, channels, use_se) for _ in radii)

    def forward(self, xyz: Tensor, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """xyz (B, N, 3), features (B, C, N) -> centres (B, M, 3), features (B, C, M), FPS idx (B, M)."""
        ops = point_ops()
        centre_idx = ops.farthest_point_sample(xyz, self.npoint)
        xyz_t = xyz.transpose(1, 2)
        centres_t = gather_points(xyz_t, centre_idx)  # (B, 3, M)
        groups = ops.ball_query(xyz, centres_t.transpose(1, 2), self.radii, self.nsamples)
        out = None
        if self.conv_before_grouping:  # once for all branches: [xyz ; f] and -c
            points = torch.cat([xyz_t, features], dim=1) if self.use_xyz else features
            neg_centres = -centres_t
        for mlp, idx in zip(self.mlps, groups):
            if self.conv_before_grouping:
                branch = max_last(mlp[1:](self._first_conv_grouped(mlp[0], points, neg_centres, idx)))
            else:
                grouped = group_points(features, idx)
                if self.use_xyz:
                    offsets = group_points(xyz_t, idx) - centres_t.unsqueeze(-1)
                    grouped = torch.cat([offsets, grouped], dim=1)
                branch = max_last(mlp(grouped))
            out = branch if out is None else out + branch
        return centres_t.transpose(1, 2), out, centre_idx

    def _first_conv_grouped(self, conv: PointwiseConv, points: Tensor, neg_centres: Tensor, idx: Tensor) -> Tensor:
        """conv(grouped [xyz_j - c_i ; f_j]) = (conv [xyz ; f] per point) gathered + W_xyz·(-c_i).

        The conv runs over N points instead of M·S grouped columns (2-6x fewer FLOPs at OG-Net's
        sizes) and the (B, C+3, M, S) grouped input is never built. points: [xyz ; f] (f without
        use_xyz); -c, not c: an add's backward has no negation (one op less per branch).
        """
        per_point = group_points(conv(points), idx)
        if not self.use_xyz:
            return per_point
        w_xyz = conv.weight.view(conv.out_channels, -1)[:, :3]  # a view and a slice: one backward op
        centre_term = torch.bmm(w_xyz.unsqueeze(0).expand(neg_centres.shape[0], -1, -1), neg_centres)
        return per_point + centre_term.unsqueeze(-1)
