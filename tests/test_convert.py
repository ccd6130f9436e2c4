"""`ognet-import-original`: a snapshot of the original code (model_last.pth + opts.yaml) becomes
an ognet checkpoint with the same features, and an ambiguous model option is never guessed.

Snapshots here are small real models written in the original's layout (export_original) beside
an opts.yaml made from a released one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from ognet.checkpoint import load_checkpoint
from ognet.model import build_model, export_original, load_original
from ognet.model.convert import main

pytestmark = pytest.mark.usefixtures("one_thread")

# The released Duke OG-Net-Deep + Circle snapshot's opts.yaml (layumi/person-reid-3d @ 5a0bda9),
# verbatim but for the list keys written inline.
RELEASED_OPTS = """
ASPP: 0
D2: false
adam: true
adamW: false
amsgrad: true
balance: true
batch_size: 36
bg: true
cg: false
channel: 6
circle: true
class_num: 702
class_sampler: 0
cluster: xyzrgb
conv: EdgeConv
dataset_path: 2DDuke
drop_connect_rate: 0.0
droprate: 0.7
efficient: true
erase: 0.0
feature_dims: [48, 96, 96, 192, 192, 384, 384]
final_bn: false
flip: true
fp16: false
gamma: 64.0
gem: true
gpu_ids: [0]
id_skip: 2
init_points: 768
jitter: false
k: 9
labelsmooth: false
layer_drop: 0
light: false
load_model_path: ''
lookahead: false
lrRate: 0.0006
name: Duke_Efficient_ALL_2SDDense_b36_lr6_flip_slim0.5_warm10_scale_e0_d7+bg_adam_init768_clusterXYZRGB_e1000_id2_bn_k9_conv2_balance
nce: false
no_fnorm: false
no_se: false
no_xyz: false
norm: false
norm_layer: bn2
npart: 1
num_conv: 2
num_epochs: 1000
num_workers: 2
pre_act: false
pretrained_name: None
res_scale: 1.0
restart: false
resume: false
rotate: false
sam: false
scale: true
shuffle: -1
slim: 0.5
step: false
stride: 2
sync_bn: false
train_all: true
twins: false
use2: false
use_DGCNN: false
use_MSG: false
use_SSG: false
use_dense: true
use_dense2: false
wa: false
wa_start: 0.9
warm_epoch: 10
warm_iteration: 4590
warm_up: 0.1
wd: 0.0005
"""
SMALL = {"init_points": 64, "k": 4}  # a few hundred points per cloud suffice
CLASSES = 12
FOLDER = "Duke_Efficient_ALL_2SDDense_b36_lr6_flip_slim0.5_e1000_id2_bn_k9_conv2_balance"  # `_bn_`, yet bn2


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters, some weights negative: a fresh BN is a positive
    scaling, which commutes with max and mean and would hide a wrong norm layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(0.3 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[tuple[str, str], nn.Module]:
    return {
        (v, n): trained_like(build_model(v, CLASSES, norm=n, **SMALL))
        for v, n in [("ognet-deep", "bn2"), ("ognet-small", "bn")]
    }


def write_snapshot(folder: Path, model: nn.Module, opts: bool = True, **changes) -> Path:
    """model_last.pth in the original's layout and, with `opts`, its opts.yaml (None drops a key)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(export_original(model, logit_scale=1.0), folder / "model_last.pth")
    if opts:
        c = model.config
        values = {**yaml.safe_load(RELEASED_OPTS), "class_num": c.num_classes, "feature_dims": list(c.feature_dims)}
        values.update(k=c.k, num_conv=c.num_conv, id_skip=c.id_skip, init_points=c.init_points, norm_layer=c.norm)
        values.update(changes)
        (folder / "opts.yaml").write_text(yaml.safe_dump({k: v for k, v in values.items() if v is not None}))
    return folder / "model_last.pth"


