"""Process-group set-up for torchrun, SLURM (srun, one task per GPU) and a plain process, plus the
few collectives the rest of ognet needs.

Every helper is a no-op when there is no process group, so single-process code calls the same
functions as distributed code; `SyncBatchNorm` (train.sync_bn) is plain BatchNorm there. nccl on
CUDA, gloo otherwise; CUDA is never required.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, TypeVar

import torch
import torch.distributed as dist

from ognet.errors import ConfigError, OgnetError

F = TypeVar("F", bound=Callable)
SyncBN = Literal["auto"] | bool  # train.sync_bn
_timeout_s: float | None = None  # of the process group this process joined


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. `backend` is None when there is no process group."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None
    is_main: bool


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def _slurm_master_addr() -> str:
    """First host of the job's node list, expanded by SLURM itself (node[01-04] -> node01)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("SLURM run without MASTER_ADDR or SLURM_JOB_NODELIST: set MASTER_ADDR")
    if shutil.which("scontrol") is None:
        raise ConfigError(f"SLURM run without MASTER_ADDR and no `scontrol` to expand {nodelist!r}: set MASTER_ADDR")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    hosts = out.stdout.split()
    if not hosts:
        raise ConfigError(f"`scontrol show hostnames {nodelist}` printed no host: set MASTER_ADDR")
    return hosts[0]


def _slurm_master_port() -> str:
    """A port every task of the job derives alike; two jobs on one node rarely collide."""
    if "SLURM_JOB_ID" not in os.environ:
        raise ConfigError("SLURM run without MASTER_PORT or SLURM_JOB_ID: set MASTER_PORT")
    return str(15000 + _env_int("SLURM_JOB_ID") % 20000)


def _launcher_ranks() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) from torchrun or srun, or None for a plain process.

    torchrun wins over SLURM so that `srun torchrun ...` works. For srun, MASTER_ADDR/MASTER_PORT
    are filled in here when the batch script did not export them. A plain `python` in an sbatch
    script with --ntasks > 1 looks like task 0 of N and waits for the others: start it with srun.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
        return _env_int("RANK"), local_rank, _env_int("WORLD_SIZE")
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        if not os.environ.get("MASTER_ADDR"):
            os.environ["MASTER_ADDR"] = _slurm_master_addr()
        if not os.environ.get("MASTER_PORT"):
            os.environ["MASTER_PORT"] = _slurm_master_port()
        local_rank = _env_int("SLURM_LOCALID") if "SLURM_LOCALID" in os.environ else 0
        return _env_int("SLURM_PROCID"), local_rank, _env_int("SLURM_NTASKS")
    return None


def init_distributed(backend: str | None = None, timeout_s: float = 600) -> DistInfo:
    """Join the process group described by the launcher's environment (or none at all).

    `backend` None picks nccl when CUDA is available and gloo otherwise. `timeout_s` bounds every
    collective, so a rank that stops participating makes the others fail instead of hang.
    """
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("backend 'nccl' needs CUDA, which is not available here: use 'gloo'")
    ranks = _launcher_ranks()
    rank, local_rank, world_size = ranks if ranks is not None else (0, 0, 1)
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world size {world_size}")
    if cuda:
        visible = torch.cuda.device_count()
        gpu = local_rank if visible > 1 else 0  # srun --gpus-per-task=1 shows each task its GPU as cuda:0
        if gpu >= visible:
            raise ConfigError(f"local rank {local_rank} but only {visible} GPUs visible: start one process per GPU")
        torch.cuda.set_device(gpu)
        device = torch.device("cuda", gpu)
    else:
        device = torch.device("cpu")
    if ranks is None:
        return DistInfo(0, 0, 1, device, None, True)
    if not dist.is_initialized():
        _warn_about_shared_store_restarts(rank)
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    global _timeout_s
    _timeout_s = timeout_s
    return DistInfo(rank, local_rank, world_size, device, backend, rank == 0)


def _warn_about_shared_store_restarts(rank: int) -> None:
    """torchrun restarts (--max-restarts) keep the agent's TCPStore, and the new workers' process
    group reads the keys the dead ones left there: gloo then connects to addresses of processes
    that no longer exist ("Connection refused"). A store per restart avoids it."""
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if (
        rank == 0
        and restarts.isdigit()
        and int(restarts) > 0
        and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    ):
        warnings.warn(
            "torchrun --max-restarts with the agent's shared TCPStore: a restarted group may fail to "
            "connect; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun",
            stacklevel=3,
        )


class CollectiveError(OgnetError):
    """A collective failed or timed out: another rank crashed, hangs or was stopped."""


