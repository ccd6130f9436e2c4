"""The training loop: one loop for DDP and DeepSpeed, read top to bottom.

    torchrun --nproc_per_node=N launch/train.py --config configs/market/ognet-circle.yaml [key=value ...]

Per step: this rank's part of the global batch (stratified sampler) -> OG-Net -> cross-entropy +
circle loss over the all-gathered global batch -> loss warm-up factor -> backward -> step.
Per epoch: cosine learning rate, optional weight averaging, checkpoint, optional evaluation.
Everything that decides a step (data order, augmentation, dropout) is a function of
(seed, epoch, step, rank), so a run resumed from any checkpoint replays exactly.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ognet import dist
from ognet.checkpoint import latest_checkpoint, load_checkpoint, load_model_state, prune_checkpoints, save_checkpoint
from ognet.config import Config, save_config
from ognet.data.dataset import TrainSet, train_loader
from ognet.data.sampler import StratifiedSampler
from ognet.data.shards import ShardReader, join_location
from ognet.data.transforms import TransformConfig
from ognet.errors import ConfigError, OgnetError
from ognet.losses import LossWarmup, ReidLoss
from ognet.model import build_model
from ognet.monitor import Monitor, enable_stack_dumps

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@dataclass
class Progress:
    """Where training stands: the next step to run is `step` of `epoch`."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    skipped_steps: int = 0
    bad_samples: int = 0  # unreadable samples replaced so far, all ranks (data.bad_samples=skip)


class NonFiniteLossError(OgnetError):
    """A non-finite loss or gradient under train.nonfinite=stop."""


class Preempted(Exception):
    """Raised after the checkpoint that a preemption signal asked for has been written."""


# ------------------------------------------------------------------------------------------------
# Schedule


def learning_rate(config: Config, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Cosine annealing stepped once per epoch down to min_lr_ratio * lr (the original), with an
    optional linear warm-up over the first `lr_warmup_epochs` (per step)."""
    o, epochs = config.optim, config.train.epochs
    lr = o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * (1 + math.cos(math.pi * epoch / epochs)) / 2)
    if epoch < o.lr_warmup_epochs:
        lr *= (epoch * steps_per_epoch + step + 1) / (o.lr_warmup_epochs * steps_per_epoch)
    return lr


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------------
# Engines: DDP and DeepSpeed behind one small interface


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """The original's optimizer: Adam (amsgrad), coupled L2 weight decay, one group for everything."""
    o = config.optim
    return torch.optim.Adam(
        model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, amsgrad=o.amsgrad
    )


def grad_norm(optimizer: torch.optim.Optimizer) -> float:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class DDPEngine:
    """DistributedDataParallel (or the bare model in a single process), autocast, fp16 grad scaling."""

    def __init__(self, model: nn.Module, config: Config, info: dist.DistInfo):
        self.precision, self.device = config.train.precision, info.device
        if self.precision == "fp16" and info.device.type != "cuda":
            raise OgnetError("train.precision=fp16 needs CUDA; use bf16 on CPU")
        self.optimizer = make_optimizer(model, config)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        ids = [info.device.index] if info.device.type == "cuda" else None
        self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids) if info.backend else model

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward_and_step(self, loss: torch.Tensor) -> tuple[float, bool]:
        """Backward, then one optimizer step unless the gradients are not finite (the same decision
        on every rank: DDP has averaged them). Returns the norm of the unscaled gradients and
        whether the step was taken; fp16's grad scaler skips overflowing steps itself, as it must
        to search for its scale, so those count as taken."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            norm = grad_norm(self.optimizer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return norm, True
        loss.backward()
        norm = grad_norm(self.optimizer)
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return norm, False
        self.optimizer.step()
        return norm, True

    def save(self, folder: Path, tag: str) -> dict[str, Any]:
        """Optimizer state, to be stored in the main rank's checkpoint."""
        return {
            "optimizer": self.optimizer.state_dict(),
            **({"scaler": self.scaler.state_dict()} if self.scaler else {}),
        }

    def load(self, payload: dict[str, Any], folder: Path, tag: str) -> None:
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scaler is not None and "scaler" in payload:
            self.scaler.load_state_dict(payload["scaler"])


