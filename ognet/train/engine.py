"""Engines: what turns a loss into an optimizer step, behind one small protocol.

`DDPEngine` (DistributedDataParallel, or the bare model in one process) and `DeepSpeedEngine`
(ZeRO 1/2) are siblings: each builds its own optimizer around the same torch Adam and says what a
checkpoint must hold of it (`stateful`: saved by the main rank; `partitioned`: saved by every rank).
"""

from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn as nn

from ognet import dist
from ognet.config import Config
from ognet.errors import ConfigError, OgnetError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class StepResult(NamedTuple):
    """What a step did, as device tensors (reading them is a host synchronisation)."""

    grad_norm: torch.Tensor  # norm of the unscaled gradients; NaN or inf when they are not finite
    skipped: torch.Tensor  # bool: the optimizer did not step, so the model is as before this step
    nonfinite: torch.Tensor  # bool: the gradients were not finite (fp16 overflows, which the scaler owns, excluded)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Partitioned(Protocol):
    """State every rank writes to and reads from its own files of a shared folder."""

    def save(self, folder: Path) -> None: ...
    def load(self, folder: Path) -> None: ...


class Engine(Protocol):
    model: nn.Module  # what the training step calls (the wrapped module)
    stateful: dict[str, Stateful]  # what the main rank's checkpoint file holds of the engine
    partitioned: dict[str, Partitioned]  # what every rank writes beside it

    def autocast(self) -> contextlib.AbstractContextManager: ...
    def set_lr(self, lr: float) -> None: ...
    def backward_and_step(self, loss: torch.Tensor, factor: float, hold: torch.Tensor) -> StepResult: ...


def make_optimizer(model: nn.Module, config: Config, fused: bool = False) -> torch.optim.Adam:
    """The original's optimizer: Adam (amsgrad), coupled L2 weight decay, one group for everything.
    `fused` computes the same update in one kernel and can skip it on the device (`found_inf`)."""
    o = config.optim
    return torch.optim.Adam(
        model.parameters(),
        lr=o.lr,
        betas=o.betas,
        eps=o.eps,
        weight_decay=o.weight_decay,
        amsgrad=o.amsgrad,
        fused=fused or None,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def gradient_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """2-norm of all gradients on the device (three ops, no host read)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return torch.zeros((), device=optimizer.param_groups[0]["params"][0].device)
    if len({(g.device, g.dtype) for g in grads}) > 1:
        return torch.nn.utils.get_total_norm(grads)
    # get_total_norm's arithmetic for one device and dtype in 3 ops; it adds a `.to(device)` per
    # parameter (no copy, but one dispatch each: 145-204 per OG-Net step)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)


def poisoned(loss: torch.Tensor, factor: float) -> torch.Tensor:
    """`loss * factor`, made NaN when the loss is not finite. Every gradient is then NaN, and
    DDP's all-reduce carries that to every rank: all ranks skip the step, with no vote and no
    host read, even when only one rank's loss overflowed."""
    return loss * torch.where(torch.isfinite(loss), factor, torch.nan)


# torch 2.13 renamed DDP's broadcast_buffers (deprecated, still honoured) to forward_sync_buffers.
_DDP_PARAMETERS = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
_NO_FORWARD_BUFFER_SYNC = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_PARAMETERS else "broadcast_buffers"


class DDPEngine:
    """DistributedDataParallel (or the bare model in one process), autocast, fp16 grad scaling.

    The step never reads the device: non-finite gradients (equal on every rank after the all-reduce)
    make the fused Adam skip its update on the device (`found_inf`), as does `hold`."""

    def __init__(self, model: nn.Module, config: Config, info: dist.DistInfo):
        self.precision, self.device = config.train.precision, info.device
        if self.precision == "fp16" and info.device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs CUDA; use bf16 on CPU")
        self.optimizer = make_optimizer(model, config, fused=True)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        ids = [info.device.index] if info.device.type == "cuda" else None
        # Synchronised BatchNorm keeps the statistics equal on every rank: no broadcast of rank 0's
        # buffers before each forward (one collective per step saved).
        synced = dist.sync_bn_enabled(config.train.sync_bn, info.world_size)
        options = {_NO_FORWARD_BUFFER_SYNC: False} if synced else {}
        self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids, **options) if info.backend else model
        self.stateful: dict[str, Stateful] = {"optimizer": self.optimizer}
        if self.scaler is not None:
            self.stateful["scaler"] = self.scaler
        self.partitioned: dict[str, Partitioned] = {}

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def backward_and_step(self, loss: torch.Tensor, factor: float, hold: torch.Tensor) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            return self._scaled_step(poisoned(loss, factor), hold)
        poisoned(loss, factor).backward()
        norm = gradient_norm(self.optimizer)
        nonfinite = ~torch.isfinite(norm)
        skipped = nonfinite | hold
        self._step(skipped)
        return StepResult(norm, skipped, nonfinite)

    def _scaled_step(self, loss: torch.Tensor, hold: torch.Tensor) -> StepResult:
        """fp16: the scaler finds overflows itself and owns them (its scale search needs them), so
        they skip the step without counting as non-finite."""
        assert self.scaler is not None
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = gradient_norm(self.optimizer)  # of the unscaled gradients: not finite on an overflow
        skipped = ~torch.isfinite(norm) | hold
        self._step(skipped)
        self.scaler.update()  # lowers the scale after an overflow (found by unscale_), on the device
        return StepResult(norm, skipped, torch.zeros_like(skipped))

    def _step(self, skip: torch.Tensor) -> None:
        self.optimizer.found_inf = skip.float()  # read by the fused Adam: no update where 1
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf


