"""The Trainer: built from the config out of small components, then `train()`.

Per step: this rank's part of the global batch (stratified sampler) -> OG-Net -> cross-entropy +
circle loss over the all-gathered global batch -> loss warm-up factor -> backward -> step, then
the ranks' agreement (preemption, unreadable samples, non-finite values) in one small all-reduce.
Per epoch: cosine learning rate, optional weight averaging, checkpoint, optional evaluation.
Everything that decides a step (data order, augmentation, dropout) is a function of
(seed, epoch, step, rank), so a run resumed from any checkpoint replays exactly.

On a GPU a step that neither logs nor checkpoints makes no host synchronisation: non-finite steps
are skipped on the device (engine, rollback), and the agreement is read once the device got there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ognet import dist
from ognet.checkpoint import latest_checkpoint
from ognet.config import Config, save_config
from ognet.data.loading import train_data
from ognet.errors import OgnetError, Preempted
from ognet.evaluate import evaluate_model, metric_tags
from ognet.losses import LossTerms, LossWarmup, ReidLoss
from ognet.model import build_model, model_spec, select_point_ops, set_point_ops
from ognet.monitor import Monitor
from ognet.pictures import pid_text
from ognet.train.agreement import Agreement, Verdict
from ognet.train.averaging import WeightAverage, update_bn
from ognet.train.checkpointer import Checkpointer, init_weights
from ognet.train.engine import StepResult, build_engine
from ognet.train.meters import TrainMetrics
from ognet.train.progress import Progress
from ognet.train.rollback import BufferRollback
from ognet.train.schedule import averages_epoch, learning_rate, step_seed


class NonFiniteError(OgnetError):
    """A non-finite loss or gradient under train.nonfinite=stop."""


class Trainer:
    def __init__(self, config: Config, info: dist.DistInfo, monitor: Monitor):
        self.config, self.info, self.monitor, t = config, info, monitor, config.train
        self.run_dir = Path(config.run_dir)
        self.data = train_data(config, info)  # reads the index; impossible sampling fails here, on every rank
        set_point_ops(select_point_ops(config.model.point_ops, info.device))
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        options = config.model.options()
        self.model = build_model(config.model.variant, self.data.num_classes, **options).to(info.device)
        self.spec = model_spec(config.model.variant, self.data.num_classes, options)
        resuming = latest_checkpoint(self.run_dir / "checkpoints") is not None
        self.initialised = init_weights(self.model, t.init_from) if t.init_from and not resuming else None
        self.sync_bn = dist.sync_bn_enabled(t.sync_bn, info.world_size)
        if self.sync_bn:  # before the engine, which wraps the model (state_dict keys unchanged)
            self.model = dist.convert_sync_batchnorm(self.model)
        self.engine = build_engine(self.model, config, info, self.data.local_batch_size)
        self.rollback = BufferRollback(self.model)  # after the engine, which may cast the buffers anew
        self.loss_fn = ReidLoss(
            circle=config.loss.circle, m=config.loss.m, gamma=config.loss.gamma, circle_form=config.loss.form
        )
        self.warmup = LossWarmup.original(self.data.num_samples, t.global_batch_size, config.optim.loss_warmup_epochs)
        self.progress = Progress()
        self.average = WeightAverage(self.model) if t.wa else None
        self.agreement = Agreement(info.device)
        self.metrics = TrainMetrics(monitor, info.world_size, info.device)
        self.results: dict[str, Any] = {}  # the last evaluation's metrics
        # Under train.nonfinite=stop, every step after a non-finite one is held (not taken) on the
        # device until the host learns of it: the state stays the one before the bad step.
        self.halted = torch.zeros((), dtype=torch.bool, device=info.device)
        stateful = {"model": self.model, **self.engine.stateful, "progress": self.progress}
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints",
            t.keep_checkpoints,
            info,
            stateful | ({"averaged": self.average} if self.average else {}),
            self.engine.partitioned,
            {"model_config": self.spec, "config": config.to_dict()},
        )

    def train(self) -> dict[str, Any]:
        """Resume if a checkpoint exists, run the remaining epochs, write the final models."""
        self.start()
        while self.progress.epoch < self.config.train.epochs:
            self.train_epoch()
            self.end_epoch()
        return self.finish()

    def start(self) -> None:
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / "config.yaml")
        if self.initialised:
            self.monitor.log(self.initialised)
        resumed = self.checkpointer.resume()
        if resumed is not None:
            self.monitor.log(f"resumed from {resumed} at epoch {self.progress.epoch} step {self.progress.step}")
        t, d = self.config.train, self.data
        parameters = sum(p.numel() for p in self.model.parameters())
        self.monitor.log(
            f"training {self.config.model.variant} ({parameters:,} parameters) on {self.info.world_size} x "
            f"{self.info.device.type} ({t.backend}, {t.precision}): {d.num_samples} samples, {d.num_classes} "
            f"identities, global batch {t.global_batch_size}, {d.steps_per_epoch} steps/epoch, {t.epochs} epochs "
            f"-> {self.run_dir}"
        )
        self.monitor.hparams(
            self.config.to_dict(), metric_tags("eval") + (metric_tags("average") if self.average else [])
        )

    def train_epoch(self) -> None:
        p, steps = self.progress, self.data.steps_per_epoch
        self.engine.model.train()
        batches = self.metrics.timed(self.data.loader(p.epoch, p.step))
        bar = tqdm(
            batches,
            desc=f"epoch {p.epoch}",
            total=steps - p.step,
            unit="step",
            leave=False,
            disable=not self.info.is_main,
        )
        for xyz, rgb, labels, *replaced in bar:  # replaced: with data.bad_samples=skip
            self.step(xyz, rgb, labels, replaced)

    def step(self, xyz: torch.Tensor, rgb: torch.Tensor, labels: torch.Tensor, replaced: list[torch.Tensor]) -> None:
        """One step of a host batch: the previous steps' verdicts the device has reached, the step,
        its vote, its bookkeeping (a log or checkpoint step reads the device there)."""
        p = self.progress
        self.act_on(self.agreement.verdicts())
        if p.global_step == 0:
            self.monitor_clouds(xyz, rgb, labels)
        before = p.copy()
        self.begin_step()
        terms, result = self.train_step(*(x.to(self.info.device, non_blocking=True) for x in (xyz, rgb, labels)))
        self.vote(before, replaced, terms, result)
        self.end_step(terms, result, len(labels))

    def begin_step(self) -> None:
        """The step's learning rate and dropout seed: functions of (epoch, step), so a resume replays them."""
        p, t = self.progress, self.config.train
        self.engine.set_lr(learning_rate(self.config.optim, t.epochs, p.epoch, p.step, self.data.steps_per_epoch))
        torch.manual_seed(step_seed(t.seed, p.epoch, p.step, self.info.rank))

    def train_step(self, xyz: torch.Tensor, rgb: torch.Tensor, labels: torch.Tensor) -> tuple[LossTerms, StepResult]:
        """Forward, loss, backward and step, and the rollback of BatchNorm's statistics when the step
        is not taken. No host synchronisation (DDP engine)."""
        self.rollback.save()  # one copy per dtype of the buffers
        with self.engine.autocast(), dist.collective("forward (DDP buffer broadcast or BatchNorm all-reduces)"):
            out = self.engine.model(xyz, rgb)
        feature = out.circle_feature if self.config.loss.feature == "dropout" else out.feature
        terms = self.loss_fn(out.logits.float(), labels, feature.float())
        factor = self.warmup.factor(self.progress.global_step, self.progress.epoch)
        with dist.collective("backward (gradient all-reduce)"):
            result = self.engine.backward_and_step(terms.loss, factor, hold=self.halted)
        self.rollback.restore_where(result.skipped)
        return terms, result

    def vote(self, before: Progress, replaced: list[torch.Tensor], terms: LossTerms, result: StepResult) -> None:
        """The ranks' agreement on this step (one all-reduce), read later by `act_on`."""
        bad = replaced[0].to(self.info.device, non_blocking=True) if replaced else None
        nonfinite = self.agreement.vote(before, bad, terms.loss, result.nonfinite)
        if self.config.train.nonfinite == "stop":
            self.halted |= nonfinite

    def end_step(self, terms: LossTerms, result: StepResult, local_batch: int) -> None:
        p, t, steps = self.progress, self.config.train, self.data.steps_per_epoch
        p.step += 1
        p.global_step += 1
        self.metrics.update(terms, result, local_batch)
        logging = p.global_step % t.log_every_steps == 0 or p.step == steps
        saving = t.checkpoint_every_steps and p.global_step % t.checkpoint_every_steps == 0 and p.step < steps
        if logging or saving:
            self.act_on(self.agreement.verdicts(wait=True))  # a host synchronisation, on these steps only
        if logging:
            lr = learning_rate(self.config.optim, t.epochs, p.epoch, p.step - 1, steps)
            self.metrics.write(p, steps, lr, self.warmup.factor(p.global_step - 1, p.epoch))
        if saving:
            self.checkpointer.save(p.global_step)

    def act_on(self, verdicts: Any) -> None:
        """Count replaced samples and skipped steps, stop on a non-finite step (train.nonfinite=stop),
        checkpoint and leave on a preemption signal."""
        for verdict in verdicts:
            if verdict.bad_samples:
                self.count_bad_samples(verdict)
            if verdict.nonfinite:
                self.on_nonfinite(verdict)
            if verdict.preempt:
                self.act_on(self.agreement.verdicts(wait=True))  # the steps run since: all of them first
                self.preempt()

    def count_bad_samples(self, v: Verdict) -> None:
        self.progress.bad_samples += v.bad_samples
        self.monitor.log(
            f"epoch {v.before.epoch} step {v.before.step}: {v.bad_samples} unreadable samples replaced by others of "
            f"their identity ({self.progress.bad_samples} so far; the workers' warnings name them)"
        )

    def on_nonfinite(self, v: Verdict) -> None:
        b, steps = v.before, self.data.steps_per_epoch
        where = f"epoch {b.epoch} step {b.step + 1}/{steps} (global step {b.global_step + 1})"
        if self.config.train.nonfinite == "skip":
            self.progress.skipped_steps += 1
            n = self.progress.skipped_steps
            self.monitor.log(f"non-finite {v.nonfinite} at {where}: step skipped ({n} so far, train.nonfinite=skip)")
            return
        # Every step since this one was held on the device: the model is the one before it.
        self.progress.load_state_dict(b.state_dict())
        if all(torch.isfinite(p).all() for p in self.model.parameters()):
            self.checkpointer.save(b.global_step)  # the state before this step: change the config, resume from it
        raise NonFiniteError(
            f"non-finite {v.nonfinite} at {where}, stopped (train.nonfinite=stop); the last good state is "
            f"{self.checkpointer.latest}"
        )

    def preempt(self) -> None:
        # Events on disk before the checkpoint's barrier: once any rank has exited, the launcher may
        # kill the others (srun --kill-on-bad-exit), and the writer flushes only every 2 min.
        self.monitor.flush()
        path = self.checkpointer.save(self.progress.global_step)
        self.monitor.log(f"preemption signal: checkpoint written at global step {self.progress.global_step}; exiting")
        raise Preempted(str(path))

    def monitor_clouds(self, xyz: torch.Tensor, rgb: torch.Tensor, labels: torch.Tensor) -> None:
        """The first step's first two training clouds (host tensors), as TensorBoard meshes tagged
        with their identity: `train/cloud_<i>_id<pid>`."""
        pids = {label: pid for pid, label in self.data.reader.index.label_map.items()}
        for i in range(min(2, len(xyz))):
            pid = pid_text(pids[int(labels[i])])
            self.monitor.point_cloud(f"train/cloud_{i}_id{pid}", xyz[i].numpy(), rgb[i].numpy() + 0.5, 1)

    def end_epoch(self) -> None:
        self.act_on(self.agreement.verdicts(wait=True))
        p, t = self.progress, self.config.train
        if self.average is not None and averages_epoch(p.epoch, t.wa_start, t.epochs):
            self.average.update(self.model)
        p.epoch, p.step = p.epoch + 1, 0
        self.checkpointer.save(p.global_step)
        if p.epoch == t.epochs or (t.eval_every_epochs and p.epoch % t.eval_every_epochs == 0):
            self.results = self.evaluate(self.model)

    def evaluate(self, model: nn.Module, tag: str = "eval") -> dict[str, Any]:
        """Evaluate with the same BatchNorm statistics on every rank. Synchronised BatchNorm keeps them
        equal; otherwise rank 0's are broadcast: DDP broadcasts them only at the next forward (and
        DeepSpeed never), so after a step each rank still holds the ones its own batch moved."""
        if not self.sync_bn:
            dist.broadcast_buffers(model)
        return evaluate_model(model, self.config, self.info, self.monitor, self.progress.global_step, tag=tag)

    def finish(self) -> dict[str, Any]:
        """`model_last.pt`, and with weight averaging `model_average.pt` (BatchNorm re-estimated on
        one more epoch's batches, then evaluated)."""
        step = self.progress.global_step
        outputs = {"model_last": self.checkpointer.save_weights(self.run_dir / "model_last.pt", self.model, step)}
        if self.average is not None and self.average.count:
            averaged = self.average.averaged_model(self.model)
            update_bn(averaged, self.data.loader(self.config.train.epochs), self.info.device)
            path = self.run_dir / "model_average.pt"
            outputs["model_average"] = self.checkpointer.save_weights(path, averaged, step)
            self.results["average"] = self.evaluate(averaged, tag="average")
        dist.barrier()
        self.monitor.log(f"done: {', '.join(f'{k} {v}' for k, v in outputs.items())}")
        return {"metrics": self.results, **{k: str(v) for k, v in outputs.items()}}

    def close(self) -> None:
        self.agreement.close()
