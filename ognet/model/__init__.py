"""OG-Net in pure PyTorch: `build_model(variant, num_classes, **overrides)` and original-checkpoint I/O."""

from ognet.model.convert import export_original, load_original
from ognet.model.network import VARIANTS, ModelOutput, OGNet, OGNetConfig, build_model, model_config
from ognet.model.ops import PointOps, point_ops, set_point_ops, using_point_ops

__all__ = [
    "VARIANTS",
    "ModelOutput",
    "OGNet",
    "OGNetConfig",
    "PointOps",
    "build_model",
    "export_original",
    "load_original",
    "model_config",
    "point_ops",
    "set_point_ops",
    "using_point_ops",
]
