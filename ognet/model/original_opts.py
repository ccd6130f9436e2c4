"""The original's `opts.yaml`: the options a snapshot was trained with, and the model they build.

train_M.py writes its argparse options (`vars(opt)`) as `opts.yaml` beside the weights, and
test_M.py rebuilds the model from it. Importing needs it too: the norm layer (`bn` or `bn2`) and
`k` leave no trace in the weights (a `bn` and a `bn2` checkpoint have the same tensor shapes),
yet change the features. Keys are the original's argparse names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ognet.errors import OgnetError
from ognet.io import read_yaml_mapping

OPTS_FILE = "opts.yaml"


def _dims(value: Any) -> tuple[int, ...]:
    """feature_dims: a list in every released opts.yaml, the command's "64,128" string otherwise."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(int(v) for v in items)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


# opts.yaml key -> (our model option, conversion). An absent stride or num_conv is test_M.py's
# fallback (2, 1); it requires k, init_points, id_skip and feature_dims. An absent norm_layer it
# takes as 'bn', which we do not guess: the import then asks for the norm layer.
_OPTIONS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "feature_dims": ("feature_dims", _dims),
    "k": ("k", int),
    "num_conv": ("num_conv", int),
    "id_skip": ("id_skip", int),
    "init_points": ("init_points", int),
    "stride": ("stride", int),
    "norm_layer": ("norm", str),
    "gem": ("gem", _bool),
    "droprate": ("dropout", float),
    "no_xyz": ("use_xyz", lambda v: not _bool(v)),
    "no_se": ("use_se", lambda v: not _bool(v)),
}
_FALLBACKS = {"stride": 2, "num_conv": 1}
_REQUIRED = ("feature_dims", "k", "init_points", "id_skip")
# The one value of each option that ognet's model and input implement (test_M.py builds
# ModelE_dense when `efficient` is set and `use2` is not). An absent key is the original's default.
_IMPLEMENTED = {
    "efficient": True,
    "use2": False,
    "npart": 1,
    "light": False,
    "cluster": "xyzrgb",
    "conv": "EdgeConv",
    "pre_act": False,
    "res_scale": 1.0,
    "ASPP": 0,
    "cg": False,
    "layer_drop": 0,
    "channel": 6,
    "D2": False,
}


@dataclass(frozen=True)
class SnapshotOptions:
    """What an opts.yaml says about the model: our model options and the class count."""

    path: Path
    model: dict[str, Any]
    num_classes: int | None


def read_opts(path: str | Path) -> SnapshotOptions:
    """Read and check an opts.yaml; a value ognet does not implement is an error naming the key."""
    path = Path(path)
    opts = read_yaml_mapping(path, "options file")
    missing = [key for key in _REQUIRED if key not in opts]
    if missing:
        raise OgnetError(f"{path}: no {', '.join(missing)} (test_M.py needs them to build the model)")
    different = [
        f"{key}: {opts[key]!r} (ognet: {want!r})"
        for key, want in _IMPLEMENTED.items()
        if key in opts and opts[key] != want
    ]
    if different:
        raise OgnetError(f"{path}: a model ognet does not implement: {'; '.join(different)}")
    model = {}
    for key, (option, convert) in _OPTIONS.items():
        value = opts.get(key, _FALLBACKS.get(key))
        if value is None:
            continue
        try:
            model[option] = convert(value)
        except (TypeError, ValueError) as err:
            raise OgnetError(f"{path}: {key}: {value!r} is not a valid value ({err})") from err
    num_classes = opts.get("class_num")
    return SnapshotOptions(path, model, int(num_classes) if num_classes is not None else None)


def merge_options(snapshot: SnapshotOptions | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """Options from opts.yaml plus those given by hand; a given value that contradicts the
    snapshot's is an error (both cannot be right, and a wrong one gives wrong features)."""
    merged = dict(snapshot.model) if snapshot else {}
    for key, value in given.items():
        if key in merged and _plain(merged[key]) != _plain(value):
            raise OgnetError(
                f"{snapshot.path} gives {key}={merged[key]!r}, and {key}={value!r} was given: "
                "drop the given value, or name another opts.yaml"
            )
        merged[key] = value
    return merged


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
