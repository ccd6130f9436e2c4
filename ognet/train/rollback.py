"""Put back the buffers (BatchNorm's running statistics) of a step that was not taken.

The forward moves BatchNorm's statistics before anyone knows whether the step will be taken; a
skipped step must leave them as they were, or a resumed run would not replay it exactly. Saving
and restoring works on one flat tensor per dtype and costs a handful of device ops per step
whatever the number of BatchNorm layers, with no host read of the decision.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn


class BufferRollback:
    def __init__(self, module: nn.Module):
        groups: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
        for buffer in module.buffers():
            groups[buffer.dtype].append(buffer)
        self.groups = list(groups.values())  # the module's own buffer tensors, updated in place
        self.sizes = [[b.numel() for b in group] for group in self.groups]
        self.saved: list[torch.Tensor] = []

    def save(self) -> None:
        """Snapshot the buffers before a step (one concatenation per dtype)."""
        self.saved = [torch.cat([b.reshape(-1) for b in group]) for group in self.groups]

    def restore_where(self, skipped: torch.Tensor) -> None:
        """Buffers back to the snapshot where `skipped` (a device bool) is true; unchanged otherwise.
        A select, not arithmetic: the statistics of a non-finite step may hold NaN."""
        for group, sizes, saved in zip(self.groups, self.sizes, self.saved):
            chosen = torch.where(skipped, saved, torch.cat([b.reshape(-1) for b in group]))
            parts = [part.view_as(b) for part, b in zip(chosen.split(sizes), group)]  # views: no copies
            torch._foreach_copy_(group, parts)
