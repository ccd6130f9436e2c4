"""What the ranks must agree on after every step, in one small all-reduce, read without stalling.

Three things decide what the host does next and must be the same on every rank: a preemption
signal (SLURM's warning, SIGTERM) that any rank received, unreadable samples replaced in the
step's global batch, and a non-finite loss or gradient. After each step the ranks sum one
vector [preempt, replaced samples, non-finite losses] (the gradients' finiteness needs no vote:
they are equal on every rank after DDP's all-reduce, and a non-finite loss poisons them, see
`engine.poisoned`). The host reads a step's vector only once the device has got there (a CUDA
event), so no step waits for the host; on CPU it is read at once. Acting late is safe: a
non-finite step was already skipped on the device, and under `stop` every later step is held too
(`Trainer.halted`), so the model is still the one before the bad step when the host sees it.
"""

from __future__ import annotations

import signal
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ognet import dist
from ognet.train.progress import Progress

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Set by SIGUSR1/SIGTERM (SLURM's warning signal, a preemption); acted on at a step boundary."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = {s: signal.signal(s, self._handle) for s in PREEMPT_SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@dataclass(frozen=True)
class Verdict:
    """What every rank learnt about one step; `before` is where training stood before it."""

    before: Progress
    preempt: bool
    bad_samples: int
    nonfinite: str | None  # "loss", "gradient" or None


class Agreement:
    def __init__(self, device: torch.device):
        self.device = device
        self.flag = PreemptionFlag()
        self.pending: deque[tuple[Progress, torch.Tensor, torch.cuda.Event | None]] = deque()

    def vote(
        self, before: Progress, replaced: torch.Tensor | None, loss: torch.Tensor, nonfinite_grad: torch.Tensor
    ) -> torch.Tensor:
        """All-reduce this step's votes (no host read); returns the device flag of a non-finite step."""
        preempt = torch.full((), float(self.flag.raised), device=self.device)  # a fill, no host-to-device copy
        bad = replaced.sum().float() if replaced is not None else torch.zeros((), device=self.device)
        local = torch.stack([preempt, bad.to(self.device), (~torch.isfinite(loss.detach())).float()])
        votes = dist.all_reduce_sum(local)
        packed = torch.cat([votes, nonfinite_grad.float().reshape(1)])
        self.pending.append((before, *self._to_host(packed)))
        return (votes[2] > 0) | nonfinite_grad

    def _to_host(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if self.device.type != "cuda":
            return packed, None
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def verdicts(self, wait: bool = False) -> Iterator[Verdict]:
        """The verdicts of the steps the device has finished, oldest first (all of them if `wait`)."""
        while self.pending:
            before, host, event = self.pending[0]
            if event is not None and not wait and not event.query():
                return
            if event is not None:
                event.synchronize()
            self.pending.popleft()
            preempt, bad, nonfinite_loss, nonfinite_grad = host.tolist()
            nonfinite = "loss" if nonfinite_loss else "gradient" if nonfinite_grad else None
            yield Verdict(before, preempt > 0, int(bad), nonfinite)

    def close(self) -> None:
        self.flag.restore()
