"""Sharded evaluation (`launch/evaluate.py` = ognet-eval) as real processes on the tiny synthetic set:
a plain process and torchrun on gloo with 2 and 3 ranks give the same features and metrics; the
features equal a reference computed here from the shards alone; result line, TensorBoard scalars and
rank-list pictures are read back; bad input is a clear error; an imported original checkpoint
evaluates to the same features as our own.

One random-weight checkpoint serves the whole module (no training: random OG-Net-Small features
already rank the gallery non-trivially). Every evaluation runs on CPU (CUDA hidden), one thread
per process, with a subprocess timeout and a short collective timeout, so a hang fails the test.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from data_fixtures import tiny_root, tiny_shards  # noqa: F401  (fixtures)
from dist_scripts.procs import REPO, TORCHRUN, clean_env, run, run_here
from picture_checks import decode_png, expected_tiles, frame_pixels, hparams_metrics, inner, tiles_of
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_metrics import assert_metrics_match_reference, reference_metrics

from ognet.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from ognet.data.pack import PackOptions, pack_dataset
from ognet.data.shards import ShardReader
from ognet.data.transforms import TransformConfig, transform
from ognet.evaluate import main as eval_main
from ognet.metrics import evaluate_ranking, format_result_line
from ognet.model import build_model, export_original
from ognet.pictures import FRAME_COLOURS, TEXT_COLOUR, render_cloud

EVAL = str(REPO / "launch" / "evaluate.py")
IMPORT_ORIGINAL = Path(sys.executable).with_name("ognet-import-original")
MODEL_CONFIG = {"variant": "ognet-small", "num_classes": 8, "overrides": {"init_points": 64, "k": 4}}
NUM_QUERY, NUM_GALLERY = 12, 44  # the tiny preset
TIMEOUT = 240  # per evaluation process; collectives time out after 60 s, well before
# The 2-rank run loads through a DataLoader worker (a forked process reading the shards itself).
RUN_OVERRIDES = {0: (), 2: ("data.num_workers=1",), 3: ()}


def eval_env() -> dict[str, str]:
    """CPU only (gloo, and the same kernels in every process), one thread per process."""
    return clean_env(CUDA_VISIBLE_DEVICES="")


def evaluate(nproc: int, config: Path, checkpoint: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`launch/evaluate.py` under torchrun with nproc ranks, or (nproc 0) as one plain process: this
    one, which saves a process's start-up (no launcher, no process group either way)."""
    args = ["--config", str(config), "--checkpoint", str(checkpoint), f"run_dir={run_dir}", *overrides]
    if nproc == 0:
        return run_here(eval_main, args)
    launcher = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}"]
    return run([*launcher, EVAL, *args], env=eval_env(), timeout=TIMEOUT)


