"""Typed configuration: YAML files plus dotted command-line overrides, validated before any work.

    cfg = load_config("configs/market/ognet-circle.yaml", ["train.epochs=5", "data.root=/data/market"])

Every key is a field of the dataclasses below; an unknown key, a value of the wrong type or an
impossible value is a `ConfigError` naming the dotted key. A field typed `Literal[...]` takes one
of the listed values; the alias comes from the module that owns the option, so the allowed values
are written once. A config file may name a `base:` file (relative to itself) whose values it
overrides. The resolved config is saved with every run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ognet.data.dataset import BadSamples
from ognet.data.sampler import SamplerMode, StratifiedSampler
from ognet.data.transforms import TransformConfig
from ognet.errors import ConfigError
from ognet.io import atomic_write, read_yaml_mapping
from ognet.losses import GAMMA, CircleForm
from ognet.metrics import APMode
from ognet.model.network import Variant
from ognet.rank_lists import RankListSelect

Backend = Literal["ddp", "deepspeed"]
Precision = Literal["fp32", "bf16", "fp16"]  # fp16: CUDA only, with a grad scaler
NonFinite = Literal["stop", "skip"]
CircleFeature = Literal["dropout", "bn"]


@dataclass
class DataConfig:
    root: str = "data/shards"  # folder or URL prefix holding <split>/index.json
    train_split: str = "train_all"
    query_split: str = "query"
    gallery_split: str = "gallery"
    cache_dir: str | None = None  # local cache for remote shards (default ~/.cache/ognet/shards)
    num_workers: int = 2  # DataLoader workers per rank
    slim: float = 0.5
    flip: bool = True
    scale: bool = True
    rotate: bool = False
    erase: float = 0.0
    # what an unreadable (corrupt, truncated, missing) sample does. skip: training replaces it by a
    # readable sample of the same identity, evaluation leaves it out; both count it
    bad_samples: BadSamples = "error"


@dataclass
class ModelConfig:
    variant: Variant = "ognet"
    overrides: dict = field(default_factory=dict)  # constructor options, e.g. {k: 9}


@dataclass
class SamplerConfig:
    mode: SamplerMode = "balance"
    k: int = 4  # images per class per pass (class_sampler) or instances per identity (pk)
    camera_aware: bool = False  # pk only


@dataclass
class LossConfig:
    circle: bool = False
    gamma: float = GAMMA  # the original's default (--gamma); its README commands pass 64 or 96
    m: float = 0.25
    form: CircleForm = "global"  # global (the original's) | per_anchor
    feature: CircleFeature = "dropout"  # dropout: the original's post-dropout feature | bn: the clean BN feature


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 5e-4  # coupled L2 on every parameter, as the original
    amsgrad: bool = True
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    min_lr_ratio: float = 0.01  # cosine annealing per epoch down to min_lr_ratio * lr
    loss_warmup_epochs: int = 10  # the original's loss warm-up (scales the loss from 0.1 to 1)
    lr_warmup_epochs: int = 0  # option: linear LR warm-up (not in the original)


@dataclass
class TrainConfig:
    epochs: int = 1500
    global_batch_size: int = 36  # the same whatever the world size
    seed: int = 0
    backend: Backend = "ddp"
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    precision: Precision = "fp32"
    sync_bn: bool = False
    wa: bool = False  # weight averaging from wa_start * epochs, BN re-estimated at the end
    wa_start: float = 0.9
    max_steps_per_epoch: int = 0  # > 0 cuts epochs short (demos, tests)
    checkpoint_every_steps: int = 0  # > 0: also checkpoint inside epochs
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    eval_every_epochs: int = 0  # 0: evaluate only at the end
    nonfinite: NonFinite = "stop"  # what a non-finite loss or gradient does
    collective_timeout_s: float = 600.0


@dataclass
class EvalConfig:
    batch_size: int = 48
    scales: tuple = (1.0, 1.1)  # the original's test-time augmentation: f(xyz) + f(1.1 xyz)
    flip: bool = False  # option: also add the features of the x-flipped cloud
    ap: APMode = "trapezoid"  # trapezoid (Market devkit, the original) | noninterp (torchreid, fast-reid)
    save_features: bool = False
    rank_list_queries: int = 4  # rank-list pictures written to TensorBoard (0: none)
    rank_list_select: RankListSelect = "first"  # first: the first queries | worst_ap: those of lowest AP


@dataclass
class Config:
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return plain(dataclasses.asdict(self))


_POSITIVE = (
    "train.epochs",
    "train.global_batch_size",
    "sampler.k",
    "eval.batch_size",
    "optim.lr",
    "train.collective_timeout_s",
    "train.log_every_steps",
)
_NON_NEGATIVE = (
    "data.num_workers",
    "train.seed",
    "train.max_steps_per_epoch",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.eval_every_epochs",
    "optim.weight_decay",
    "optim.loss_warmup_epochs",
    "optim.lr_warmup_epochs",
    "eval.rank_list_queries",
)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or the defaults), apply `key=value` overrides, validate."""
    data = _read_yaml(Path(path)) if path else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=10)")
        _set_dotted(data, key.strip(), yaml.safe_load(value))
    config = _build(Config, data, "")
    validate(config)
    return config


def save_config(config: Config, path: str | Path) -> None:
    with atomic_write(path, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)


def validate(config: Config) -> None:
    """Value checks no single module owns; the owners' own checks run on the options they take."""
    flat = flatten(config.to_dict())
    for key in _POSITIVE:
        if not flat[key] > 0:
            raise ConfigError(f"{key} must be > 0, got {flat[key]}")
    for key in _NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"{key} must be >= 0, got {flat[key]}")
    if not 0 <= config.train.wa_start < 1:
        raise ConfigError(f"train.wa_start must be in [0, 1), got {config.train.wa_start}")
    if not config.eval.scales:
        raise ConfigError("eval.scales must list at least one scale")
    train_transforms(config.data)
    s = config.sampler
    StratifiedSampler.check_options(s.mode, s.k, s.camera_aware, config.train.global_batch_size)


def train_transforms(data: DataConfig) -> TransformConfig:
    """The training augmentation the data options describe (TransformConfig checks the values)."""
    return TransformConfig(slim=data.slim, flip=data.flip, scale=data.scale, rotate=data.rotate, erase=data.erase)


def eval_transforms(data: DataConfig) -> TransformConfig:
    """The deterministic test-time transform: only the slim ratio applies."""
    return TransformConfig(slim=data.slim)


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' files form a cycle")
    data = read_yaml_mapping(path, "config", ConfigError)
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml(path.parent / base, (*seen, path.resolve()))
    _merge(merged, data)
    return merged


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key != "overrides":
            _merge(into[key], value)
        else:
            into[key] = value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key {prefix}{key} (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # YAML 1.1 reads "4e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
        if t in (bool, str, dict) and isinstance(value, t):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"config key {key} must be {names}, got {value!r} ({type(value).__name__})")


def flatten(data: dict, prefix: str = "") -> dict:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3}; model overrides stay one value."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "overrides":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def plain(value: Any) -> Any:
    """Tuples -> lists, recursively, so values read back from YAML/JSON unchanged."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
