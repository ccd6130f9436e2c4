"""The typed config: every key checked before any work, errors that name the key."""

from __future__ import annotations

import pytest

from ognet.config import Config, load_config, save_config
from ognet.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    config = load_config(None, ["train.epochs=5", "optim.lr=4e-3", "model.overrides={k: 9}", "eval.scales=[1.0]"])
    assert (config.train.epochs, config.optim.lr, config.model.overrides, config.eval.scales) == (
        5,
        4e-3,
        {"k": 9},
        (1.0,),
    )
    assert config.sampler.mode == "balance" and config.train.backend == "ddp"
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config  # the saved config reads back identical


def test_base_files_merge_and_cycles_are_refused(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {epochs: 7, seed: 3}\nloss: {circle: true}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {epochs: 9}\n")
    config = load_config(tmp_path / "child.yaml")
    assert (config.train.epochs, config.train.seed, config.loss.circle) == (9, 3, True)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "unknown config key train.epoch"),
        ("train.epochs=three", "config key train.epochs must be int, got 'three'"),
        ("train.backend=horovod", "train.backend = 'horovod' is not one of ddp, deepspeed"),
        ("sampler.mode=random", "sampler.mode = 'random' is not one of balance, class_sampler, shuffle, pk"),
        ("model.variant=ognet-huge", "model.variant = 'ognet-huge' is not one of ognet, ognet-small, ognet-deep"),
        ("data.bad_samples=ignore", "data.bad_samples = 'ignore' is not one of error, skip"),
        ("eval.ap=interp", "eval.ap = 'interp' is not one of trapezoid, noninterp"),
        ("loss.form=pairs", "loss.form = 'pairs' is not one of global, per_anchor"),
        ("train.log_every_steps=0", "train.log_every_steps must be > 0, got 0"),
        ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
        ("data.slim=1.5", r"data.slim must be in \(0, 1\], got 1.5"),
        ("train.wa_start=1", r"train.wa_start must be in \[0, 1\)"),
        ("sampler.camera_aware=true", "sampler.camera_aware applies to sampler.mode pk only, not 'balance'"),
        ("sampler.k=5", "train.global_batch_size 36 is not a multiple of sampler.k 5"),
        ("eval.scales=[]", "eval.scales must list at least one scale"),
        ("epochs", "is not of the form key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    overrides = [override, "sampler.mode=pk"] if override == "sampler.k=5" else [override]
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("true", True), ("false", False)])
def test_a_literal_or_bool_key_takes_either_from_the_command_line_and_yaml(tmp_path, value, expected):
    assert load_config(None, [f"train.sync_bn={value}"]).train.sync_bn == expected
    (tmp_path / "c.yaml").write_text(f"train: {{sync_bn: {value}}}\n")
    config = load_config(tmp_path / "c.yaml")
    assert config.train.sync_bn == expected and type(config.train.sync_bn) is type(expected)
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config


@pytest.mark.parametrize("value", ["Auto", "1", "null"])
def test_a_literal_or_bool_key_refuses_other_values_naming_them(value):
    with pytest.raises(ConfigError, match=r"config key train.sync_bn must be 'auto' or bool, got"):
        load_config(None, [f"train.sync_bn={value}"])


def test_yaml_1_1_exponents_and_tuples():
    config = load_config(None, ["optim.lr=4e-3", "optim.betas=[0.5, 0.9]"])
    assert config.optim.lr == 0.004 and config.optim.betas == (0.5, 0.9)
    assert Config().to_dict()["optim"]["betas"] == [0.9, 0.999]  # plain lists for YAML and JSON


def test_every_key_is_described_by_help_and_print_config_prints_the_resolved_config(capsys):
    from ognet.config import describe_keys
    from ognet.train import main

    rows = describe_keys()
    assert len(rows) > 50 and [key for key, _, meaning in rows if not meaning] == []
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(f"  {key}={default}" in out for key, default, _ in rows)
    assert "75 preempted" in out
    main(["--print-config", "train.epochs=3", "sampler.mode=pk"])
    printed = capsys.readouterr().out
    assert "epochs: 3" in printed and "mode: pk" in printed