def features(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return (np.load(run_dir / "features-eval-query.npy"), np.load(run_dir / "features-eval-gallery.npy"))


def metrics_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics-eval.json").read_text())


def ranking_metrics(qf: np.ndarray, gf: np.ndarray, query: ShardReader, gallery: ShardReader) -> dict:
    qi, gi = query.index, gallery.index
    return {"step": 0, **evaluate_ranking(qf, qi.pids, qi.camids, gf, gi.pids, gi.camids)}


def ranking_margin(qf: np.ndarray, gf: np.ndarray, query: ShardReader, gallery: ShardReader) -> float:
    """Smallest score gap between a good gallery item of a query and any other non-junk item: score
    changes below half of it cannot change a rank that the metrics depend on."""
    qi, gi = query.index, gallery.index
    scores = qf.astype(np.float64) @ gf.astype(np.float64).T
    margin = np.inf
    for q, s in enumerate(scores):
        same = gi.pids == qi.pids[q]
        junk = (gi.pids == -1) | (same & (gi.camids == qi.camids[q]))
        for g in np.flatnonzero(same & ~junk):
            others = ~junk
            others[g] = False
            margin = min(margin, float(np.abs(s[others] - s[g]).min(initial=np.inf)))
    return margin


def random_checkpoint(folder: Path, spec: dict) -> Path:
    """`folder/model_last.pt`: random weights of the model `spec` with non-default BN running statistics."""
    torch.manual_seed(0)
    model = build_model(spec["variant"], spec["num_classes"], **spec["overrides"])
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    save_checkpoint(folder / "model_last.pt", {"model": model.state_dict(), "model_config": spec})
    return folder / "model_last.pt"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Random OG-Net-Small weights with non-default BN running statistics."""
    return random_checkpoint(tmp_path_factory.mktemp("checkpoint"), MODEL_CONFIG)


def write_config(path: Path, root: Path) -> Path:
    """An eval config as a user writes one: the data to evaluate on and the eval options."""
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"root": str(root), "num_workers": 0},
                "eval": {"batch_size": 5, "save_features": True},
                "train": {"collective_timeout_s": 60},
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def eval_config(tiny_shards, tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("config") / "eval.yaml", tiny_shards)


@pytest.fixture(scope="module")
def evaluated(checkpoint, eval_config, tmp_path_factory):
    """evaluated(nproc) -> (run_dir, process) of the checkpoint on the tiny set; each world size
    runs once per module, when a test first needs it."""
    done: dict[int, tuple[Path, subprocess.CompletedProcess]] = {}

    def get(nproc: int) -> tuple[Path, subprocess.CompletedProcess]:
        if nproc not in done:
            run_dir = tmp_path_factory.mktemp(f"eval-{nproc or 'plain'}")
            done[nproc] = run_dir, evaluate(nproc, eval_config, checkpoint, run_dir, *RUN_OVERRIDES[nproc])
        return done[nproc]

    return get


@pytest.fixture(scope="module")
def readers(tiny_shards) -> tuple[ShardReader, ShardReader]:
    return ShardReader(tiny_shards / "query"), ShardReader(tiny_shards / "gallery")


# ------------------------------------------------------------------------------------------------
# 1. The same features and metrics on 1, 2 and 3 ranks


@pytest.mark.slow
def test_plain_two_and_three_ranks_give_identical_features_and_metrics(evaluated):
    """12 queries and 44 gallery items: 2 ranks split 6/6 and 22/22 (read by a DataLoader worker),
    3 ranks 4/4/4 and 15/15/14 (uneven); with eval.batch_size 5, last batches of 1 to 4 samples.

    Bitwise: in eval mode a sample's feature depends on that sample alone, and ognet-eval pads a
    short batch to the full batch size, so every forward has the same shape and BLAS the same
    kernels on every rank (batches of 1, 2-3 and 4+ rows give different last bits on MKL). The
    metrics are then exactly equal too (per-query results reduced with exact sums).
    """
    plain_dir, _ = evaluated(0)
    qf, gf = features(plain_dir)
    assert qf.shape == (NUM_QUERY, 512) and gf.shape == (NUM_GALLERY, 512)
    assert qf.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(qf, axis=1), 1, atol=1e-5)
    assert len(np.unique(qf.round(4), axis=0)) == NUM_QUERY  # no collapsed features
    metrics = metrics_json(plain_dir)
    assert metrics["num_queries"] == NUM_QUERY and 0 < metrics["mAP"] < 1
    # The same features under the original's pytorch_result.mat keys (for its evaluate_gpu.py).
    import scipy.io

    mat = scipy.io.loadmat(plain_dir / "pytorch_result-eval.mat")
    assert np.array_equal(mat["query_f"], qf) and np.array_equal(mat["gallery_f"], gf)
    assert mat["query_label"].size == NUM_QUERY and mat["gallery_cam"].size == NUM_GALLERY
    assert {-1, 0} <= set(mat["gallery_label"].ravel().tolist())  # junk and distractors keep their labels

    for nproc in (2, 3):
        run_dir, proc = evaluated(nproc)
        sharded_qf, sharded_gf = features(run_dir)
        for name, got, want in (("query", sharded_qf, qf), ("gallery", sharded_gf, gf)):
            assert np.array_equal(got, want), f"{nproc} ranks: {name} features differ by {np.abs(got - want).max()}"
        assert metrics_json(run_dir) == metrics, f"{nproc} ranks"
        # only the main rank writes: one result line, no per-rank files
        assert (run_dir / "result.txt").read_text().count("Rank@1:") == 1
        assert proc.stdout.count("Rank@1:") == 1


@pytest.fixture(scope="module")
def two_query_shards(tiny_root, tiny_shards, tmp_path_factory) -> tuple[Path, list[str]]:
    """A data root whose query split holds 2 samples (of the first two query identities) and whose
    gallery is the tiny gallery: with 3 ranks, rank 2 gets nothing to embed and no query to rank."""
    source = tmp_path_factory.mktemp("two-query-source")
    picked = []
    for pid_dir in sorted((tiny_root / "query").iterdir())[:2]:
        first = sorted(pid_dir.iterdir())[0]
        (source / "query" / pid_dir.name).mkdir(parents=True)
        shutil.copy(first, source / "query" / pid_dir.name / first.name)
        picked.append(f"query/{pid_dir.name}/{first.name}")
    out = tmp_path_factory.mktemp("two-query-shards")
    pack_dataset(source, out, splits=["query"], options=PackOptions(workers=1, progress=False))
    (out / "gallery").symlink_to(tiny_shards / "gallery", target_is_directory=True)
    return out, picked


@pytest.mark.slow
def test_rank_with_empty_slice_neither_hangs_nor_fails(evaluated, checkpoint, two_query_shards, readers, tmp_path):
    root, picked = two_query_shards
    config = write_config(tmp_path / "eval.yaml", root)
    run_dir = tmp_path / "run"
    evaluate(3, config, checkpoint, run_dir)

    query, gallery = ShardReader(root / "query"), ShardReader(root / "gallery")
    assert query.index.paths == picked
    rows = [readers[0].index.paths.index(p) for p in picked]
    full_qf, full_gf = features(evaluated(0)[0])
    qf, gf = features(run_dir)
    # Each query was a batch of one on its rank, padded to the batch size: the same bits as in
    # the full single-process run.
    assert np.array_equal(gf, full_gf)
    assert np.array_equal(qf, full_qf[rows]), f"query features differ by {np.abs(qf - full_qf[rows]).max()}"
    metrics = metrics_json(run_dir)
    assert metrics["num_queries"] == 2
    assert metrics == ranking_metrics(qf, gf, query, gallery)


# ------------------------------------------------------------------------------------------------
# 2. The features are the original's: f(xyz) + f(1.1 xyz) of the BN-neck output, L2-normalised


@torch.no_grad()
def reference_features(checkpoint: Path, reader: ShardReader, slim: float = 0.5) -> np.ndarray:
    """As the original's test_M.py, from the shards alone: no DataLoader, no slicing, no gathering.
    The whole split is one batch (in eval mode a sample's feature does not depend on its batch)."""
    payload = load_checkpoint(checkpoint)
    mc = payload["model_config"]
    model = build_model(mc["variant"], mc["num_classes"], **mc["overrides"])
    load_model_state(model, payload["model"], str(checkpoint))
    model.eval()
    clouds = [
        transform(s.xyz, s.rgb, TransformConfig(slim=slim), None) for s in (reader[i] for i in range(len(reader)))
    ]
    xyz = torch.from_numpy(np.stack([c[0] for c in clouds]))
    rgb = torch.from_numpy(np.stack([c[1] for c in clouds]))
    f = model(xyz, rgb).feature + model(1.1 * xyz, rgb).feature
    return (f / (f.norm(dim=1, keepdim=True) + 1e-6)).numpy()


@pytest.mark.slow
def test_features_and_metrics_equal_an_independent_reference(evaluated, checkpoint, readers):
    """allclose 1e-5, not bitwise: the reference runs other batch sizes in this process's thread
    count, the command batches of 5 on one thread (float32 rounding, ~1e-7)."""
    query, gallery = readers
    ref_qf, ref_gf = reference_features(checkpoint, query), reference_features(checkpoint, gallery)
    qf, gf = features(evaluated(0)[0])
    np.testing.assert_allclose(qf, ref_qf, rtol=0, atol=1e-5)
    np.testing.assert_allclose(gf, ref_gf, rtol=0, atol=1e-5)
    metrics = metrics_json(evaluated(0)[0])
    assert metrics == ranking_metrics(qf, gf, query, gallery)  # the command's features, ranked again
    qi, gi = query.index, gallery.index  # and the metrics of the reference's features by a per-query loop
    assert_metrics_match_reference(metrics, reference_metrics(ref_qf, qi.pids, qi.camids, ref_gf, gi.pids, gi.camids))
    # the same numbers: rounding-level score changes move no rank here (should a near tie ever
    # make them differ, the message says by how much against the smallest deciding gap)
    shift = np.abs(qf.astype(np.float64) @ gf.T - ref_qf.astype(np.float64) @ ref_gf.T).max()
    assert metrics == ranking_metrics(ref_qf, ref_gf, query, gallery), (
        f"scores moved by up to {shift:.3g}, the ranking margin is {ranking_margin(qf, gf, query, gallery):.3g}"
    )


# ------------------------------------------------------------------------------------------------
# 3. Result line, TensorBoard scalars and rank-list pictures


@pytest.mark.slow
def test_result_line_tensorboard_scalars_and_rank_list_pictures(evaluated, readers):
    run_dir, proc = evaluated(0)
    metrics = metrics_json(run_dir)
    lines = (run_dir / "result.txt").read_text().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"eval step 0: Rank@1:\d\.\d{6} Rank@5:\d\.\d{6} Rank@10:\d\.\d{6} mAP:\d\.\d{6}", lines[0])
    assert lines[0].endswith(format_result_line(metrics))
    assert format_result_line(metrics) in proc.stdout
    assert "query" in proc.stderr and "gallery" in proc.stderr and "batch" in proc.stderr  # progress bars

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        [scalar] = events.Scalars(f"eval/{key}")
        assert scalar.step == 0 and scalar.value == pytest.approx(metrics[key], abs=1e-7), key
    pictures = sorted(t for t in events.Tags()["images"] if t.startswith("eval/rank_list_"))
    assert pictures == [f"eval/rank_list_{q}" for q in range(4)]  # eval.rank_list_queries default 4
    assert hparams_metrics(run_dir / "tb") == [f"eval/{key}" for key in ("rank1", "rank5", "rank10", "mAP", "mINP")]

    query, gallery = readers
    qf, gf = features(run_dir)
    kinds_seen = set()
    for q in range(4):
        [image] = events.Images(f"eval/rank_list_{q}")
        picture = decode_png(image.encoded_image_string)
        assert np.array_equal(np.asarray(Image.open(run_dir / f"rank-list-eval-{q}.png").convert("RGB")), picture)
        scores = gf.astype(np.float64) @ qf[q].astype(np.float64)
        want = expected_tiles(scores, q, query.index, gallery.index, np.zeros(len(gallery), dtype=bool))
        shown = [g for g, _ in want]
        gap = -np.diff(scores[np.argsort(-scores, kind="stable")][: len(shown) + 1]).min()
        assert gap > 1e-5, f"query {q}: near tie among the shown items ({gap:.3g}), the order here is ambiguous"
        tiles = tiles_of(picture)
        assert len(tiles) == 1 + len(want) and sum(kind != "junk" for _, kind in want) == 10
        clouds = [(query[q], "query")] + [(gallery[g], kind) for g, kind in want]
        for t, ((framed, band), (cloud, kind)) in enumerate(zip(tiles, clouds)):
            assert (frame_pixels(framed) == FRAME_COLOURS[kind]).all(), f"query {q}, tile {t}: expected a {kind} frame"
            drawn = render_cloud(cloud.xyz, cloud.rgb)
            assert np.array_equal(inner(framed), drawn // 2 + 128 if kind == "junk" else drawn), (
                f"query {q}, tile {t}: not the expected cloud"
            )
            assert np.all(band == TEXT_COLOUR, axis=2).sum() > 30, f"query {q}, tile {t}: no label"
        kinds_seen.update(kind for _, kind in clouds)
    assert kinds_seen == {"query", "match", "other", "junk"}  # every kind of frame was checked


# ------------------------------------------------------------------------------------------------
# 4. Bad input: a clear error naming the file or key, a non-zero exit


class _Payload:
    """Pickled, this would open (create) a file when loaded: weights_only must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def eval_error(capsys, *argv: str) -> str:
    """ognet-eval's error message (it exits non-zero with the message on stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        eval_main(list(argv))
    code = exit_info.value.code
    assert code not in (0, None), f"ognet-eval {argv} exited {code}"
    return code if isinstance(code, str) else capsys.readouterr().err


def test_missing_checkpoint_exits_non_zero_naming_it(tiny_shards, tmp_path):
    missing = tmp_path / "no-such-model.pt"
    cmd = [
        sys.executable,
        EVAL,
        "--checkpoint",
        str(missing),
        f"data.root={tiny_shards}",
        f"run_dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, env=eval_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"ognet-eval: error: {missing}: checkpoint does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreadable_or_unsafe_checkpoints_are_clear_errors(checkpoint, tiny_shards, tmp_path, capsys):
    common = (f"data.root={tiny_shards}", f"run_dir={tmp_path / 'run'}", "data.num_workers=0")
    data = checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all\n" * 10)
    message = eval_error(capsys, "--checkpoint", str(truncated), *common)
    assert f"{truncated}: unreadable or truncated checkpoint" in message
    # Not a zip: torch.load falls back to the legacy pickle reader, whose failure is reported as a
    # refused pickle (checkpoint.py's wording), but the file is named and nothing runs.
    message = eval_error(capsys, "--checkpoint", str(garbage), *common)
    assert message.startswith(f"ognet-eval: error: {garbage}: ")

    marker = tmp_path / "code-ran"
    pickled = tmp_path / "pickled.pt"
    torch.save(
        {"format": "ognet-checkpoint", "version": 1, "model": {"w": _Payload(marker)}, "model_config": MODEL_CONFIG},
        pickled,
    )
    message = eval_error(capsys, "--checkpoint", str(pickled), *common)
    assert f"{pickled}: refused" in message
    assert not marker.exists(), "the pickled payload was executed"

    original = tmp_path / "model_last.pth"  # the original's own format, not imported first
    torch.save(export_original(build_model("ognet-small", 8, init_points=64, k=4)), original)
    message = eval_error(capsys, "--checkpoint", str(original), *common)
    assert f"{original}: not an ognet checkpoint" in message and "ognet-import-original" in message

    wrong = tmp_path / "wrong-variant.pt"  # weights of ognet-small, config says ognet
    save_checkpoint(
        wrong, {"model": load_checkpoint(checkpoint)["model"], "model_config": {**MODEL_CONFIG, "variant": "ognet"}}
    )
    message = eval_error(capsys, "--checkpoint", str(wrong), *common)
    assert (
        f"{wrong}: checkpoint does not fit the model: " in message
        and "bn.1.weight: checkpoint (96,) vs model (128,)" in message
    )

    classes = tmp_path / "wrong-classes.pt"  # weights for 8 identities, config says 9
    save_checkpoint(
        classes, {"model": load_checkpoint(checkpoint)["model"], "model_config": {**MODEL_CONFIG, "num_classes": 9}}
    )
    message = eval_error(capsys, "--checkpoint", str(classes), *common)
    assert f"{classes}: checkpoint does not fit the model: shape mismatches [" in message
    assert "proj_output.weight: checkpoint (8, 512) vs model (9, 512)" in message


def test_data_root_without_query_split_names_the_path(checkpoint, tiny_shards, tmp_path, capsys):
    root = tmp_path / "gallery-only"
    root.mkdir()
    (root / "gallery").symlink_to(tiny_shards / "gallery", target_is_directory=True)
    message = eval_error(capsys, "--checkpoint", str(checkpoint), f"data.root={root}", f"run_dir={tmp_path / 'run'}")
    assert str(root / "query" / "index.json") in message


def test_unknown_config_key_is_named(checkpoint, tiny_shards, tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(tiny_shards)}, "eval": {"batchsize": 8}}))
    message = eval_error(
        capsys, "--config", str(config), "--checkpoint", str(checkpoint), f"run_dir={tmp_path / 'run'}"
    )
    assert "unknown config key eval.batchsize" in message
    message = eval_error(capsys, "--config", str(config), "--checkpoint", str(checkpoint), "eval.batchsize=8")
    assert "unknown config key eval.batchsize" in message
    assert not (tmp_path / "run").exists()  # refused before any work


