"""The Trainer's components, one by one, in one process: schedule, weight averaging, BatchNorm
re-estimation, the rollback of a step not taken, the engine's device-side skip, the agreement,
the checkpointer and the meters."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from ognet import dist
from ognet.config import load_config
from ognet.losses import LossTerms
from ognet.monitor import Monitor
from ognet.train.agreement import Agreement
from ognet.train.averaging import WeightAverage, update_bn
from ognet.train.checkpointer import Checkpointer
from ognet.train.engine import DDPEngine, StepResult
from ognet.train.meters import AverageMeter, TrainMetrics
from ognet.train.progress import Progress
from ognet.train.rollback import BufferRollback
from ognet.train.schedule import averages_epoch, learning_rate

pytestmark = pytest.mark.usefixtures("one_thread")
ONE_PROCESS = dist.DistInfo(0, 0, 1, torch.device("cpu"), None, True)


def test_learning_rate_is_cosine_per_epoch_with_optional_linear_warmup():
    optim = load_config(None, ["optim.lr=1e-3", "optim.min_lr_ratio=0.01"]).optim
    assert learning_rate(optim, 10, 0, 7, 20) == pytest.approx(1e-3)
    assert learning_rate(optim, 10, 5, 0, 20) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))  # cos(pi/2) = 0
    assert learning_rate(optim, 10, 5, 0, 20) == learning_rate(optim, 10, 5, 19, 20)  # stepped per epoch
    assert learning_rate(optim, 10, 9, 0, 20) == pytest.approx(1e-3 * (0.01 + 0.99 * (1 + math.cos(0.9 * math.pi)) / 2))
    warm = load_config(None, ["optim.lr_warmup_epochs=2"]).optim
    assert learning_rate(warm, 10, 0, 0, 20) == pytest.approx(1e-3 / 40)  # step 1 of 40 warm-up steps
    assert learning_rate(warm, 10, 1, 19, 20) == pytest.approx(learning_rate(optim, 10, 1, 19, 20))


def test_weight_averaging_starts_where_the_original_does():
    """The original compares epoch >= wa_start * epochs as floats."""
    assert [e for e in range(15) if averages_epoch(e, 0.9, 15)] == [14]  # 13.5, not int(13.5) = 13
    assert [e for e in range(10) if averages_epoch(e, 0.9, 10)] == [9]
    assert [e for e in range(4) if averages_epoch(e, 0.0, 4)] == [0, 1, 2, 3]


def test_weight_average_is_the_mean_of_the_snapshots_and_round_trips():
    model = nn.Linear(3, 2)
    average = WeightAverage(model)
    snapshots = []
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update(model)
        snapshots.append(model.weight.detach().clone())
    averaged = average.averaged_model(model)
    torch.testing.assert_close(averaged.weight, torch.stack(snapshots).mean(0), rtol=0, atol=1e-6)
    assert model.weight.eq(6.0).all()  # the model itself is untouched
    restored = WeightAverage(nn.Linear(3, 2))
    restored.load_state_dict(average.state_dict())
    assert restored.count == 3 and torch.equal(restored.params["weight"], average.params["weight"])
    assert WeightAverage(model.to(torch.bfloat16)).params["weight"].dtype == torch.float32


def test_update_bn_re_estimates_the_statistics_as_a_cumulative_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4))
    model[0].running_mean.fill_(100.0)  # stale statistics, replaced entirely
    batches = [(torch.randn(8, 4) * (i + 1) + i, None) for i in range(3)]

    class Wrapper(nn.Module):  # update_bn calls model(xyz, rgb)
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, xyz, rgb):
            return self.net(xyz)

    update_bn(Wrapper(), [(x, torch.zeros(1)) for x, _ in batches], torch.device("cpu"))
    expected_mean = torch.stack([x.mean(0) for x, _ in batches]).mean(0)
    expected_var = torch.stack([x.var(0, unbiased=True) for x, _ in batches]).mean(0)
    torch.testing.assert_close(model[0].running_mean, expected_mean)
    torch.testing.assert_close(model[0].running_var, expected_var)
    assert model[0].momentum == 0.1  # put back


def test_rollback_restores_the_statistics_of_a_step_not_taken():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)).train()
    rollback = BufferRollback(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}

    rollback.save()
    model(torch.randn(8, 4))
    moved = {k: v.clone() for k, v in model.state_dict().items() if k in before}
    assert not torch.equal(moved["1.running_mean"], before["1.running_mean"])
    rollback.restore_where(torch.tensor(False))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in moved.items())  # a step taken keeps them

    rollback.save()
    model(torch.full((8, 4), float("nan")))  # a non-finite step: NaN statistics
    assert model[1].running_mean.isnan().all()
    rollback.restore_where(torch.tensor(True))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in moved.items())  # bit for bit, counters too


def engine_for(model: nn.Module) -> DDPEngine:
    return DDPEngine(model, load_config(None, ["optim.lr=0.1"]), ONE_PROCESS)


def test_engine_skips_non_finite_and_held_steps_on_the_device():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    engine = engine_for(model)
    x = torch.randn(5, 3)
    no = torch.tensor(False)

    result = engine.backward_and_step(model(x).square().mean(), 1.0, hold=no)
    assert not result.skipped and not result.nonfinite and result.grad_norm > 0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moments = engine.optimizer.state[model.weight]["exp_avg"].clone()

    for loss, hold in ((model(x).square().mean() * float("inf"), no), (model(x).square().mean(), torch.tensor(True))):
        result = engine.backward_and_step(loss, 1.0, hold=hold)
        assert result.skipped
        assert bool(result.nonfinite) == (not hold)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        assert torch.equal(engine.optimizer.state[model.weight]["exp_avg"], moments)
        assert engine.optimizer.state[model.weight]["step"].item() == 1

    result = engine.backward_and_step(model(x).square().mean(), 1.0, hold=no)
    assert not result.skipped and not torch.equal(model.weight, state["weight"])


def test_agreement_reports_preemption_replaced_samples_and_non_finite_losses():
    agreement = Agreement(torch.device("cpu"))
    try:
        before = Progress(epoch=1, step=2, global_step=9)
        flag = agreement.vote(before, torch.tensor([0, 1, 1]), torch.tensor(2.0), torch.tensor(False))
        assert not flag
        os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM sends ahead of a preemption
        flag = agreement.vote(before.copy(), None, torch.tensor(float("nan")), torch.tensor(False))
        assert flag
        first, second = list(agreement.verdicts())
        assert (first.preempt, first.bad_samples, first.nonfinite, first.before.step) == (False, 2, None, 2)
        assert (second.preempt, second.bad_samples, second.nonfinite) == (True, 0, "loss")
        agreement.vote(before, None, torch.tensor(1.0), torch.tensor(True))
        assert [v.nonfinite for v in agreement.verdicts(wait=True)] == ["gradient"]
    finally:
        agreement.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


class Partition:
    """A partitioned component: every rank writes its own file into the checkpoint's folder."""

    def __init__(self):
        self.value = 0

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "rank0.json").write_text(json.dumps(self.value))

    def load(self, folder: Path) -> None:
        self.value = json.loads((folder / "rank0.json").read_text())