class DeepSpeedEngine(DDPEngine):
    """DeepSpeed ZeRO 1/2 around the same torch Adam (no JIT-compiled optimizer). Its optimizer
    state is partitioned over ranks, so every rank writes its part into `<folder>/deepspeed/<tag>`."""

    def __init__(self, model: nn.Module, config: Config, info: dist.DistInfo, local_batch: int):
        import json

        import deepspeed

        self.precision, self.device, self.scaler = config.train.precision, info.device, None
        ds_config = json.loads(Path(config.train.deepspeed_config).read_text())
        ds_config.pop("train_batch_size", None)
        ds_config.update(
            train_micro_batch_size_per_gpu=local_batch,
            gradient_accumulation_steps=1,
            bf16={"enabled": self.precision == "bf16"},
            fp16={"enabled": self.precision == "fp16"},
        )
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=make_optimizer(model, config), config=ds_config
        )

    def autocast(self):
        return torch.autocast(self.device.type, enabled=False)  # DeepSpeed casts the module itself

    def backward_and_step(self, loss: torch.Tensor) -> tuple[float, bool]:
        """Always steps: the gradients live in DeepSpeed's partitions until `step()` (the loss is
        checked before; non-finite weights after a bad step show in the next loss)."""
        self.model.backward(loss)
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return (float(norm) if norm is not None else float("nan")), True

    def save(self, folder: Path, tag: str) -> dict[str, Any]:
        self.model.save_checkpoint(str(folder / "deepspeed"), tag=tag)
        return {}

    def load(self, payload: dict[str, Any], folder: Path, tag: str) -> None:
        path, _ = self.model.load_checkpoint(
            str(folder / "deepspeed"), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise OgnetError(f"{folder / 'deepspeed' / tag}: DeepSpeed checkpoint not found")


# ------------------------------------------------------------------------------------------------
# Weight averaging (the original's --wa): equal-weight mean of the per-epoch weights


class WeightAverage:
    def __init__(self, model: nn.Module):
        self.params = {k: v.detach().clone() for k, v in model.named_parameters()}
        self.count = 0

    def update(self, model: nn.Module) -> None:
        self.count += 1
        with torch.no_grad():
            for name, p in model.named_parameters():
                self.params[name] += (p.detach() - self.params[name]) / self.count

    def state(self) -> dict[str, Any]:
        return {"params": self.params, "count": self.count}

    def load(self, state: dict[str, Any]) -> None:
        self.params, self.count = state["params"], state["count"]

    def averaged_model(self, model: nn.Module) -> nn.Module:
        import copy

        averaged = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in averaged.named_parameters():
                p.copy_(self.params[name])
        return averaged


@torch.no_grad()
def update_bn(model: nn.Module, batches, device: torch.device) -> None:
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


# ------------------------------------------------------------------------------------------------
# The loop


class PreemptionFlag:
    """Set by SIGUSR1/SIGTERM (SLURM's warning signal, a preemption); acted on at a step boundary."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = {s: signal.signal(s, self._handle) for s in PREEMPT_SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train(config: Config) -> dict[str, Any]:
    """Train as configured; returns the final metrics (if evaluated) and where things went."""
    info = dist.init_distributed(timeout_s=config.train.collective_timeout_s)
    run_dir = Path(config.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    monitor = Monitor(run_dir / "tb", info.is_main)
    flag = PreemptionFlag()
    try:
        return _train(config, info, run_dir, ckpt_dir, monitor, flag)
    finally:
        flag.restore()
        monitor.close()
        dist.cleanup()


def _train(
    config: Config, info: dist.DistInfo, run_dir: Path, ckpt_dir: Path, monitor: Monitor, flag: PreemptionFlag
) -> dict[str, Any]:
    t = config.train
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")

    reader = ShardReader(join_location(config.data.root, config.data.train_split), config.data.cache_dir)
    index = reader.index
    sampler = StratifiedSampler(
        index.labels,
        index.camids,
        global_batch_size=t.global_batch_size,
        mode=config.sampler.mode,
        seed=t.seed,
        world_size=info.world_size,
        rank=info.rank,
        k=config.sampler.k,
        camera_aware=config.sampler.camera_aware,
    )
    steps_per_epoch = (
        sampler.steps_per_epoch if not t.max_steps_per_epoch else min(sampler.steps_per_epoch, t.max_steps_per_epoch)
    )
    transforms = TransformConfig(
        slim=config.data.slim,
        flip=config.data.flip,
        scale=config.data.scale,
        rotate=config.data.rotate,
        erase=config.data.erase,
    )
    dataset = TrainSet(reader, transforms, t.seed, config.data.bad_samples)

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = build_model(config.model.variant, index.num_classes, **config.model.overrides)
    model_config = {
        "variant": config.model.variant,
        "num_classes": index.num_classes,
        "overrides": dict(config.model.overrides),
    }
    if t.sync_bn and info.world_size > 1:
        if info.device.type != "cuda":
            raise ConfigError("train.sync_bn needs CUDA devices: torch's SyncBatchNorm has no CPU path")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(info.device)
    if t.backend == "deepspeed":
        engine = DeepSpeedEngine(model, config, info, sampler.local_batch_size)
    else:
        engine = DDPEngine(model, config, info)

    loss_fn = ReidLoss(
        circle=config.loss.circle, m=config.loss.m, gamma=config.loss.gamma, circle_form=config.loss.form
    )
    warmup = LossWarmup.original(len(index), t.global_batch_size, config.optim.loss_warmup_epochs)
    wa_start = int(t.wa_start * t.epochs)
    average = WeightAverage(model) if t.wa else None
    progress = Progress()

    def checkpoint() -> None:
        name = f"step-{progress.global_step:08d}.pt"
        engine_state = engine.save(ckpt_dir, name)
        if info.is_main:
            save_checkpoint(
                ckpt_dir / name,
                {
                    "model": model.state_dict(),
                    "model_config": model_config,
                    **engine_state,
                    "progress": vars(progress).copy(),
                    "config": config.to_dict(),
                    **({"averaged": average.state()} if average else {}),
                },
            )
            prune_checkpoints(ckpt_dir, t.keep_checkpoints)
        dist.barrier()

    resume = latest_checkpoint(ckpt_dir)
    if resume is not None:
        payload = load_checkpoint(resume, map_location=info.device)
        load_model_state(model, payload["model"], str(resume))
        engine.load(payload, ckpt_dir, resume.name)
        if average is not None and "averaged" in payload:
            average.load(payload["averaged"])
        progress = Progress(**payload["progress"])
        monitor.log(f"resumed from {resume} at epoch {progress.epoch} step {progress.step}")

    monitor.log(
        f"training {config.model.variant} ({sum(p.numel() for p in model.parameters()):,} parameters) on "
        f"{info.world_size} x {info.device.type} ({t.backend}, {t.precision}): {len(index)} samples, "
        f"{index.num_classes} identities, global batch {t.global_batch_size}, {steps_per_epoch} steps/epoch, "
        f"{t.epochs} epochs -> {run_dir}"
    )
    monitor.hparams(config.to_dict(), ["eval/rank1", "eval/mAP"])
    metrics: dict[str, Any] = {}
    while progress.epoch < t.epochs:
        epoch = progress.epoch
        loader = train_loader(
            dataset, sampler, epoch, progress.step, config.data.num_workers, info.device.type == "cuda"
        )
        engine.model.train()
        tic = last = time.time()
        seen, waited, norm = 0, 0.0, float("nan")
        bar = tqdm(
            loader,
            desc=f"epoch {epoch}",
            total=steps_per_epoch - progress.step,
            unit="step",
            leave=False,
            disable=not info.is_main,
        )
        for xyz, rgb, labels, *replaced in bar:  # replaced: with data.bad_samples=skip
            waited += time.time() - last
            if progress.step >= steps_per_epoch:
                break
            # Agreed on before the forward, which changes BatchNorm's running statistics: a checkpoint
            # written after it would not replay this step exactly.
            if dist.all_reduce_max(torch.tensor([float(flag.raised)], device=info.device)).item():
                # Events on disk before the checkpoint's barrier: once any rank has exited, the launcher
                # may kill the others (srun --kill-on-bad-exit), and the writer flushes only every 2 min.
                monitor.flush()
                checkpoint()
                monitor.log(f"preemption signal: checkpoint written at global step {progress.global_step}; exiting")
                raise Preempted(str(latest_checkpoint(ckpt_dir)))
            if replaced:
                bad = int(dist.all_reduce_sum(replaced[0].sum().to(info.device)).item())
                if bad:
                    progress.bad_samples += bad
                    monitor.log(
                        f"epoch {epoch} step {progress.step}: {bad} unreadable samples replaced by others of "
                        f"their identity ({progress.bad_samples} so far; the workers' warnings name them)"
                    )
            lr = learning_rate(config, epoch, progress.step, steps_per_epoch)
            engine.set_lr(lr)
            torch.manual_seed(step_seed(t.seed, epoch, progress.step, info.rank))
            xyz, rgb, labels = (x.to(info.device, non_blocking=True) for x in (xyz, rgb, labels))
            statistics = [b.detach().clone() for b in model.buffers()]  # BatchNorm's, restored if the step is not taken
            with engine.autocast(), dist.collective("forward (DDP buffer broadcast)"):
                out = engine.model(xyz, rgb)
            feature = out.circle_feature if config.loss.feature == "dropout" else out.feature
            terms = loss_fn(out.logits.float(), labels, feature.float())
            factor = warmup.factor(progress.global_step, epoch)
            nonfinite = (
                "loss"
                if dist.all_reduce_max(torch.tensor([float(not torch.isfinite(terms.loss))], device=info.device)).item()
                else None
            )
            if not nonfinite:
                with dist.collective("backward (gradient all-reduce)"):
                    norm, stepped = engine.backward_and_step(terms.loss * factor)
                nonfinite = None if stepped else "gradient"
            if nonfinite:
                with torch.no_grad():
                    for buffer, saved in zip(model.buffers(), statistics):
                        buffer.copy_(saved)
                where = (
                    f"epoch {epoch} step {progress.step + 1}/{steps_per_epoch} (global step {progress.global_step + 1})"
                )
                if t.nonfinite == "stop":
                    if all(torch.isfinite(p).all() for p in model.parameters()):
                        checkpoint()  # the state before this step: change the config, then resume from it
                    raise NonFiniteLossError(
                        f"non-finite {nonfinite} at {where}, stopped (train.nonfinite=stop); "
                        f"the last good state is {latest_checkpoint(ckpt_dir)}"
                    )
                progress.skipped_steps += 1
                monitor.log(
                    f"non-finite {nonfinite} at {where}: step skipped ({progress.skipped_steps} so far, "
                    f"train.nonfinite=skip)"
                )
            progress.step += 1
            progress.global_step += 1
            seen += len(labels) * info.world_size
            if progress.global_step == 1:
                for i in range(min(2, len(labels))):
                    monitor.point_cloud(f"train/cloud_{i}", xyz[i].cpu().numpy(), rgb[i].cpu().numpy() + 0.5, 1)
            if progress.global_step % t.log_every_steps == 0 or progress.step == steps_per_epoch:
                elapsed = max(time.time() - tic, 1e-9)
                rate = seen / elapsed
                monitor.log(
                    f"epoch {epoch} step {progress.step}/{steps_per_epoch} loss {terms.total.item():.4f} "
                    f"(ce {terms.ce.item():.4f} circle {terms.circle.item():.4f}) x{factor:.3f} lr {lr:.2e} "
                    f"{rate:.1f} samples/s"
                )
                monitor.scalars(
                    {
                        "train/loss": terms.total.item(),
                        "train/ce": terms.ce.item(),
                        "train/circle": terms.circle.item(),
                        "train/loss_warmup": factor,
                        "train/lr": lr,
                        "train/samples_per_s": rate,
                        "train/skipped_steps": progress.skipped_steps,
                        "train/bad_samples": progress.bad_samples,
                        "train/grad_norm": norm,
                        "train/data_wait_fraction": waited / elapsed,
                        "train/step_time_s": elapsed / max(seen / len(labels) / info.world_size, 1),
                        "train/peak_memory_mb": peak_memory_mb(info.device),
                    },
                    progress.global_step,
                )
            if (
                t.checkpoint_every_steps
                and progress.global_step % t.checkpoint_every_steps == 0
                and progress.step < steps_per_epoch
            ):
                checkpoint()
            last = time.time()
        if average is not None and epoch >= wa_start:
            average.update(model)
        progress.epoch, progress.step = epoch + 1, 0
        checkpoint()
        last = progress.epoch == t.epochs
        if last or (t.eval_every_epochs and progress.epoch % t.eval_every_epochs == 0):
            metrics = _evaluate(model, config, info, monitor, progress.global_step)

    outputs = {"model_last": run_dir / "model_last.pt"}
    if info.is_main:
        save_checkpoint(outputs["model_last"], {"model": model.state_dict(), "model_config": model_config})
    if average is not None and average.count:
        averaged = average.averaged_model(model)
        batches = train_loader(dataset, sampler, t.epochs, 0, config.data.num_workers)
        update_bn(averaged, (b for _, b in zip(range(steps_per_epoch), batches)), info.device)
        outputs["model_average"] = run_dir / "model_average.pt"
        if info.is_main:
            save_checkpoint(outputs["model_average"], {"model": averaged.state_dict(), "model_config": model_config})
        metrics["average"] = _evaluate(averaged, config, info, monitor, progress.global_step, tag="average")
    dist.barrier()
    monitor.log(f"done: {', '.join(f'{k} {v}' for k, v in outputs.items())}")
    return {"metrics": metrics, **{k: str(v) for k, v in outputs.items()}}


def _evaluate(
    model: nn.Module, config: Config, info: dist.DistInfo, monitor: Monitor, step: int, tag: str = "eval"
) -> dict:
    """Evaluate with rank 0's BatchNorm statistics on every rank: DDP broadcasts them only at the
    next forward, so after a step each rank still holds the ones its own batch moved."""
    dist.broadcast_buffers(model)
    from ognet.evaluate import evaluate_model

    return evaluate_model(model, config, info, monitor, step, tag=tag)


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a checkpoint was written on a preemption signal; run again to resume


def main(argv: list[str] | None = None) -> None:
    """`ognet-train --config FILE [key=value ...]`, under torchrun, srun or as a plain process."""
    import argparse
    import sys

    from torch.distributed.elastic.multiprocessing.errors import record

    from ognet.config import load_config

    parser = argparse.ArgumentParser(prog="ognet-train", description="Train OG-Net (DDP or DeepSpeed).")
    parser.add_argument("--config", help="YAML config (configs/...); defaults apply where it is silent")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=10 data.root=/data/market")
    args = parser.parse_args(argv)
    enable_stack_dumps()
    try:
        config = load_config(args.config, args.overrides)
        record(train)(config)
    except Preempted:
        sys.exit(PREEMPTED_EXIT_CODE)
    except OgnetError as e:
        sys.exit(f"ognet-train: error: {e}")
