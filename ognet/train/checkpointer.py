"""The training checkpoint: what it holds, when it is written, and how a resume restores it.

The main rank writes `<folder>/step-<global step>.pt` (atomic, see ognet.checkpoint) with every
stateful component's `state_dict()` under its name and a few constants (the model's config, the
run's config); every rank writes its own part of each partitioned component (DeepSpeed's ZeRO
state) to `<folder>/<name>/step-<global step>.pt/`. A resume loads the newest complete file and
hands each component its state back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ognet import dist
from ognet.checkpoint import latest_checkpoint, load_checkpoint, load_model_state, prune_checkpoints, save_checkpoint
from ognet.train.engine import Partitioned, Stateful

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(
        self,
        folder: Path,
        keep: int,
        info: dist.DistInfo,
        stateful: Mapping[str, Stateful],
        partitioned: Mapping[str, Partitioned],
        constants: Mapping[str, Any],
    ):
        self.folder, self.keep, self.info = folder, keep, info
        self.stateful, self.partitioned, self.constants = dict(stateful), dict(partitioned), dict(constants)

    def save(self, global_step: int) -> Path:
        """Write the checkpoint of `global_step` on every rank's part, prune old ones, then meet."""
        path = self.folder / f"step-{global_step:08d}.pt"
        for name, component in self.partitioned.items():
            component.save(self.folder / name / path.name)
        if self.partitioned:
            dist.barrier()  # every part on disk before the file that marks the checkpoint complete
        if self.info.is_main:
            states = {name: component.state_dict() for name, component in self.stateful.items()}
            save_checkpoint(path, {**states, **self.constants})
            prune_checkpoints(self.folder, self.keep, partitions=tuple(self.partitioned))
        dist.barrier()
        return path

    @property
    def latest(self) -> Path | None:
        return latest_checkpoint(self.folder)

    def resume(self) -> Path | None:
        """Restore every component from the newest checkpoint, if there is one; returns its path.
        A component the checkpoint has no state for (e.g. weight averaging switched on since) keeps
        its fresh state, with a warning."""
        path = self.latest
        if path is None:
            return None
        payload = load_checkpoint(path, map_location=self.info.device)
        for name, component in self.stateful.items():
            if name not in payload:
                log.warning("%s holds no %r state: it starts fresh", path, name)
            elif isinstance(component, nn.Module):
                load_model_state(component, payload[name], str(path))
            else:
                component.load_state_dict(payload[name])
        for name, component in self.partitioned.items():
            component.load(self.folder / name / path.name)
        return path

    def save_weights(self, path: Path, module: nn.Module, step: int) -> Path:
        """A model file for evaluation and export (main rank): weights, model config, the step."""
        if self.info.is_main:
            save_checkpoint(
                path, {"model": module.state_dict(), "model_config": self.constants["model_config"], "step": step}
            )
        return path


CLASSIFIER = ("proj_output.weight", "proj_output.bias")  # the only tensors whose shape depends on the data set


def init_weights(model: nn.Module, path: str | Path) -> str:
    """Load the weights of another run (fine-tuning) into `model`; returns what was done, for the
    log. Every tensor must fit (another variant or option is an error naming the keys), except the
    classifier, which keeps its fresh initialisation when the class count differs."""
    state = dict(load_checkpoint(path)["model"])
    ours = model.state_dict()
    note = "classifier too"
    theirs, mine = state.get(CLASSIFIER[0]), ours[CLASSIFIER[0]]
    if theirs is not None and theirs.shape != mine.shape:
        state.update({key: ours[key] for key in CLASSIFIER})
        note = f"classifier re-initialised ({theirs.shape[0]} -> {mine.shape[0]} classes)"
    load_model_state(model, state, str(path))
    return f"weights initialised from {path} ({note}); schedule from the start"
