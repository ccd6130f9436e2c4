"""Checkpoints of the original OG-Net code: load, export, and the `ognet-import-original` command.

The original saves `DataParallel(model).state_dict()`: our keys with a `module.` prefix, plus
`logit_scale` in circle-loss models (a parameter that is never used nor updated). The key
table is in `ognet.model.network`.
"""

from __future__ import annotations

import argparse
import ast
import pickle
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ognet.checkpoint import save_checkpoint
from ognet.errors import OgnetError
from ognet.model.network import VARIANTS, OGNet, build_model, model_spec

PREFIX = "module."
UNUSED_KEYS = ("logit_scale",)


def _strip(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Original keys -> ours: drop the DataParallel prefix and the unused `logit_scale`."""
    out = {}
    for key, value in state_dict.items():
        key = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if key not in UNUSED_KEYS:
            out[key] = value
    return out


def _mismatches(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> list[str]:
    """Human-readable differences between two state_dicts (missing, unexpected, mis-shaped keys)."""
    problems = []
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} {tuple(given[k].shape)} (model has {tuple(expected[k].shape)})"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if keys:
            shown = ", ".join(PREFIX + k for k in keys[:8])
            more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
            problems.append(f"{len(keys)} {what}: {shown}{more}")
    return problems


def load_original(model: OGNet, state_dict: Mapping[str, Tensor]) -> None:
    """Load a state_dict saved by the original code into `model`, strictly.

    Raises OgnetError naming the missing, unexpected and mis-shaped keys (e.g. another variant
    or class count).
    """
    ours = _strip(state_dict)
    problems = _mismatches(model.state_dict(), ours)
    if problems:
        raise OgnetError("original checkpoint does not fit the model: " + "; ".join(problems))
    model.load_state_dict(ours, strict=True)


def export_original(model: OGNet, logit_scale: float | None = None) -> dict[str, Tensor]:
    """The model's state_dict in the original key layout (`module.` keys).

    A circle-loss model of the original code also expects `logit_scale` under a strict load;
    pass a value to include it (it never affects the output).
    """
    out = {}
    if logit_scale is not None:
        out[PREFIX + "logit_scale"] = torch.tensor(float(logit_scale))
    out.update({PREFIX + k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def infer_model_config(
    state_dict: Mapping[str, Tensor], variant: str | None = None, overrides: Mapping[str, Any] | None = None
) -> tuple[str, int, dict[str, Any]]:
    """(variant, num_classes, overrides) of the model an original state_dict was saved from.

    Classes, embedding size and `gem` are read from shapes and keys; the variant is the first
    whose parameter shapes all match. Options that leave no trace in the weights (`k`, `norm`
    'bn' vs 'bn2', `dropout`) keep the variant's defaults unless given in `overrides`.
    """
    ours = _strip(state_dict)
    if "proj_output.weight" not in ours or "embs.0.weight" not in ours:
        raise OgnetError("not an OG-Net state_dict: no proj_output.weight / embs.0.weight key")
    num_classes, embedding_dim = ours["proj_output.weight"].shape[0], ours["embs.0.weight"].shape[0]
    inferred: dict[str, Any] = {}
    if embedding_dim != 512:
        inferred["embedding_dim"] = embedding_dim
    if not any(k.startswith("agg.") for k in ours):
        inferred["gem"] = False
    inferred.update(overrides or {})
    candidates = [variant] if variant else list(VARIANTS)
    reports = []
    for name in candidates:
        model = build_model(name, num_classes, **inferred)
        problems = _mismatches(model.state_dict(), ours)
        if not problems:
            return name, num_classes, inferred
        reports.append(f"{name}: " + "; ".join(problems))
    raise OgnetError("state_dict matches no OG-Net variant (" + " | ".join(reports) + ")")


def import_original(
    source: str, destination: str, variant: str | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Convert an original `.pth` into our checkpoint format; returns the model_config written."""
    try:
        state_dict = torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as err:
        raise OgnetError(f"{source}: not readable as a weights-only torch checkpoint: {err}") from err
    if not isinstance(state_dict, Mapping):
        raise OgnetError(f"{source}: expected a state_dict (a mapping), got {type(state_dict).__name__}")
    variant, num_classes, options = infer_model_config(state_dict, variant, overrides)
    model = build_model(variant, num_classes, **options)
    load_original(model, state_dict)
    config = model_spec(variant, num_classes, options)
    save_checkpoint(destination, {"model": model.state_dict(), "model_config": config})
    return config


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word such as bn


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ognet-import-original",
        description="Convert a checkpoint of the original OG-Net code (model_*.pth) into an ognet checkpoint.",
    )
    parser.add_argument("source", help="original .pth (a DataParallel state_dict)")
    parser.add_argument("destination", help="ognet checkpoint to write")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="default: inferred from the shapes")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        type=_parse_override,
        action="append",
        default=[],
        help="model option the weights cannot tell, e.g. --set norm=bn (the Duke/CUHK/MSMT Deep runs) or --set k=9",
    )
    args = parser.parse_args(argv)
    try:
        config = import_original(args.source, args.destination, args.variant, dict(args.overrides))
    except (OgnetError, OSError) as err:
        print(f"ognet-import-original: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.destination}: {config}")
    return 0
