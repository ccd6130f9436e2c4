"""Every training command of the original's READMEs has a config that reproduces it, flag by flag.

A config's header carries the command (`# original:`), what a flag written without its value
means (`# reading:`) and, for the current README's commands, the numbers reported for it
(`# reported:`). The command is parsed with the original's flags and defaults
(tests/original_cli.py) and every value it implies is compared with the loaded config.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from original_cli import (
    DATASETS,
    CommandError,
    config_stem,
    dataset,
    mismatches,
    parse_command,
    read_header,
    unrepresented,
)

from ognet.config import Config, load_config
from ognet.errors import ConfigError
from ognet.losses import ReidLoss

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# Commands per data set: the original's current README (23) and the seed README (14)
CURRENT = {"market": 5, "duke": 6, "cuhk": 6, "msmt": 6}
SEED = {"market": 5, "duke": 3, "cuhk": 3, "msmt": 3}
CURRENT_CONFIGS = sorted(p for name in CURRENT for p in (CONFIGS / name).glob("*.yaml"))
SEED_CONFIGS = sorted(p for name in SEED for p in (CONFIGS / name / "seed").glob("*.yaml"))
RECIPES = CURRENT_CONFIGS + SEED_CONFIGS
NUMBERS = re.compile(r"\d+\.\d+ \(\d+\.\d+\)")  # Rank@1 (mAP), as the READMEs print them


def rel(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def parsed(path: Path):
    header = read_header(path)
    assert len(header.commands) == 1, f"{rel(path)}: expected one '# original:' line, got {len(header.commands)}"
    return parse_command(header.commands[0], header.readings)


def test_every_command_has_one_config_named_after_it():
    assert sorted(CONFIGS.glob("**/*.yaml")) == sorted([*RECIPES, CONFIGS / "demo.yaml"])
    for counts, paths in ((CURRENT, CURRENT_CONFIGS), (SEED, SEED_CONFIGS)):
        found = {name: sum(1 for p in paths if p.relative_to(CONFIGS).parts[0] == name) for name in counts}
        assert found == counts
    for path in RECIPES:
        opts = parsed(path)
        assert path.stem == config_stem(opts), f"{rel(path)} holds a {config_stem(opts)} command"
        assert path.relative_to(CONFIGS).parts[0] == dataset(opts), f"{rel(path)} trains on {opts.dataset_path}"


@pytest.mark.parametrize("path", RECIPES, ids=rel)
def test_config_reproduces_its_command(path):
    problems = mismatches(load_config(path), parsed(path))
    assert not problems, f"{rel(path)} differs from its command:\n" + "\n".join(problems)


def test_only_current_commands_quote_numbers():
    for path in CURRENT_CONFIGS:
        assert read_header(path).reported, f"{rel(path)}: no '# reported: Rank@1 R (mAP M)' line"
    for path in SEED_CONFIGS:
        header_text = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
        assert read_header(path).reported is None and not NUMBERS.search(header_text), rel(path)


def test_readme_table_gives_every_config_with_its_numbers():
    readme = (REPO / "README.md").read_text()
    cells = [cell for line in readme.splitlines() if line.startswith("|") for cell in line.split("|")]
    for path in RECIPES:
        holding = [cell for cell in cells if f"configs/{rel(path)}" in cell]
        assert len(holding) == 1, f"README: configs/{rel(path)} should be in one table cell, found {len(holding)}"
        reported = read_header(path).reported
        if reported:
            assert f"{reported[0]} ({reported[1]})" in holding[0], f"README cell of {rel(path)}: {holding[0]}"
        else:
            assert not NUMBERS.search(holding[0]), f"README cell of {rel(path)} quotes numbers: {holding[0]}"


def test_every_config_path_the_repository_names_exists():
    named = set()
    for pattern in ("README.md", "slurm/*", "launch/*", "ognet/**/*.py", "tests/*.py", "benchmarks/**/*"):
        for file in REPO.glob(pattern):
            if file.is_file():
                named |= set(re.findall(r"configs/[\w./+-]+\.(?:yaml|json)", file.read_text()))
    assert "configs/market/ognet-circle.yaml" in named
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, f"named but absent: {missing}"


# ---------------------------------------------------------------------------------------------
# The check itself: it must fail where a config or a command is off

MARKET = "python train_M.py --batch-size 36 --lrRate 10e-4 --adam --use_dense --efficient --bg 1 --cluster xyzrgb --init 768 --droprate 0.7 --norm_layer bn2 --gem --amsgrad --train_all --flip --scale --warm_epoch 10 --num-epoch 1500 --balance --circle --gamma 64 --wa"


def test_commands_the_original_refuses_or_ognet_cannot_represent_fail():
    with pytest.raises(CommandError, match="unrecognized arguments: --sam"):
        parse_command(MARKET + " --sam")
    with pytest.raises(CommandError, match="unrecognized arguments: --lr 1e-3"):
        parse_command(MARKET + " --lr 1e-3")  # a prefix the parser does not declare
    with pytest.raises(CommandError, match="--class_sampler/--class: expected one argument"):
        parse_command(MARKET + " --class --wa_start 0.9")
    assert parse_command(MARKET + " --class --wa_start 0.9", [("--class", "--class 2")]).class_sampler == 2
    with pytest.raises(CommandError, match="no --class without a value"):
        parse_command(MARKET + " --class 3", [("--class", "--class 1")])
    with pytest.raises(CommandError, match="not a train_M.py command"):
        parse_command("python test_M.py --name x")
    sgd = parse_command(MARKET.replace(" --adam", "") + " --cluster xyz --gpu_ids 0,1")
    assert [p.split(":")[0] for p in unrepresented(sgd)] == ["--adam False", "--cluster 'xyz'", "--gpu_ids '0,1'"]
    assert unrepresented(parse_command(MARKET)) == []


@pytest.mark.parametrize(
    "override,named",
    [
        ("optim.lr=2e-3", "optim.lr"),
        ("train.wa=false", "train.wa"),
        ("loss.gamma=32", "loss.gamma"),
        ("sampler.mode=pk", "sampler.mode"),
        ("loss.form=per_anchor", "loss.form"),  # a key the command leaves at the original's behaviour
        ("eval.flip=true", "eval.flip"),
        ("model.overrides={norm: bn}", "model norm"),
        ("model.overrides={k: 16}", "model k"),
        ("data.root=data/duke/shards", "data.root"),
    ],
)
def test_a_config_that_drifts_from_its_command_is_named(override, named):
    path = CONFIGS / "market" / "ognet-circle.yaml"
    problems = mismatches(load_config(path, [override]), parsed(path))
    assert [p for p in problems if p.startswith(named + " ")], problems


def test_gamma_defaults_to_the_originals():
    assert Config().loss.gamma == parse_command(MARKET.replace(" --gamma 64", "")).gamma == ReidLoss().gamma == 32
    assert set(DATASETS.values()) == set(CURRENT) == set(SEED)


@pytest.mark.parametrize(
    "text,message",
    [
        (None, "cannot read config (No such file or directory)"),
        ("- a\n- b\n", "config must be a mapping of keys, got list"),
        ("train: [", "config is not valid YAML"),
    ],
)
def test_unreadable_config_files_name_the_file(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        load_config(path)
