"""OG-Net (`ModelE_dense` of the original code): dynamic-graph EdgeConv layers with multi-scale
set abstraction, a max||mean head, a BN-neck retrieval feature and a linear classifier.

Attribute names are those of the original model, so a state_dict of ours and one saved by the
original code (wrapped in DataParallel) differ only by the `module.` prefix and the original's
`logit_scale` (one parameter the circle-loss models create and never use):

| ours                                   | original (`module.` + ...)     | what                        |
|----------------------------------------|--------------------------------|-----------------------------|
| `conv.{n}`                             | `conv.{n}`                     | EdgeConv 1x1 Conv2d, n = layer * num_conv + sub-block |
| `agg.{n}.p`                            | `agg.{n}.p`                    | max/mean mix ("GeM") weight |
| `bn.{n}`                               | `bn.{n}`                       | BatchNorm2d (`bn2`) or BatchNorm1d (`bn`) |
| `sa.{s}.mlps.{b}.{0,1,3,4}`            | same                           | branch convs / BNs          |
| `sa.{s}.mlps.{b}.2.se_{reduce,expand}` | same                           | SE gate                     |
| `conv_s2.{s}.0`                        | same                           | Deep residual projection    |
| `p_w`                                  | `p_w`                          | Deep residual mix weights   |
| `embs.0`, `bn_embs.0`, `proj_output`   | same                           | head                        |
| -                                      | `logit_scale`                  | unused; dropped on import   |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ognet.errors import ConfigError
from ognet.model.blocks import (
    MaxMeanPool,
    MaxPool,
    PointwiseConv,
    SetAbstraction,
    edge_features,
    max_last,
)
from ognet.model.edgeconv import edge_conv_gathered, edge_conv_pooled, fusable
from ognet.model.ops import gather_points, point_ops

EdgeConvPath = Literal["fused", "gather", "edge_tensor"]


@dataclass(frozen=True)
class OGNetConfig:
    """Constructor options of the original `ModelE_dense` that the paper's commands set."""

    num_classes: int
    feature_dims: tuple[int, ...] = (64, 128, 256, 512)
    k: int = 20  # neighbours per point in EdgeConv
    num_conv: int = 1  # EdgeConv sub-blocks per layer
    id_skip: int = 0  # 2 = learnable residual around every layer (Deep)
    init_points: int = 768  # centres picked by the first set abstraction
    stride: int = 2  # centres shrink by this factor whenever the width grows
    gem: bool = True  # learned max/mean mix instead of max over neighbours
    norm: str = "bn2"  # "bn2": BatchNorm2d before aggregation; "bn": BatchNorm1d after it
    dropout: float = 0.7
    embedding_dim: int = 512
    input_dims: int = 3  # rgb
    use_xyz: bool = True  # xyz offsets join the grouped features in set abstraction
    use_se: bool = True  # SE gate inside set-abstraction MLPs
    radii: tuple[float, ...] = (0.1, 0.2, 0.4)
    nsamples: tuple[int, ...] = (8, 16, 32)
    # how EdgeConv computes (same values up to rounding, see model/edgeconv.py): "fused" conv per
    # point, BatchNorm and pooling from per-point sums; "gather" conv per point, then gathered;
    # "edge_tensor" the original's 1x1 conv over the (B, 2C, N, k) edge tensor. Unless
    # edge_tensor, set abstraction's first conv also runs per point before grouping
    edge_conv: str = "fused"

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"model option {key}={getattr(self, key)!r}: {why}")

        for field in dataclasses.fields(self):
            value, expected = getattr(self, field.name), type(field.default)
            if field.name == "num_classes" or expected is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif expected is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = isinstance(value, expected)
            if not ok:
                raise bad(field.name, f"expected {'int' if field.name == 'num_classes' else expected.__name__}")
        if self.num_classes < 1:
            raise bad("num_classes", "must be >= 1")
        if not self.feature_dims or any(d < 2 or d % 2 for d in self.feature_dims):
            raise bad("feature_dims", "needs at least one even width >= 2")
        for key in ("k", "num_conv", "init_points", "stride", "embedding_dim", "input_dims"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        if self.id_skip not in (0, 2):
            raise bad("id_skip", "supported values are 0 (none) and 2 (learnable residual)")
        if self.norm not in ("bn2", "bn"):
            raise bad("norm", "expected 'bn2' or 'bn'")
        if self.edge_conv not in get_args(EdgeConvPath):
            raise bad("edge_conv", f"expected one of {get_args(EdgeConvPath)}")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "must be in [0, 1)")
        if not self.radii or len(self.radii) != len(self.nsamples):
            raise bad("radii", f"needs one nsample per radius, got nsamples={self.nsamples}")
        if self.id_skip == 2:
            dims = self.feature_dims
            for i in range(1, len(dims)):
                if dims[i] < dims[i - 1]:
                    raise bad("feature_dims", f"id_skip=2 needs non-decreasing widths, layer {i}")
        self.sa_points()  # raises if too few points are left for k neighbours

    def sa_points(self) -> list[int | None]:
        """Per layer: the number of centres its set abstraction keeps, or None (no downsampling).

        Layer 0 always downsamples to init_points; a later layer halves (stride) the centres
        whenever its width grows.
        """
        points: list[int | None] = [self.init_points]
        npoint = self.init_points
        for prev, dim in zip(self.feature_dims, self.feature_dims[1:]):
            if dim > prev:
                npoint //= self.stride
                points.append(npoint)
            else:
                points.append(None)
        if npoint < self.k:
            raise ConfigError(f"model options leave {npoint} points in the last layer, fewer than k={self.k}")
        return points