class DeepSpeedPartitions:
    """DeepSpeed's own checkpoint of its ZeRO partitions: every rank writes its part."""

    def __init__(self, engine: Any):
        self.engine = engine

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name)

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise OgnetError(f"{folder}: DeepSpeed checkpoint not found")


class DeepSpeedEngine:
    """DeepSpeed ZeRO 1/2 around the same torch Adam (no JIT-compiled optimizer).

    bf16 is DeepSpeed's `torch_autocast`: the module and its ZeRO partitions stay float32 and the
    forward runs under autocast, as with DDP, so BatchNorm, weight averaging and checkpoints are
    float32 (DeepSpeed's own `bf16` mode casts the parameters but not BatchNorm's buffers, which
    the forward then refuses). Its step happens inside the ZeRO partitions and cannot be skipped on
    the device, so a non-finite loss is agreed on by a host-read vote before the backward (one
    synchronisation per step; ZeRO's step makes its own). Non-finite gradients are not detected."""

    def __init__(self, model: nn.Module, config: Config, info: dist.DistInfo, local_batch: int):
        import deepspeed  # here, not at the top: an optional dependency that takes seconds to import

        self.precision, self.device = config.train.precision, info.device
        if self.precision == "fp16":
            raise ConfigError(
                "train.precision=fp16 with train.backend=deepspeed: DeepSpeed has no loss scaler for autocast "
                "under ZeRO, and its fp16 mode casts BatchNorm's parameters but not its statistics; use bf16"
            )
        ds_config = json.loads(Path(config.train.deepspeed_config).read_text())
        ds_config.pop("train_batch_size", None)
        ds_config.update(
            train_micro_batch_size_per_gpu=local_batch,
            gradient_accumulation_steps=1,
            bf16={"enabled": False},
            fp16={"enabled": False},
            torch_autocast={"enabled": self.precision == "bf16", "dtype": "bfloat16"},
        )
        _skip_shared_memory_op(deepspeed)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=make_optimizer(model, config), config=ds_config
        )
        self.stateful: dict[str, Stateful] = {}
        self.partitioned: dict[str, Partitioned] = {"deepspeed": DeepSpeedPartitions(self.model)}

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed's forward enters torch_autocast itself

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def backward_and_step(self, loss: torch.Tensor, factor: float, hold: torch.Tensor) -> StepResult:
        bad = (~torch.isfinite(loss) | hold).float().reshape(1)
        if dist.all_reduce_max(bad).item():
            skipped = torch.ones((), dtype=torch.bool, device=loss.device)
            return StepResult(torch.full((), torch.nan, device=loss.device), skipped, skipped)
        self.model.backward(loss * factor)
        self.model.step()
        norm = self.model.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, device=loss.device, dtype=torch.float32)
        done = torch.zeros((), dtype=torch.bool, device=loss.device)
        return StepResult(norm, done, done)


def _skip_shared_memory_op(deepspeed: Any) -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce, which only its inference
    all-reduce uses. On the CPU accelerator its communication backend otherwise JIT-compiles that
    C++ op at start-up (55-250 s in a fresh environment, every rank waiting), under a lock file in
    ~/.cache/torch_extensions that a process killed mid-build leaves behind, after which every later
    start waits on it forever. Other accelerators have no such op: the entry is unused there."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(model: nn.Module, config: Config, info: dist.DistInfo, local_batch: int) -> Engine:
    if config.train.backend == "deepspeed":
        return DeepSpeedEngine(model, config, info, local_batch)
    return DDPEngine(model, config, info)