# ------------------------------------------------------------------------------------------------
# 5. A checkpoint of the original code, imported, evaluates to the same features


@pytest.mark.slow
def test_imported_original_checkpoint_gives_the_same_features(evaluated, checkpoint, eval_config, tmp_path):
    """The original's Market model: 751 classes, circle loss (`logit_scale`), DataParallel keys.
    The class count differs from our checkpoint's 8 but the classifier is not part of the
    feature, so the features must be the same bits."""
    ours = load_checkpoint(checkpoint)["model"]
    model = build_model("ognet-small", 751, init_points=64, k=4)
    result = model.load_state_dict({k: v for k, v in ours.items() if not k.startswith("proj_output.")}, strict=False)
    assert sorted(result.missing_keys) == ["proj_output.bias", "proj_output.weight"] and not result.unexpected_keys
    original = tmp_path / "model_last.pth"
    torch.save(export_original(model, logit_scale=1.0), original)

    assert IMPORT_ORIGINAL.exists(), f"console script {IMPORT_ORIGINAL} missing: pip install -e ."
    converted = tmp_path / "imported.pt"
    options = ("--set", "init_points=64", "--set", "k=4", "--set", "norm=bn2")  # no opts.yaml: norm must be given
    run([str(IMPORT_ORIGINAL), str(original), str(converted), *options], env=eval_env(), timeout=120)
    config = load_checkpoint(converted)["model_config"]
    assert (config["variant"], config["num_classes"]) == ("ognet-small", 751)
    assert {"init_points": 64, "k": 4}.items() <= config["overrides"].items()

    run_dir = tmp_path / "run"
    evaluate(0, eval_config, converted, run_dir)
    qf, gf = features(run_dir)
    want_qf, want_gf = features(evaluated(0)[0])
    assert np.array_equal(qf, want_qf) and np.array_equal(gf, want_gf)
    assert metrics_json(run_dir) == metrics_json(evaluated(0)[0])


