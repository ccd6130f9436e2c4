"""Where training stands, saved in every checkpoint and restored on resume."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class Progress:
    """Where training stands: the next step to run is `step` of `epoch`."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    skipped_steps: int = 0  # steps not taken for a non-finite loss or gradient (train.nonfinite=skip)
    bad_samples: int = 0  # unreadable samples replaced so far, all ranks (data.bad_samples=skip)

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        unknown = set(state) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"progress holds unknown fields {sorted(unknown)}")
        for name, value in state.items():
            setattr(self, name, int(value))

    def copy(self) -> Progress:
        return dataclasses.replace(self)