def features(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    xyz = torch.randn(2, 256, 3, generator=g) * torch.tensor([0.2, 0.5, 0.1])
    with torch.no_grad():
        return model.eval()(xyz, torch.rand(2, 256, 3, generator=g) - 0.5).feature


def imported(path: Path) -> nn.Module:
    config = load_checkpoint(path)["model_config"]
    model = build_model(config["variant"], config["num_classes"], **config["overrides"])
    model.load_state_dict(load_checkpoint(path)["model"], strict=True)
    return model


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("key", [("ognet-deep", "bn2"), ("ognet-small", "bn")], ids="-".join)
def test_snapshot_imports_with_its_options_and_features(models, key, tmp_path, capsys):
    model = models[key]
    source = write_snapshot(tmp_path / FOLDER, model)
    code, out, err = run(capsys, source, tmp_path / "ognet.pt")
    assert code == 0, err
    ckpt = load_checkpoint(tmp_path / "ognet.pt")
    assert ckpt["model_config"] == {"variant": key[0], "num_classes": CLASSES, "overrides": {"norm": key[1], **SMALL}}
    assert ckpt["imported_from"] == {"checkpoint": str(source), "opts": str(source.with_name("opts.yaml"))}
    assert "note:" not in out
    assert torch.equal(features(imported(tmp_path / "ognet.pt")), features(model))


def test_a_wrong_norm_layer_loads_without_error_and_changes_the_features(models):
    """Why the norm layer is never guessed: same shapes, a strict load succeeds, other features."""
    bn2 = models[("ognet-deep", "bn2")]
    bn = build_model("ognet-deep", CLASSES, norm="bn", **SMALL)
    load_original(bn, export_original(bn2, logit_scale=1.0))
    assert not torch.allclose(features(bn), features(bn2), atol=1e-3)


def test_without_opts_the_norm_layer_must_be_given(models, tmp_path, capsys):
    model = models[("ognet-deep", "bn2")]
    source = write_snapshot(tmp_path / FOLDER, model, opts=False)
    code, out, err = run(capsys, source, tmp_path / "ognet.pt", "--set", "k=4", "--set", "init_points=64")
    assert code == 1 and not (tmp_path / "ognet.pt").exists()
    assert f"{source}: no opts.yaml beside it; the norm layer is not in the weights" in err
    assert "same tensor shapes" in err and "--set norm=bn2 (BatchNorm2d before aggregation: every released" in err
    assert "--set norm=bn (BatchNorm1d after aggregation: train_M.py's default" in err

    code, out, err = run(
        capsys, source, tmp_path / "ognet.pt", "--set", "norm=bn2", "--set", "k=4", "--set", "init_points=64"
    )
    assert code == 0, err
    assert "note: no opts.yaml: k=4 and init_points=64 (not in the weights)" in out
    assert load_checkpoint(tmp_path / "ognet.pt")["imported_from"]["opts"] is None
    assert torch.equal(features(imported(tmp_path / "ognet.pt")), features(model))


def test_opts_named_elsewhere_and_given_values_must_agree(models, tmp_path, capsys):
    model = models[("ognet-small", "bn")]
    write_snapshot(tmp_path / "elsewhere", model)
    source = write_snapshot(tmp_path / FOLDER, model, opts=False)
    opts = tmp_path / "elsewhere" / "opts.yaml"
    code, _, err = run(capsys, source, tmp_path / "a.pt", "--opts", opts, "--set", "norm=bn2")
    assert code == 1 and f"{opts} gives norm='bn', and norm='bn2' was given" in err
    assert not (tmp_path / "a.pt").exists()
    code, _, err = run(capsys, source, tmp_path / "a.pt", "--opts", opts, "--set", "norm=bn", "--set", "k=4")
    assert code == 0, err
    assert torch.equal(features(imported(tmp_path / "a.pt")), features(model))


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"norm_layer": None},
            "opts.yaml has no norm_layer (test_M.py would take bn); the norm layer is not in the weights",
        ),
        ({"k": None}, "opts.yaml: no k (test_M.py needs them to build the model)"),
        ({"npart": 2}, "opts.yaml: a model ognet does not implement: npart: 2 (ognet: 1)"),
        ({"cluster": "xyz", "efficient": False}, "efficient: False (ognet: True); cluster: 'xyz' (ognet: 'xyzrgb')"),
        ({"D2": True}, "D2: True (ognet: False)"),
        ({"class_num": 702}, "opts.yaml says class_num 702, but"),
        ({"gem": "yes"}, "opts.yaml: gem: 'yes' is not a valid value (expected true or false"),
        ({"num_conv": 1}, "matches no OG-Net variant"),
    ],
)
def test_opts_that_do_not_fit_are_refused(models, changes, message, tmp_path, capsys):
    source = write_snapshot(tmp_path / FOLDER, models[("ognet-deep", "bn2")], **changes)
    code, _, err = run(capsys, source, tmp_path / "ognet.pt")
    assert code == 1 and message in err, err
    assert not (tmp_path / "ognet.pt").exists()


@pytest.mark.parametrize(
    "text,message",
    [
        ("[1, 2]", "options file must be a mapping of keys, got list"),
        ("k: [", "options file is not valid YAML"),
    ],
)
def test_unreadable_opts_name_the_file(models, text, message, tmp_path, capsys):
    source = write_snapshot(tmp_path / FOLDER, models[("ognet-small", "bn")], opts=False)
    source.with_name("opts.yaml").write_text(text)
    code, _, err = run(capsys, source, tmp_path / "ognet.pt")
    assert code == 1 and f"{source.with_name('opts.yaml')}: {message}" in err
