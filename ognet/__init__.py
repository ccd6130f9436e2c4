"""ognet: distributed training and evaluation of OG-Net for point-cloud person re-identification.

`ognet.load_model(checkpoint)` and `ognet.extract_features(model, clouds)` (see ognet.extract) are
imported on first use, so that `import ognet` stays light."""

from typing import Any

__version__ = "0.1.0"
_LAZY = {"load_model": "ognet.extract", "extract_features": "ognet.extract"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ognet' has no attribute {name!r}")