def test_checkpointer_round_trip_prunes_and_warns_about_missing_state(tmp_path, caplog):
    model, progress, part = nn.Linear(2, 2), Progress(), Partition()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    stateful = {"model": model, "optimizer": optimizer, "progress": progress}
    ckpt = Checkpointer(tmp_path, 2, ONE_PROCESS, stateful, {"parts": part}, {"model_config": {"variant": "x"}})
    for step in (1, 2, 3):
        progress.global_step, part.value = step, step * 10
        ckpt.save(step)
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == ["step-00000002.pt", "step-00000003.pt"]
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["step-00000002.pt", "step-00000003.pt"]
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    fresh_model, fresh_progress, fresh_part = nn.Linear(2, 2), Progress(), Partition()
    fresh_optimizer = torch.optim.Adam(fresh_model.parameters())
    stateful = {"model": fresh_model, "optimizer": fresh_optimizer, "progress": fresh_progress, "extra": Progress()}
    again = Checkpointer(tmp_path, 2, ONE_PROCESS, stateful, {"parts": fresh_part}, {})
    with caplog.at_level("WARNING", logger="ognet"):
        assert again.resume() == tmp_path / "step-00000003.pt"
    assert "holds no 'extra' state" in caplog.text
    assert fresh_progress.global_step == 3 and fresh_part.value == 30
    assert all(torch.equal(fresh_model.state_dict()[k], v) for k, v in saved.items())
    assert fresh_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_meters_report_the_window_and_reset(tmp_path):
    meter = AverageMeter()
    meter.update(torch.tensor(2.0))
    meter.update(torch.tensor(4.0), 3)
    assert meter.avg == pytest.approx(14 / 4)
    meter.reset()
    assert math.isnan(meter.avg)

    monitor = Monitor(tmp_path, True)
    metrics = TrainMetrics(monitor, 2, torch.device("cpu"))
    progress = Progress()
    for window in ((1.0, 3.0), (10.0,)):
        for value in window:
            terms = LossTerms(loss=torch.tensor(value), ce=torch.tensor(value), circle=torch.tensor(0.0))
            taken = value != 3.0  # a skipped step's NaN norm does not enter the mean
            norm = torch.tensor(value if taken else float("nan"))
            metrics.update(terms, StepResult(norm, torch.tensor(not taken), torch.tensor(False)), 4)
            progress.global_step += 1
        metrics.write(progress, 10, 1e-3, 1.0)
    monitor.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(2, 2.0), (3, 10.0)]
    assert [e.value for e in events.Scalars("train/grad_norm")] == [1.0, 10.0]
    assert all(e.value > 0 for e in events.Scalars("train/samples_per_s"))