Variant = Literal["ognet", "ognet-small", "ognet-deep"]
VARIANTS: dict[str, dict[str, Any]] = {
    "ognet": {},
    "ognet-small": {"feature_dims": (48, 96, 192, 384)},
    "ognet-deep": {"feature_dims": (48, 96, 96, 192, 192, 384, 384), "k": 9, "num_conv": 2, "id_skip": 2},
}
assert tuple(VARIANTS) == get_args(Variant)


class ModelOutput(NamedTuple):
    logits: Tensor  # (B, num_classes)
    feature: Tensor  # (B, embedding_dim) BN-neck output: the retrieval feature
    circle_feature: Tensor  # what the original's circle loss sees: `feature` after dropout (train)


class OGNet(nn.Module):
    """OG-Net; forward(xyz (B, N, 3), rgb (B, N, 3)) -> ModelOutput."""

    def __init__(self, config: OGNetConfig) -> None:
        super().__init__()
        self.config = c = config
        dims = c.feature_dims
        self.sa_layers = c.sa_points()
        if c.id_skip == 2:
            self.p_w = nn.Parameter(torch.zeros(len(dims)))
        self.conv = nn.ModuleList()
        self.agg = nn.ModuleList()
        self.bn = nn.ModuleList()
        norm = nn.BatchNorm2d if c.norm == "bn2" else nn.BatchNorm1d
        for i, dim in enumerate(dims):
            c_in = dims[i - 1] if i else c.input_dims
            for j in range(c.num_conv):
                self.conv.append(PointwiseConv(2 * (c_in if j == 0 else dim), dim))
                self.agg.append(MaxMeanPool() if c.gem else MaxPool())
                self.bn.append(norm(dim))
        self.sa = nn.ModuleList(
            SetAbstraction(npoint, dims[i], c.radii, c.nsamples, c.use_xyz, c.use_se, c.edge_conv != "edge_tensor")
            for i, npoint in enumerate(self.sa_layers)
            if npoint is not None
        )
        if c.id_skip == 2:
            self.conv_s2 = nn.ModuleList(
                nn.Sequential(nn.Linear(dims[i - 1] if i else c.input_dims, dims[i]), nn.LeakyReLU(0.2))
                for i, npoint in enumerate(self.sa_layers)
                if npoint is not None
            )
        self.embs = nn.ModuleList([nn.Linear(2 * dims[-1], c.embedding_dim, bias=False)])
        self.bn_embs = nn.ModuleList([nn.BatchNorm1d(c.embedding_dim)])
        self.dropout = nn.Dropout(c.dropout)
        self.proj_output = nn.Linear(c.embedding_dim, c.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original initialisation (reference 3.3)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_out")
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.normal_(m.weight, 1.0, 0.02)
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)) and m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.proj_output.weight, std=1e-6)  # initial logits ~1e-4
        nn.init.zeros_(self.proj_output.bias)
        for m in self.agg:
            if isinstance(m, MaxMeanPool):
                nn.init.zeros_(m.p)
        if self.config.id_skip == 2:
            nn.init.zeros_(self.p_w)

    def _edge_conv(self, n: int, h: Tensor, idx: Tensor) -> Tensor:
        """One EdgeConv sub-block over the kNN graph idx: Conv2d, BN, aggregation over k, LeakyReLU."""
        path = self.config.edge_conv
        if path == "fused" and fusable(self.bn[n]):
            pooled = edge_conv_pooled(
                self.conv[n], self.bn[n], self.agg[n], h, idx, norm_after_pool=self.config.norm == "bn"
            )
            return F.leaky_relu(pooled, 0.2)
        gathered = path != "edge_tensor"
        e = edge_conv_gathered(self.conv[n], h, idx) if gathered else self.conv[n](edge_features(h, idx))
        if self.config.norm == "bn2":
            e = self.bn[n](e)
        h = self.agg[n](e)
        if self.config.norm == "bn":
            h = self.bn[n](h)
        return F.leaky_relu(h, 0.2)

    def forward(self, xyz: Tensor, rgb: Tensor) -> ModelOutput:
        """xyz, rgb: (B, N, 3). Features are kept as (B, C, N) throughout."""
        c = self.config
        h = rgb.transpose(1, 2)
        last = len(c.feature_dims) - 1
        s = 0
        skip_mix = torch.sigmoid(self.p_w).unbind() if c.id_skip == 2 else ()  # one sigmoid for all layers
        for i, npoint in enumerate(self.sa_layers):
            h_in, xyz_in = h, xyz
            xyz_t = xyz.transpose(1, 2)
            # The last layer finds neighbours in xyz||feature space, the others in xyz space: there
            # the graph is the same for every sub-block (Deep has two), found once.
            idx = None if i == last else point_ops().knn(xyz_t, c.k)
            for j in range(c.num_conv):
                graph = point_ops().knn(torch.cat([xyz_t, h], dim=1), c.k) if idx is None else idx
                h = self._edge_conv(i * c.num_conv + j, h, graph)
            if npoint is not None:
                xyz, h, centre_idx = self.sa[s](xyz_in, h)
                if c.id_skip == 2:
                    picked = gather_points(h_in, centre_idx).transpose(1, 2)
                    h_in = self.conv_s2[s](picked).transpose(1, 2)
                s += 1
            if c.id_skip == 2:  # a·h_in + (1 - a)·h as one lerp (a fifth of the ops, forward and backward)
                h = torch.lerp(h, h_in, skip_mix[i])
        pooled = torch.cat([max_last(h), h.mean(dim=2)], dim=1)
        feature = self.bn_embs[0](self.embs[0](pooled))
        circle_feature = self.dropout(feature)
        return ModelOutput(self.proj_output(circle_feature), feature, circle_feature)