_PEER_FAILURES = ("timed out", "timeout", "connection", "pair closure", "closed by peer", "nccl", "gloo")


@contextlib.contextmanager
def collective(name: str) -> Iterator[None]:
    """Name the collective `name` in the error when it fails because a peer stopped answering:
    gloo's own message only says which socket operation timed out."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as e:  # gloo raises RuntimeError, nccl DistBackendError (a RuntimeError)
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not _active() or not (isinstance(e, dist.DistError) or any(s in message.lower() for s in _PEER_FAILURES)):
            raise
        timeout = f"timeout {_timeout_s:g} s, train.collective_timeout_s" if _timeout_s else "the group's timeout"
        raise CollectiveError(
            f"rank {dist.get_rank()} of {dist.get_world_size()}: {name} failed ({timeout}): "
            f"another rank crashed, hangs or was stopped ({message})"
        ) from e


def _named(fn: F) -> F:
    """A helper whose failures name it (see `collective`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with collective(fn.__name__):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def cleanup() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@_named
def barrier() -> None:
    if _active():
        dist.barrier()


@_named
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks (a new tensor, no gradient): counts and values that are reported."""
    x = x.detach().clone()
    if _active():
        dist.all_reduce(x)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over ranks (a new tensor, no gradient): for values that are reported, not trained."""
    return all_reduce_sum(x) / (dist.get_world_size() if _active() else 1)


@_named
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's buffers (BatchNorm statistics) equal to rank `src`'s."""
    if _active():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=src)


@_named
def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks (a new tensor): flags that any rank raised."""
    x = x.detach().clone()
    if _active():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


@_named
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0 in rank order (no gradient); shapes must be equal."""
    if not _active():
        return x
    x = x.contiguous()
    shapes = [torch.empty(x.dim(), dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, torch.tensor(x.shape, dtype=torch.long, device=x.device))
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        raise ValueError(
            f"all_gather needs the same shape on every rank, got {[tuple(s.tolist()) for s in shapes]}; "
            "use all_gather_uneven for different lengths"
        )
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: gather. Backward: sum the gradients every rank computed for the gathered tensor,
    then keep this rank's slice, so each input gets the gradient of the sum of all ranks' losses."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return all_gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather that gradients flow back through (equal shapes on every rank).

    If every rank computes the same loss L of the gathered tensor, rank r's slice receives
    world_size * dL/dx_r, which DDP's gradient averaging turns back into dL/dx_r.
    """
    if not _active():
        return x
    return _AllGatherWithGrad.apply(x)


@_named
def all_gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0 in rank order when the lengths differ (no gradient).

    Lengths are gathered first; slices are padded to the longest, gathered, and cut back.
    """
    if not _active():
        return x
    world = dist.get_world_size()
    lengths = [torch.empty(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    lengths = [int(n) for n in lengths]
    if max(lengths) == 0:
        return x
    padded = x.new_zeros((max(lengths), *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:n] for o, n in zip(out, lengths)])


def _local_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's mean and biased variance per channel (float64), by torch's fused BatchNorm kernel
    (one pass over x and one written output; reductions over (N, *) by hand are several times slower
    on CPU). bf16/fp16 input is read in float32."""
    xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
    _, mean, invstd = torch.native_batch_norm(xs, None, None, None, None, True, 0.0, 0.0)  # eps 0: invstd^-2 = var
    return mean.double(), invstd.double().pow(-2)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Forward: the global statistics from one all-reduce of (sum, sum of squares, count) per channel,
    then torch's BatchNorm kernel in eval form with them. Backward: torch's kernel gives the local
    sums of dy and dy * (x - mean) with the weight's and bias's gradients; one all-reduce makes them
    global, and the input's gradient gets the two terms that the global statistics add."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):  # type: ignore[override]
        mean, var = _local_stats(x)
        n, channels = x.numel() // x.shape[1], x.shape[1]
        total = torch.cat([n * mean, n * (var + mean * mean), mean.new_full((1,), n)])
        dist.all_reduce(total)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels:-1] / count - mean * mean).clamp(min=0)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean_, var_ = mean.to(dtype), var.to(dtype)
        y = torch.nn.functional.batch_norm(x, mean_, var_, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean_, var_, count)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, dy, _mean, _var, _count):  # type: ignore[override]
        x, weight, mean, var, count = ctx.saved_tensors
        dy = dy.contiguous()
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, mean, var, None, None, False, ctx.eps, [True, True, True]
        )  # eval form: grad_x = dy * weight * invstd; grad_w = sum(dy * xhat), grad_b = sum(dy) over this rank
        invstd = torch.rsqrt(var + ctx.eps)
        sums = torch.cat([grad_b.to(mean.dtype), grad_w.to(mean.dtype)])
        dist.all_reduce(sums)
        sum_dy, sum_dy_xhat = sums.chunk(2)
        scale = invstd if weight is None else invstd * weight.to(mean.dtype)
        slope = -scale * invstd * sum_dy_xhat / count  # grad_x -= scale * (sum_dy + xhat * sum_dy_xhat) / count
        offset = -scale * sum_dy / count - slope * mean
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        # Two in-place passes over grad_x (CPU has no public kernel for "backward with given sums").
        grad_x.add_(offset.view(shape).to(grad_x.dtype)).addcmul_(x, slope.view(shape).to(x.dtype))
        needs = ctx.needs_input_grad
        return grad_x, grad_w if needs[1] else None, grad_b if needs[2] else None, None


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on gloo and nccl alike.

    torch's SyncBatchNorm needs CUDA kernels; this one uses torch's BatchNorm kernels of every device.
    In training mode with a process group of more than one rank, each rank's count, sum and sum of
    squares per channel (from its float32 (float64) mean and variance, combined in float64 so that a
    mean far from zero does not cancel the variance away) are summed over the ranks: one all-reduce
    of 2C+1 values per layer per forward and one of 2C per backward, no host read; the arithmetic
    adds about one pass over the input forward and two backward (benchmarks/results/syncbn.md: one
    layer 1.7x, a step 1.09x on 2 CPU ranks). N ranks x B/N then give the statistics,
    loss and gradients of 1 x B, and every rank updates its running statistics alike. Otherwise
    (eval mode, one process) it is torch's BatchNorm. Every rank must run the same layers in the same
    order, as for any collective.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects (N, C, ...) input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training or self.running_mean is None) or not _active():
            return super().forward(x)
        with collective("BatchNorm statistics all-reduce"):
            y, mean, var, count = _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps)
        if self.training and self.track_running_stats:
            update_running_stats(self, mean, var, count)
        return y


