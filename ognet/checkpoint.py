"""Checkpoints: atomic, loaded without pickle, found again after a preemption.

A checkpoint is a dict of tensors and plain values saved with `torch.save` and read back with
`weights_only=True`, so a file carrying a pickled object is refused instead of executed:

    {"format": "ognet-checkpoint", "version": 1,
     "model": state_dict, "model_config": {"variant", "num_classes", "overrides"},
     # training checkpoints also hold:
     "optimizer": ..., "progress": {"epoch", "step", "global_step"}, "averaged": ..., "config": ...}

Training checkpoints are `<run>/checkpoints/step-<global step>.pt`; the newest complete one is
resumed. The written file appears only once complete (write to a temporary name, fsync, rename);
the temporary file a killed writer leaves is never taken for a checkpoint and is removed by the
next save in its folder. A full disk raises `DiskFullError` naming the checkpoint.
"""

from __future__ import annotations

import glob
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ognet.errors import OgnetError
from ognet.io import atomic_write, remove_partials

CHECKPOINT_FORMAT = "ognet-checkpoint"
CHECKPOINT_VERSION = 1
_STEP_NAME = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(OgnetError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the model."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically, after removing the partial files that killed saves of this file left (of
    any training checkpoint, for a `step-N.pt`: one process writes them, so none is in progress)."""
    path = Path(path)
    remove_partials(path.parent, "step-*.pt" if _STEP_NAME.match(path.name) else glob.escape(path.name))
    with atomic_write(path) as f:
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}, f)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an ognet checkpoint safely (`weights_only=True`)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint does not exist") from None
    except pickle.UnpicklingError as e:
        if "unsupported global" not in str(e).lower():  # garbage bytes rather than a forbidden object
            raise CheckpointError(f"{path}: unreadable or corrupt checkpoint ({str(e).splitlines()[0]})") from e
        raise CheckpointError(
            f"{path}: refused: the checkpoint holds objects other than tensors and plain "
            f"values, which could run code when loaded; it is not loaded"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({e})") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not an ognet checkpoint (for a checkpoint of the original code use ognet-import-original first)"
        )
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {payload.get('version')}, this ognet reads {CHECKPOINT_VERSION}"
        )
    return payload


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that names the mismatched keys (another variant or class count)."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(ours))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in ours.items()
        if k in state_dict and state_dict[k].shape != v.shape
    )
    if missing or unexpected or shapes:
        parts = [
            f"missing keys {missing[:8]}" if missing else "",
            f"unexpected keys {unexpected[:8]}" if unexpected else "",
            f"shape mismatches {shapes[:8]}" if shapes else "",
        ]
        raise CheckpointError(f"{source}: checkpoint does not fit the model: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state_dict)


def checkpoint_steps(folder: str | Path) -> list[tuple[int, Path]]:
    """(global step, path) of the training checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(folder: str | Path) -> Path | None:
    steps = checkpoint_steps(folder)
    return steps[-1][1] if steps else None


def prune_checkpoints(folder: str | Path, keep: int, partitions: tuple[str, ...] = ()) -> None:
    """Keep the newest `keep` training checkpoints, and the per-rank parts stored beside them in
    `<folder>/<partition>/<checkpoint name>/` (DeepSpeed's)."""
    for _, path in checkpoint_steps(folder)[:-keep] if keep > 0 else []:
        path.unlink(missing_ok=True)
        for name in partitions:
            shutil.rmtree(path.parent / name / path.name, ignore_errors=True)