def model_config(variant: str, num_classes: int, **overrides: Any) -> OGNetConfig:
    """The config of a named variant with overrides; unknown variants or options raise ConfigError."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown model variant {variant!r}; expected one of {sorted(VARIANTS)}")
    known = {f.name for f in dataclasses.fields(OGNetConfig)} - {"num_classes"}
    for key in overrides:
        if key not in known:
            raise ConfigError(f"unknown model option {key!r}; expected one of {sorted(known)}")
    options = {**VARIANTS[variant], **overrides}
    for key in ("feature_dims", "radii", "nsamples"):
        if key in options:
            options[key] = tuple(options[key])
    return OGNetConfig(num_classes=num_classes, **options)


def build_model(variant: str, num_classes: int, **overrides: Any) -> OGNet:
    """OG-Net variant `ognet`, `ognet-small` or `ognet-deep`, any option overridden by keyword."""
    return OGNet(model_config(variant, num_classes, **overrides))


def model_spec(variant: str, num_classes: int, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The plain-data description of a model that checkpoints carry (their "model_config"): enough
    to build it again (`build_from_spec`); tuples become lists so it reads back from any format."""
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    return {"variant": variant, "num_classes": num_classes, "overrides": plain}


def build_from_spec(spec: Mapping[str, Any]) -> OGNet:
    return build_model(spec["variant"], spec["num_classes"], **spec.get("overrides", {}))