@torch.no_grad()
def update_running_stats(
    norm: torch.nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor | int
) -> None:
    """As torch's BatchNorm in training: momentum, or a cumulative average when it is None; unbiased
    variance from the biased `var` of `count` values. The factor stays on the device (torch's
    BatchNorm reads num_batches_tracked on the host)."""
    assert norm.running_mean is not None and norm.running_var is not None and norm.num_batches_tracked is not None
    norm.num_batches_tracked.add_(1)
    unbiased = var * (count / (count - 1))  # an int count: one op
    buffers = [norm.running_mean, norm.running_var]
    values = [value.to(running.dtype) for running, value in zip(buffers, (mean, unbiased))]
    if norm.momentum is None:
        for running, value in zip(buffers, values):
            running.lerp_(value, 1.0 / norm.num_batches_tracked.to(running.dtype))
    else:
        torch._foreach_lerp_(buffers, values, norm.momentum)  # both buffers in one op


def synchronises(norm: torch.nn.Module) -> bool:
    """Whether `norm` normalises by the statistics of every rank's batch (a SyncBatchNorm in a group)."""
    return isinstance(norm, SyncBatchNorm) and _active()


def global_batch_stats(mean: torch.Tensor, var: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    """The mean and biased variance per channel of every rank's batch and its size, from this rank's
    `mean` and `var` over `count` values: one all-reduce of 2C+1 values, no host read, combined in
    float64 as SyncBatchNorm does. For code that computes its statistics without a BatchNorm module
    (EdgeConv's fused path); no gradient flows through it: the caller's backward sums its terms over
    the ranks (as `_SyncBatchNormFunction.backward`)."""
    m, v = mean.double(), var.double()
    total = torch.cat([count * m, count * (v + m * m), m.new_full((1,), float(count))])  # this rank's, then all
    with collective("BatchNorm statistics all-reduce"):
        dist.all_reduce(total)
    n, channels = total[-1], mean.shape[0]
    global_mean = total[:channels] / n
    global_var = (total[channels:-1] / n - global_mean * global_mean).clamp(min=0)
    return global_mean.to(mean.dtype), global_var.to(var.dtype), n


def sync_bn_enabled(setting: SyncBN, world_size: int) -> bool:
    """train.sync_bn: "auto" synchronises BatchNorm when there is more than one rank."""
    return world_size > 1 if setting == "auto" else bool(setting)


def convert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm of `module` made a `SyncBatchNorm` holding the same parameters and buffers
    (state_dict keys unchanged); returns the module (a new one only when `module` is a BatchNorm)."""
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        converted = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        converted.weight, converted.bias = module.weight, module.bias  # the same Parameters
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(converted, name, getattr(module, name))
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module
