"""Checkpoints of the original OG-Net code: load, export, and the `ognet-import-original` command.

The original saves `DataParallel(model).state_dict()`: our keys with a `module.` prefix, plus
`logit_scale` in circle-loss models (a parameter that is never used nor updated). The key
table is in `ognet.model.network`. What the weights cannot tell (the norm layer, k) comes from the
snapshot's opts.yaml (`ognet.model.original_opts`) or is given; it is never guessed.
"""

from __future__ import annotations

import argparse
import ast
import pickle
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ognet.checkpoint import save_checkpoint
from ognet.errors import ConfigError, OgnetError
from ognet.model.network import VARIANTS, OGNet, build_model, model_config, model_spec
from ognet.model.original_opts import OPTS_FILE, SnapshotOptions, merge_options, read_opts

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


NORM_UNKNOWN = (
    "the norm layer is not in the weights: a `bn` and a `bn2` checkpoint have the same tensor shapes, so a "
    "wrong guess loads without error and gives wrong features. The snapshot's opts.yaml (norm_layer) says "
    "which; without one, give it: --set norm=bn2 (BatchNorm2d before aggregation: every released snapshot "
    "and every command of the original's current README) or --set norm=bn (BatchNorm1d after aggregation: "
    "train_M.py's default, so the seed README's Duke, CUHK and MSMT commands). A `_bn_` in a snapshot's "
    "folder name does not tell: the released Deep snapshots have it and norm_layer bn2"
)


def infer_model_config(
    state_dict: Mapping[str, Tensor], variant: str | None = None, overrides: Mapping[str, Any] | None = None
) -> tuple[str, int, dict[str, Any]]:
    """(variant, num_classes, overrides) of the model an original state_dict was saved from.

    Classes, embedding size and `gem` are read from shapes and keys; the variant is the one that
    needs the fewest overrides among those whose parameter shapes all match. `norm` leaves no
    trace in the weights and must be in `overrides`; other traceless options (`k`, `dropout`,
    `init_points`) keep the variant's values unless given. The overrides returned are those that
    differ from the variant's values, plus `norm`.
    """
    ours = _strip(state_dict)
    if "proj_output.weight" not in ours or "embs.0.weight" not in ours:
        raise OgnetError("not an OG-Net state_dict: no proj_output.weight / embs.0.weight key")
    if "norm" not in (overrides or {}):
        raise OgnetError(NORM_UNKNOWN)
    num_classes, embedding_dim = ours["proj_output.weight"].shape[0], ours["embs.0.weight"].shape[0]
    inferred: dict[str, Any] = {"embedding_dim": embedding_dim}
    if not any(k.startswith("agg.") for k in ours):
        inferred["gem"] = False
    inferred.update(overrides or {})
    reports, candidates = [], []
    for name in [variant] if variant else list(VARIANTS):
        try:
            full, preset = model_config(name, num_classes, **inferred), model_config(name, num_classes)
        except ConfigError as err:
            reports.append(f"{name}: {err}")
            continue
        needed = {k: v for k, v in inferred.items() if k == "norm" or getattr(full, k) != getattr(preset, k)}
        candidates.append((len(needed), name, needed))
    for _, name, needed in sorted(candidates, key=lambda c: c[0]):
        problems = _mismatches(build_model(name, num_classes, **needed).state_dict(), ours)
        if not problems:
            return name, num_classes, needed
        reports.append(f"{name}: " + "; ".join(problems))
    raise OgnetError("state_dict matches no OG-Net variant (" + " | ".join(reports) + ")")


def _read_state_dict(source: str) -> Mapping[str, Tensor]:
    try:
        state_dict = torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise OgnetError(f"{source}: not readable as a weights-only torch checkpoint: {err}") from err
    if not isinstance(state_dict, Mapping):
        raise OgnetError(f"{source}: expected a state_dict (a mapping), got {type(state_dict).__name__}")
    return state_dict


def snapshot_options(source: str, opts: str | None = None) -> SnapshotOptions | None:
    """The opts.yaml named, else the one beside `source` (where train_M.py writes it), else None."""
    if opts is not None:
        return read_opts(opts)
    beside = Path(source).with_name(OPTS_FILE)
    return read_opts(beside) if beside.is_file() else None


def import_original(
    source: str,
    destination: str,
    variant: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    opts: str | None = None,
) -> dict[str, Any]:
    """Convert an original `.pth` into our checkpoint format; returns what it wrote besides the
    weights: {"model_config": ..., "imported_from": {"checkpoint", "opts"}}.

    Model options come from the snapshot's opts.yaml (`opts`, default: beside `source`) and
    `overrides`; the two must agree, and without an opts.yaml the norm layer must be given.
    """
    state_dict = _read_state_dict(source)
    snapshot = snapshot_options(source, opts)
    options = merge_options(snapshot, overrides or {})
    if "norm" not in options:
        where = (
            f"{snapshot.path} has no norm_layer (test_M.py would take bn)" if snapshot else f"no {OPTS_FILE} beside it"
        )
        raise OgnetError(f"{source}: {where}; {NORM_UNKNOWN}")
    try:
        variant, num_classes, options = infer_model_config(state_dict, variant, options)
    except OgnetError as err:
        raise OgnetError(f"{source}: {err}") from err
    if snapshot and snapshot.num_classes not in (None, num_classes):
        raise OgnetError(
            f"{snapshot.path} says class_num {snapshot.num_classes}, but {source} has {num_classes} classes: "
            "the opts.yaml of another snapshot?"
        )
    model = build_model(variant, num_classes, **options)
    load_original(model, state_dict)
    written = {
        "model_config": model_spec(variant, num_classes, options),
        "imported_from": {"checkpoint": str(source), "opts": str(snapshot.path) if snapshot else None},
    }
    save_checkpoint(destination, {"model": model.state_dict(), **written})
    return written


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
        description="Convert a checkpoint of the original OG-Net code (model_*.pth) into an ognet checkpoint. "
        f"Model options come from the snapshot's {OPTS_FILE} (the original writes one beside the weights).",
    )
    parser.add_argument("source", help="original .pth (a DataParallel state_dict)")
    parser.add_argument("destination", help="ognet checkpoint to write")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="default: inferred from the shapes")
    parser.add_argument("--opts", metavar="PATH", help=f"the snapshot's options (default: {OPTS_FILE} beside SOURCE)")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        type=_parse_override,
        action="append",
        default=[],
        help=f"model option, e.g. --set norm=bn2 or --set k=9; it must agree with {OPTS_FILE}",
    )
    args = parser.parse_args(argv)
    try:
        written = import_original(args.source, args.destination, args.variant, dict(args.overrides), args.opts)
    except (OgnetError, OSError) as err:
        print(f"ognet-import-original: error: {err}", file=sys.stderr)
        return 1
    config = written["model_config"]
    print(f"wrote {args.destination}: {config}")
    if written["imported_from"]["opts"] is None:
        model = model_config(config["variant"], config["num_classes"], **config["overrides"])
        print(
            f"note: no {OPTS_FILE}: k={model.k} and init_points={model.init_points} (not in the weights) are the "
            "values every command of the original's README used for this variant; --set them if it was trained otherwise"
        )
    return 0


if __name__ == "__main__":  # python -m ognet.model.convert
    main()
