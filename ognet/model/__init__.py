"""OG-Net in pure PyTorch: `build_model(variant, num_classes, **overrides)` and original-checkpoint I/O."""

from ognet.model.convert import export_original, load_original
from ognet.model.network import (
    VARIANTS,
    ModelOutput,
    OGNet,
    OGNetConfig,
    build_from_spec,
    build_model,
    model_config,
    model_spec,
)
from ognet.model.ops import (
    PointOps,
    get_point_ops,
    point_ops,
    select_point_ops,
    set_point_ops,
    using_point_ops,
)

__all__ = [
    "VARIANTS",
    "ModelOutput",
    "OGNet",
    "OGNetConfig",
    "PointOps",
    "build_from_spec",
    "build_model",
    "export_original",
    "load_original",
    "model_config",
    "model_spec",
    "get_point_ops",
    "point_ops",
    "select_point_ops",
    "set_point_ops",
    "using_point_ops",
]
