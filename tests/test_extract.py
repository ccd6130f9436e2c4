"""Feature extraction for new clouds (`ognet.load_model`, `ognet.extract_features`, `ognet-extract`):
the features equal those a real ognet-eval run writes for the same samples (its query and gallery
splits, read here from the source point files instead of the shards); the command writes .npy,
names, the original's .mat and a ranking against a gallery; bad input is a clear error naming the
file.

The checkpoint, the eval config and the ognet-eval run are test_evaluate's fixtures (one thread per
process, CUDA hidden, batches of 5), so equal means the same bits.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require
from data_fixtures import tiny_root, tiny_shards  # noqa: F401  (fixtures)
from dist_scripts.procs import run
from test_evaluate import MODEL_CONFIG, checkpoint, eval_config, eval_env, evaluated, features  # noqa: F401

import ognet
from ognet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ognet.config import load_config
from ognet.data.layouts import scan_split
from ognet.data.points import read_points, write_obj
from ognet.errors import DataError
from ognet.extract import list_clouds
from ognet.extract import main as extract_main
from ognet.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def extract(tmp: Path, config: Path, ckpt: Path, clouds: Path, *extra: str) -> Path:
    """`python -m ognet.extract` as a real process, as ognet-eval ran; returns its output folder."""
    out = tmp / f"out-{clouds.name}"
    cmd = [sys.executable, "-m", "ognet.extract", "--config", str(config), "--checkpoint", str(ckpt)]
    run([*cmd, "--clouds", str(clouds), "--out", str(out), *extra], env=eval_env(), timeout=240)
    return out


def extract_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        extract_main(list(argv))
    code = exit_info.value.code
    assert code not in (0, None), f"ognet-extract {argv} exited {code}"
    return code if isinstance(code, str) else capsys.readouterr().err


@pytest.mark.slow
def test_api_features_equal_ognet_eval(evaluated, checkpoint, eval_config, tiny_root):
    """Paths and (xyz, rgb) arrays give the bits ognet-eval wrote for query and gallery."""
    config = load_config(eval_config, ["data.num_workers=0"])
    model = ognet.load_model(checkpoint, "cpu")
    want = dict(zip(("query", "gallery"), features(evaluated(0)[0])))
    for split in ("query", "gallery"):
        paths, names = list_clouds(tiny_root / split)
        assert [f"{split}/{n}" for n in names] == [s.path for s in scan_split(tiny_root, split)]  # the split's order
        got = ognet.extract_features(model, paths, config, progress=False)
        assert got.shape == (len(paths), 512) and got.dtype == torch.float32
        np.testing.assert_array_equal(got.numpy(), want[split])
    arrays = [tuple(read_points(p)) for p in paths]
    np.testing.assert_array_equal(ognet.extract_features(model, arrays, config, progress=False), want["gallery"])


def test_clouds_of_different_point_counts_are_batched_apart(checkpoint, tiny_root):
    """A cloud of another point count starts a new batch; each row equals that cloud embedded alone."""
    model = ognet.load_model(checkpoint, "cpu")
    paths = list_clouds(tiny_root / "query")[0][:3]
    clouds = [tuple(read_points(p)) for p in paths]
    clouds[1] = (clouds[1][0][:300], clouds[1][1][:300])
    config = load_config(None, ["eval.batch_size=4", "data.num_workers=0"])
    together = ognet.extract_features(model, clouds, config, progress=False)
    alone = torch.cat([ognet.extract_features(model, [c], config, progress=False) for c in clouds])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(together.norm(dim=1), torch.ones(3))


@pytest.mark.slow
def test_command_writes_npy_mat_and_ranks_against_a_gallery(evaluated, checkpoint, eval_config, tiny_root, tmp_path):
    scipy_io = require("scipy.io", "ognet-extract writes the original's pytorch_result.mat with scipy")
    want_q, want_g = features(evaluated(0)[0])
    mat_file = tmp_path / "pytorch_result.mat"  # both runs write their set into it, as the original's test does
    gallery = extract(tmp_path, eval_config, checkpoint, tiny_root / "gallery", "--mat-set", "gallery", "--mat", str(mat_file))  # fmt: skip
    listing = tmp_path / "queries.txt"  # a list file, relative to its folder
    q_names = list_clouds(tiny_root / "query")[1]
    listing.write_text("".join(f"{tiny_root.name}/query/{n}\n" for n in q_names))
    (tmp_path / tiny_root.name).symlink_to(tiny_root, target_is_directory=True)
    ranked = ("--gallery", str(gallery / "features.npy"), "--top", "3")
    query = extract(tmp_path, eval_config, checkpoint, listing, *ranked, "--mat", str(mat_file))

    np.testing.assert_array_equal(np.load(gallery / "features.npy"), want_g)
    np.testing.assert_array_equal(np.load(query / "features.npy"), want_q)
    g_names = (gallery / "names.txt").read_text().splitlines()
    assert g_names == list_clouds(tiny_root / "gallery")[1]
    samples = scan_split(tiny_root, "gallery")
    mat = scipy_io.loadmat(mat_file)
    np.testing.assert_array_equal(mat["gallery_f"], want_g)
    np.testing.assert_array_equal(mat["query_f"], want_q)
    assert mat["gallery_label"].ravel().tolist() == [s.pid for s in samples]
    assert mat["gallery_cam"].ravel().tolist() == [s.camid for s in samples]
    assert mat["query_label"].ravel().tolist() == [s.pid for s in scan_split(tiny_root, "query")]
    assert not (gallery / "pytorch_result.mat").exists()

    lines = (query / "ranking.txt").read_text().splitlines()  # against an independent top-3
    scores = want_q.astype(np.float64) @ want_g.astype(np.float64).T
    assert len(lines) == len(q_names)
    for line, name, s in zip(lines, q_names, scores):
        fields = line.split("\t")
        assert fields[0] == f"{tiny_root.name}/query/{name}"
        top = np.argsort(-s, kind="stable")[:3]
        assert [f.split(" ")[0] for f in fields[1:]] == [g_names[i] for i in top]
        np.testing.assert_allclose([float(f.split(" ")[1]) for f in fields[1:]], s[top], atol=1e-6)


def test_class_count_does_not_matter_and_another_variant_is_refused(checkpoint, tiny_root, tmp_path, capsys):
    """The classifier is not part of the feature: a checkpoint for 751 identities gives the same
    features and ranks against a gallery of the 8-identity one. A gallery of another variant is
    refused, naming its file; so is a checkpoint whose weights do not fit its variant."""
    ours = load_checkpoint(checkpoint)["model"]
    many = {**ours, "proj_output.weight": torch.zeros(751, 512), "proj_output.bias": torch.zeros(751)}
    other = tmp_path / "751.pt"
    save_checkpoint(other, {"model": many, "model_config": {**MODEL_CONFIG, "num_classes": 751}})
    clouds = tmp_path / "clouds"
    clouds.mkdir()
    for p in list_clouds(tiny_root / "query")[0][:2]:
        (clouds / p.name).symlink_to(p)
    common = ("--clouds", str(clouds), "data.num_workers=0")
    extract_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "a"), *common])
    extract_main(["--checkpoint", str(other), "--out", str(tmp_path / "b"), "--gallery", str(tmp_path / "a/features.npy"), *common])  # fmt: skip
    assert np.array_equal(np.load(tmp_path / "a/features.npy"), np.load(tmp_path / "b/features.npy"))
    assert (tmp_path / "b/ranking.txt").read_text().count("\t") == 2 * 2

    deep = tmp_path / "deep.pt"
    torch.manual_seed(0)
    deep_model = build_model("ognet", 8, init_points=64, k=4)
    save_checkpoint(deep, {"model": deep_model.state_dict(), "model_config": {**MODEL_CONFIG, "variant": "ognet"}})
    gallery = str(tmp_path / "a/features.npy")
    message = extract_error(
        capsys, "--checkpoint", str(deep), "--out", str(tmp_path / "c"), "--gallery", gallery, *common
    )
    assert f"{gallery}: extracted with another model" in message
    assert not (tmp_path / "c/ranking.txt").exists()

    wrong = tmp_path / "wrong-variant.pt"  # ognet-small weights, config says ognet
    save_checkpoint(wrong, {"model": ours, "model_config": {**MODEL_CONFIG, "variant": "ognet"}})
    with pytest.raises(CheckpointError, match=f"{wrong}: checkpoint does not fit the model"):
        ognet.load_model(wrong, "cpu")


def test_point_files_with_wrong_columns_name_the_file(checkpoint, tmp_path, capsys):
    model = ognet.load_model(checkpoint, "cpu")
    four = tmp_path / "four.npy"
    np.save(four, np.zeros((600, 4), dtype=np.float32))
    obj = tmp_path / "cli" / "five.obj"
    obj.parent.mkdir()
    obj.write_text("v 0 0 0 0.5 0.5\n" * 600)
    few = tmp_path / "few.obj"
    write_obj(few, np.random.default_rng(0).normal(size=(6, 3)), np.full((6, 3), 0.2))
    for path, what in ((four, "expected an (N, 6) array"), (obj, "vertex 0 has 5 values"), (few, "fewer than the model's k=4")):  # fmt: skip
        with pytest.raises(DataError, match=f"{re.escape(str(path))}: .*{re.escape(what)}"):
            ognet.extract_features(model, [path], num_workers=0, progress=False)
    with pytest.raises(DataError, match=r"clouds\[1\]: colours have shape \(5, 2\)"):
        good = (np.random.default_rng(0).normal(size=(600, 3)), np.full((600, 3), 0.2))
        ognet.extract_features(model, [good, (np.zeros((5, 3)), np.zeros((5, 2)))], num_workers=0, progress=False)
    message = extract_error(capsys, "--checkpoint", str(checkpoint), "--clouds", str(obj.parent), "--out", str(tmp_path / "o"))  # fmt: skip
    assert f"ognet-extract: error: {obj}: vertex 0 has 5 values" in message
    assert not (tmp_path / "o").exists()
    message = extract_error(capsys, "--checkpoint", str(checkpoint), "--clouds", str(tmp_path / "none"), "--out", "x")
    assert f"{tmp_path / 'none'}: neither a folder of point files nor a list file" in message


def test_gallery_not_written_by_ognet_extract_is_named(checkpoint, tiny_root, tmp_path, capsys):
    bogus = tmp_path / "g" / "features.npy"
    bogus.parent.mkdir()
    np.save(bogus, np.zeros((3, 512), dtype=np.float32))
    clouds = tmp_path / "list.txt"
    clouds.write_text(str(list_clouds(tiny_root / "query")[0][0]) + "\n")
    args = ("--checkpoint", str(checkpoint), "--clouds", str(clouds), "--out", str(tmp_path / "o"), "--gallery")
    message = extract_error(capsys, *args, str(bogus), "data.num_workers=0")
    assert f"{bogus}: not a gallery written by ognet-extract" in message
    assert "--top must be >= 1, got 0" in extract_error(capsys, *args, str(bogus), "--top", "0")
