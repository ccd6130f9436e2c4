"""Fine-tuning from another run's weights (train.init_from) and cross-data-set evaluation: a model
trained on one synthetic data set, then evaluated on and fine-tuned to another with other people
and another number of identities."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from data_fixtures import TINY, tiny_shards  # noqa: F401  (fixture)
from dist_scripts.procs import run_here
from test_train import train_args, weights

from ognet.data import synth
from ognet.data.pack import PackOptions, pack_dataset
from ognet.errors import OgnetError
from ognet.evaluate import main as evaluate_main
from ognet.model import build_model
from ognet.train import main as train_main
from ognet.train.checkpointer import init_weights

OTHER = dataclasses.replace(TINY, train_ids=6, train_images=36, test_ids=5, query_images=10, seed=7)


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory) -> Path:
    """Another data set: other people (seed), 6 training identities instead of 8."""
    base = tmp_path_factory.mktemp("other")
    synth.generate_dataset(base / "raw", OTHER, workers=1, progress=False)
    pack_dataset(base / "raw", base / "shards", options=PackOptions(max_count=10, workers=1, progress=False))
    return base / "shards"


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory) -> Path:
    """model_last.pt of a short run on the tiny set (8 identities)."""
    run_dir = tmp_path_factory.mktemp("source") / "run"
    run_here(train_main, train_args(tiny_shards, run_dir, "train.epochs=1", "eval.rank_list_queries=0"))
    return run_dir / "model_last.pt"


def test_init_weights_keeps_every_tensor_but_a_classifier_of_another_size(trained):
    torch.manual_seed(1)
    model = build_model("ognet-small", 6, init_points=64, k=4)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    note = init_weights(model, trained)
    assert "classifier re-initialised (8 -> 6 classes)" in note
    source = weights(trained)
    for key, value in model.state_dict().items():
        expected = fresh[key] if key.startswith("proj_output.") else source[key]
        assert torch.equal(value, expected), key
    with pytest.raises(OgnetError, match="does not fit the model"):  # another variant: named keys, no guess
        init_weights(build_model("ognet", 6, init_points=64, k=4), trained)


@pytest.mark.slow
def test_cross_data_set_evaluation_and_fine_tuning(trained, other_shards, tmp_path):
    evaluated = tmp_path / "eval-other"
    run_here(evaluate_main, ["--checkpoint", str(trained), *train_args(other_shards, evaluated)])
    metrics = json.loads((evaluated / "metrics-eval.json").read_text())
    assert metrics["num_queries"] == OTHER.query_images and metrics["step"] == 3  # the checkpoint's step
    assert "evaluating" in (evaluated / "eval.log").read_text()

    tuned = tmp_path / "tuned"
    args = train_args(other_shards, tuned, "train.epochs=1", f"train.init_from={trained}", "eval.rank_list_queries=0")
    proc = run_here(train_main, args)
    assert f"weights initialised from {trained} (classifier re-initialised (8 -> 6 classes))" in proc.stdout
    assert "epoch 0 step 1/3" in proc.stdout and "resumed" not in proc.stdout  # a fresh schedule
    assert weights(tuned / "model_last.pt")["proj_output.weight"].shape == (6, 512)
    log = (tuned / "train.log").read_text()
    assert "command:" in log and "versions: python" in log and "weights initialised from" in log

    proc = run_here(train_main, [*args, "train.epochs=2"])  # the same command, later: resumes
    assert "resumed from" in proc.stdout and "weights initialised" not in proc.stdout
