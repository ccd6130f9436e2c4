"""A training step that neither logs nor checkpoints makes no host synchronisation (profiler-counted
on CPU by benchmarks/step_budget.py's counter, which a log step must trip)."""

import sys

import pytest
from data_fixtures import tiny_shards  # noqa: F401  (fixture)
from dist_scripts.procs import REPO
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(REPO / "benchmarks"))
import step_budget  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_step_that_neither_logs_nor_checkpoints_reads_nothing_back(tiny_shards, tmp_path):  # noqa: F811
    small = ["model.overrides={init_points: 64, k: 8}", "model.point_ops=reference"]
    trainer = step_budget.build_trainer("ognet-small", "reference", 8, tiny_shards, tmp_path, "cpu", small)
    assert trainer.config.loss.circle  # the circle loss's pair selection is part of the step
    inputs = step_budget.step_inputs(8, 256, "cpu")
    counts = step_budget.budget(trainer, inputs)
    assert counts["syncs"] == {} and counts["kernel_ops"] > 100

    trainer.config.train.log_every_steps = 1  # the next step logs: it reads the meters
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.step(*inputs, [])
    assert sum(step_budget.count_events(prof)["syncs"].values()) >= 4
    trainer.close()
