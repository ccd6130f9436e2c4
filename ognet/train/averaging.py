"""Weight averaging (the original's `--wa`): the equal-weight mean of the weights after each epoch
from `wa_start * epochs` on, with BatchNorm statistics re-estimated for the averaged weights."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ognet import dist


class WeightAverage:
    """Running mean of a model's parameters, kept in float32 whatever the training precision."""

    def __init__(self, model: nn.Module):
        self.params = {k: v.detach().float().clone() for k, v in model.named_parameters()}
        self.count = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.count += 1
        for name, p in model.named_parameters():
            self.params[name] += (p.detach().float() - self.params[name]) / self.count

    def state_dict(self) -> dict[str, Any]:
        return {"params": self.params, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.params, self.count = state["params"], int(state["count"])

    @torch.no_grad()
    def averaged_model(self, model: nn.Module) -> nn.Module:
        """A float32 copy of `model` holding the averaged parameters (its buffers are the model's)."""
        averaged = copy.deepcopy(model).float()
        for name, p in averaged.named_parameters():
            p.copy_(self.params[name])
        return averaged


@torch.no_grad()
def update_bn(model: nn.Module, batches: Iterable[tuple], device: torch.device) -> None:
    """Re-estimate BatchNorm statistics by one pass over training data (cumulative average), then
    average them over ranks so every rank holds the same model."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for xyz, rgb, *_ in batches:
        model(xyz.to(device), rgb.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        m.running_mean.copy_(dist.all_reduce_mean(m.running_mean))
        m.running_var.copy_(dist.all_reduce_mean(m.running_var))
