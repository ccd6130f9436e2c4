"""The original's command line (`train_M.py`, layumi/person-reid-3d @ 5a0bda9) and what a command
of its README implies for an ognet config. Used by tests/test_configs.py.

The parser declares the flags the README commands use, with the original's defaults; any other
flag is an error, so a command cannot carry an option this module does not map. The original's
argparse also accepts unambiguous prefixes (`allow_abbrev`); the four the commands use are
declared as aliases and no other prefix is accepted.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ognet.config import Config, flatten
from ognet.model.network import VARIANTS, OGNetConfig, model_config


class CommandError(ValueError):
    """A command the original's train_M.py would refuse, or one ognet cannot represent."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print and exit
        raise CommandError(message)


def original_parser() -> argparse.ArgumentParser:
    """train_M.py's flags used by the README commands, with train_M.py's defaults."""
    p = _Parser(prog="train_M.py", allow_abbrev=False, add_help=False)
    switches = ("--flip", "--scale", "--use_dense", "--efficient", "--adam", "--train_all", "--gem", "--wa")
    for flag in (*switches, "--amsgrad", "--balance", "--circle"):
        p.add_argument(flag, action="store_true")
    p.add_argument("--name", type=str, default="basic")  # the output folder: ours is run_dir, free
    p.add_argument("--gpu_ids", type=str, default="0")
    p.add_argument("--dataset-path", "--dataset", type=str, default="./2DMarket/")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-epochs", "--num-epoch", type=int, default=150)
    p.add_argument("--lrRate", type=float, default=0.01)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--warm_epoch", type=int, default=-1)
    p.add_argument("--class_sampler", "--class", type=int, default=0)
    p.add_argument("--gamma", type=float, default=32)
    p.add_argument("--wa_start", type=float, default=0.9)
    p.add_argument("--slim", type=float, default=0.5)
    p.add_argument("--erase", type=float, default=0)
    p.add_argument("--bg", type=int, default=0)
    p.add_argument("--feature_dims", type=str, default="64,128,256,512")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--num_conv", type=int, default=1)
    p.add_argument("--id_skip", type=int, default=0)
    p.add_argument("--init_points", "--init", type=int, default=512)
    p.add_argument("--droprate", type=float, default=0.5)
    p.add_argument("--norm_layer", type=str, default="bn")
    p.add_argument("--cluster", type=str, default="xyz")
    return p


# ---------------------------------------------------------------------------------------------
# Config headers: `# original:` (the command), `# reading:` (what a valueless flag means),
# `# reported:` (the README's Rank@1 and mAP for the command)

ORIGINAL = re.compile(r"^# original: (python train_M\.py .+)$")
READING = re.compile(r"^# reading: `(--[\w-]+)` = `([^`]+)`: (.+)$")
REPORTED = re.compile(r"^# reported: Rank@1 (\d+\.\d+) \(mAP (\d+\.\d+)\)")


@dataclass
class Header:
    commands: list[str]
    readings: list[tuple[str, str]]  # (flag as written, replacement)
    reported: tuple[str, str] | None  # (Rank@1, mAP) in %, as printed


def read_header(path: Path) -> Header:
    """The leading comment block of a config file."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.rstrip())
    commands = [m.group(1) for m in map(ORIGINAL.match, lines) if m]
    readings = [(m.group(1), m.group(2)) for m in map(READING.match, lines) if m]
    reported = [(m.group(1), m.group(2)) for m in map(REPORTED.match, lines) if m]
    if len(reported) > 1:
        raise CommandError(f"{path}: more than one '# reported:' line")
    return Header(commands, readings, reported[0] if reported else None)


def parse_command(command: str, readings: list[tuple[str, str]] = ()) -> argparse.Namespace:
    """Parse `python train_M.py ...` as the original does, after applying the readings.

    A reading replaces a flag written without its value (an argparse error as printed) by the
    flag and a value; a reading that finds no such flag is an error, so none goes stale.
    """
    tokens = shlex.split(command)
    if tokens[:2] != ["python", "train_M.py"]:
        raise CommandError(f"not a train_M.py command: {command[:40]!r}")
    args = tokens[2:]
    for flag, replacement in readings:
        spots = [i for i, t in enumerate(args) if t == flag and (i + 1 == len(args) or args[i + 1].startswith("--"))]
        if not spots:
            raise CommandError(f"reading for {flag}: the command has no {flag} without a value")
        for i in reversed(spots):
            args[i : i + 1] = shlex.split(replacement)
    return original_parser().parse_args(args)


# ---------------------------------------------------------------------------------------------
# What a parsed command implies for an ognet config

DATASETS = {"2DMarket": "market", "2DDuke": "duke", "2DCUHK": "cuhk", "2DMSMT": "msmt"}


def dataset(opts: argparse.Namespace) -> str:
    """ognet's name for the command's data set (`--dataset-path`, default ./2DMarket/)."""
    name = Path(opts.dataset_path).name
    if name not in DATASETS:
        raise CommandError(f"--dataset-path {opts.dataset_path}: not one of {', '.join(DATASETS)}")
    return DATASETS[name]


def unrepresented(opts: argparse.Namespace) -> list[str]:
    """Flags whose value ognet does not implement: ognet has one value for each of these."""
    fixed = {
        "adam": (opts.adam, "ognet trains with Adam only (train_M.py uses SGD without --adam)"),
        "use_dense": (opts.use_dense, "ognet's model is ModelE_dense (--use_dense --efficient)"),
        "efficient": (opts.efficient, "ognet's model is ModelE_dense (--use_dense --efficient)"),
        "cluster": (opts.cluster == "xyzrgb", "ognet implements --cluster xyzrgb only"),
        "bg": (opts.bg == 1, "configs train on shards packed from 3D<Name>+bg, which is --bg 1"),
        "gpu_ids": (
            len(opts.gpu_ids.split(",")) == 1,
            "one GPU: BatchNorm sees the whole batch (ognet: one rank, or train.sync_bn)",
        ),
    }
    return [f"--{flag} {getattr(opts, flag)!r}: {why}" for flag, (ok, why) in fixed.items() if not ok]


def implied_model(opts: argparse.Namespace) -> OGNetConfig:
    """The model the command builds; options it does not set keep the original's fixed values
    (embedding 512, stride 2, radii, SE, ...), which are OGNetConfig's defaults."""
    return OGNetConfig(
        num_classes=1,
        feature_dims=tuple(int(d) for d in opts.feature_dims.split(",")),
        k=opts.k,
        num_conv=opts.num_conv,
        id_skip=opts.id_skip,
        init_points=opts.init_points,
        gem=opts.gem,
        norm=opts.norm_layer,
        dropout=opts.droprate,
    )


