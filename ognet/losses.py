"""Re-id losses: cross-entropy plus circle loss, the same numbers on one process or many.

The circle term sees the global batch: features are all-gathered with gradient, every rank computes
the same global value, and the gather's backward (sum over ranks) times DDP's averaging (1/W)
gives each parameter exactly the single-process gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ognet.dist import all_gather, all_gather_with_grad, all_reduce_mean
from ognet.errors import ConfigError

CircleForm = Literal["global", "per_anchor"]
CIRCLE_FORMS: tuple[str, ...] = get_args(CircleForm)
GAMMA = 32.0  # the original's default (train_M.py --gamma); its README commands pass 64 or 96


def _cosine_similarity(features: torch.Tensor) -> torch.Tensor:
    """S = f̂f̂ᵀ with f̂ = f / (‖f‖ + 1e-6), the original's normalisation."""
    f = features / (features.norm(dim=1, keepdim=True) + 1e-6)
    return f @ f.t()


def _masked_logsumexp(
    logits: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp over the entries where `mask`, and whether there was any. Without any the value is
    a finite stand-in, so that a `torch.where` dropping it keeps finite gradients: no host read."""
    found = mask.any(dim, keepdim=True)
    masked = torch.where(found, torch.where(mask, logits, float("-inf")), 0.0)
    return torch.logsumexp(masked, dim), found.squeeze(dim)


def circle_loss(features: torch.Tensor, labels: torch.Tensor, m: float = 0.25, gamma: float = GAMMA) -> torch.Tensor:
    """OG-Net's circle loss: one logsumexp over all positive and all negative pairs i < j.

    Returns the sum-form value before the original's division by the batch size; 0 when the batch
    has no positive or no negative pair (the original's softplus(-inf)). Pairs are selected by
    masks over the whole similarity matrix, not gathered: no host synchronisation.
    """
    n = features.shape[0]
    upper = torch.ones(n, n, dtype=torch.bool, device=features.device).triu(1)  # pairs i < j
    sim = _cosine_similarity(features)
    same = labels[:, None] == labels[None, :]
    alpha_p = torch.clamp_min(1 + m - sim.detach(), 0)
    alpha_n = torch.clamp_min(sim.detach() + m, 0)
    lse_p, any_p = _masked_logsumexp(-gamma * alpha_p * (sim - (1 - m)), upper & same, (0, 1))
    lse_n, any_n = _masked_logsumexp(gamma * alpha_n * (sim - m), upper & ~same, (0, 1))
    # without a positive or a negative pair: 0, still a function of the features, so every rank
    # runs the same backward collectives
    return torch.where(any_p & any_n, F.softplus(lse_n + lse_p), sim.sum() * 0.0)


def circle_loss_per_anchor(
    features: torch.Tensor, labels: torch.Tensor, m: float = 0.25, gamma: float = GAMMA
) -> torch.Tensor:
    """fast-reid / pytorch-metric-learning circle loss: per anchor a logsumexp over its positives
    and one over its negatives, softplus, mean over the anchors that have both (0 if none has).
    Anchors are selected by masks: no host synchronisation."""
    n = features.shape[0]
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(n, dtype=torch.bool, device=features.device)
    neg = ~same
    sim = _cosine_similarity(features)
    alpha_p = torch.clamp_min(1 + m - sim.detach(), 0)
    alpha_n = torch.clamp_min(sim.detach() + m, 0)
    lse_p, any_p = _masked_logsumexp(-gamma * alpha_p * (sim - (1 - m)), pos, 1)
    lse_n, any_n = _masked_logsumexp(gamma * alpha_n * (sim - m), neg, 1)
    anchors = any_p & any_n
    per_anchor = torch.where(anchors, F.softplus(lse_p + lse_n), sim.diagonal() * 0.0)
    return per_anchor.sum() / anchors.sum().clamp_min(1)


@dataclass
class LossTerms:
    """`loss` is what this rank backwards. `ce`, `circle` and `total` are detached values over the
    global batch: what one process with the whole global batch would report, equal on every rank."""

    loss: torch.Tensor
    ce: torch.Tensor
    circle: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.ce + self.circle


class ReidLoss(nn.Module):
    """Cross-entropy (mean, no label smoothing) on this rank's logits, plus optionally a circle term
    over the features of the whole global batch.

    `circle_form="global"` is the original: circle_loss(global batch) / global batch size.
    `"per_anchor"` is the fast-reid/PML form, already a mean, added as is. Which feature the circle
    term sees is the caller's choice (the original uses the post-dropout one).
    """

    def __init__(self, circle: bool = False, m: float = 0.25, gamma: float = GAMMA, circle_form: CircleForm = "global"):
        super().__init__()
        if circle_form not in CIRCLE_FORMS:
            raise ConfigError(f"circle_form {circle_form!r} is not one of {', '.join(CIRCLE_FORMS)}")
        self.circle, self.m, self.gamma, self.circle_form = circle, m, gamma, circle_form

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor | None = None) -> LossTerms:
        ce = F.cross_entropy(logits, labels)
        loss = ce
        circle = torch.zeros((), dtype=ce.dtype, device=ce.device)
        if self.circle:
            if features is None:
                raise ValueError("ReidLoss(circle=True) needs the features")
            all_features, all_labels = all_gather_with_grad(features), all_gather(labels)
            if self.circle_form == "global":
                circle = circle_loss(all_features, all_labels, self.m, self.gamma) / all_features.shape[0]
            else:
                circle = circle_loss_per_anchor(all_features, all_labels, self.m, self.gamma)
            loss = ce + circle
        return LossTerms(loss=loss, ce=all_reduce_mean(ce), circle=circle.detach())


@dataclass(frozen=True)
class LossWarmup:
    """The original's loss warm-up, in closed form so that a resume gets the same factor.

    The original multiplies the loss by a factor that starts at 0.1 and grows by 0.9/warm_iterations
    every iteration (capped at 1) while epoch < warm_epochs, and by 1 from then on. `iteration`
    counts every training iteration since the start, from 0.
    """

    warm_iterations: int
    warm_epochs: int

    def __post_init__(self) -> None:
        if self.warm_epochs < 0 or (self.warm_epochs > 0 and self.warm_iterations < 1):
            raise ConfigError(
                f"warm-up needs warm_epochs >= 0 and warm_iterations >= 1, got "
                f"{self.warm_epochs} and {self.warm_iterations}"
            )

    @classmethod
    def original(cls, num_samples: int, batch_size: int, warm_epochs: int = 10) -> LossWarmup:
        """warm_iterations = round(N / batch size) * warm_epochs, as the original computes it."""
        return cls(round(num_samples / batch_size) * warm_epochs, warm_epochs)

    def factor(self, iteration: int, epoch: int) -> float:
        if epoch >= self.warm_epochs:
            return 1.0
        return min(1.0, 0.1 + 0.9 * (iteration + 1) / self.warm_iterations)
