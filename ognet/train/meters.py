"""Training metrics: meters of one log window, reset at every log (OpenCLIP's `AverageMeter` pattern).

A per-step TensorBoard tag therefore shows the window's value: `train/samples_per_s` is the
samples of the window over its wall time, `train/loss` the mean loss of its steps. Loss terms and
gradient norms are summed on the device and read only when logged (one host synchronisation per
log step, none on other steps).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ognet.losses import LossTerms
from ognet.monitor import Monitor
from ognet.train.engine import StepResult
from ognet.train.progress import Progress


class AverageMeter:
    """Sum and count since the last reset; the values may be device tensors (no host read)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sum: Any = 0.0
        self.count: Any = 0

    def update(self, value: Any, n: Any = 1) -> None:
        self.sum = self.sum + value * n
        self.count = self.count + n

    @property
    def avg(self) -> float:
        """The mean (a host read when the sums live on the device); NaN before any update."""
        count = float(self.count)
        return float(self.sum) / count if count else float("nan")


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TrainMetrics:
    def __init__(self, monitor: Monitor, world_size: int, device: torch.device):
        self.monitor, self.world_size, self.device = monitor, world_size, device
        self.loss, self.ce, self.circle, self.grad_norm = AverageMeter(), AverageMeter(), AverageMeter(), AverageMeter()
        self.reset()

    def reset(self) -> None:
        for meter in (self.loss, self.ce, self.circle, self.grad_norm):
            meter.reset()
        self.steps, self.samples, self.data_wait = 0, 0, 0.0
        self.started = time.perf_counter()

    def timed(self, batches: Iterable[Any]) -> Iterator[Any]:
        """`batches`, adding the time spent waiting for each to the window's data wait."""
        iterator = iter(batches)
        while True:
            tic = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.data_wait += time.perf_counter() - tic
            yield batch

    def update(self, terms: LossTerms, result: StepResult, local_batch: int) -> None:
        """Device sums only: a handful of device ops, no host read."""
        self.loss.update(terms.total)
        self.ce.update(terms.ce)
        self.circle.update(terms.circle)
        taken = (~result.skipped).float()  # the mean norm is over the steps taken
        self.grad_norm.update(torch.where(result.skipped, 0.0, result.grad_norm), taken)
        self.steps += 1
        self.samples += local_batch * self.world_size

    def write(self, progress: Progress, steps_per_epoch: int, lr: float, factor: float) -> None:
        """Log the window (a host read of the device sums) and start the next one."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.samples / elapsed
        loss, ce, circle = self.loss.avg, self.ce.avg, self.circle.avg
        self.monitor.log(
            f"epoch {progress.epoch} step {progress.step}/{steps_per_epoch} loss {loss:.4f} "
            f"(ce {ce:.4f} circle {circle:.4f}) x{factor:.3f} lr {lr:.2e} {rate:.1f} samples/s"
        )
        values = {
            "train/loss": loss,
            "train/ce": ce,
            "train/circle": circle,
            "train/loss_warmup": factor,
            "train/lr": lr,
            "train/samples_per_s": rate,
            "train/step_time_s": elapsed / max(self.steps, 1),
            "train/data_wait_fraction": min(self.data_wait / elapsed, 1.0),
            "train/grad_norm": self.grad_norm.avg,
            "train/skipped_steps": progress.skipped_steps,
            "train/bad_samples": progress.bad_samples,
            "train/peak_memory_mb": peak_memory_mb(self.device),
        }
        self.monitor.scalars(values, progress.global_step)
        self.reset()