def variant_name(model: OGNetConfig) -> str:
    """The ognet variant whose widths the model has (file names and model.variant use it)."""
    names = [n for n in VARIANTS if model_config(n, 1).feature_dims == model.feature_dims]
    if len(names) != 1:
        raise CommandError(f"--feature_dims {model.feature_dims}: no ognet variant has these widths")
    return names[0]


def implied_values(opts: argparse.Namespace) -> dict[str, Any]:
    """Dotted ognet config keys and the values the command gives them (the model aside)."""
    if opts.class_sampler > 0:  # train_M.py ignores --balance when --class_sampler is set
        sampler = {"sampler.mode": "class_sampler", "sampler.k": opts.class_sampler}
    else:
        sampler = {"sampler.mode": "balance" if opts.balance else "shuffle"}
    return {
        "data.root": f"data/{dataset(opts)}/shards",
        "data.train_split": "train_all" if opts.train_all else "train",
        "data.slim": opts.slim,
        "data.flip": opts.flip,
        "data.scale": opts.scale,
        "data.erase": opts.erase,
        "model.variant": variant_name(implied_model(opts)),
        **sampler,
        "loss.circle": opts.circle,
        "loss.gamma": opts.gamma,
        "optim.lr": opts.lrRate,
        "optim.weight_decay": opts.wd,
        "optim.amsgrad": opts.amsgrad,
        "optim.loss_warmup_epochs": opts.warm_epoch,
        "train.epochs": opts.num_epochs,
        "train.global_batch_size": opts.batch_size,
        "train.wa": opts.wa,
        "train.wa_start": opts.wa_start,
    }


def config_stem(opts: argparse.Namespace) -> str:
    """The file name a config of this command has: variant, then `-circle` with --circle."""
    return variant_name(implied_model(opts)) + ("-circle" if opts.circle else "")


# How and where a run happens, not what it trains: no command flag speaks of these.
FREE_KEYS = {
    "run_dir",
    "data.query_split",
    "data.gallery_split",
    "data.cache_dir",
    "data.num_workers",
    "data.bad_samples",
    "train.seed",
    "train.backend",
    "train.deepspeed_config",
    "train.sync_bn",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.log_every_steps",
    "train.eval_every_epochs",
    "train.nonfinite",
    "train.collective_timeout_s",
    "eval.batch_size",
    "eval.save_features",
    "eval.rank_list_queries",
    "eval.rank_list_select",
}


def mismatches(config: Config, opts: argparse.Namespace) -> list[str]:
    """Where `config` differs from the command: a key the command sets and the config does not
    match, or a key it leaves at the original's behaviour (ognet's default) that the config
    changes. Empty when the config reproduces the command."""
    want = implied_values(opts)
    defaults = flatten(Config().to_dict())
    problems = list(unrepresented(opts))
    for key, value in flatten(config.to_dict()).items():
        if key in FREE_KEYS or key == "model.overrides":
            continue
        expected = want.get(key, defaults.get(key))
        if not _same(value, expected):
            problems.append(f"{key} = {value!r}, the command gives {expected!r}")
    model = model_config(config.model.variant, 1, **config.model.overrides)
    expected_model = implied_model(opts)
    for field in expected_model.__dataclass_fields__:
        if getattr(model, field) != getattr(expected_model, field):
            problems.append(
                f"model {field} = {getattr(model, field)!r}, the command gives {getattr(expected_model, field)!r}"
            )
    return problems


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
    return a == b