def test_flip_adds_the_mirrored_views_to_the_feature(checkpoint, readers):
    """eval.flip: f(x) + f(1.1 x) + f(mirror x) + f(mirror 1.1 x), written out here independently."""
    from ognet.config import load_config
    from ognet.evaluate import embed, load_model

    query, _ = readers
    model = load_model(checkpoint).eval()
    clouds = [transform(s.xyz, s.rgb, TransformConfig(slim=0.5), None) for s in (query[i] for i in range(4))]
    xyz = torch.from_numpy(np.stack([c[0] for c in clouds]))
    rgb = torch.from_numpy(np.stack([c[1] for c in clouds]))
    mirror = torch.tensor([-1.0, 1.0, 1.0])
    with torch.no_grad():
        f = sum(model(v, rgb).feature for v in (xyz, 1.1 * xyz, xyz * mirror, 1.1 * xyz * mirror))
        expected = f / (f.norm(dim=1, keepdim=True) + 1e-6)
        config = load_config(None, ["eval.flip=true", "eval.batch_size=4"])
        flipped = embed(model, xyz, rgb, config)
        plain = embed(model, xyz, rgb, load_config(None, ["eval.batch_size=4"]))
    torch.testing.assert_close(flipped, expected, rtol=0, atol=1e-6)
    assert (flipped - plain).abs().max() > 1e-3  # the option changes the feature
