"""Typed configuration: YAML files plus dotted command-line overrides, validated before any work.

    cfg = load_config("configs/market/ognet-circle.yaml", ["train.epochs=5", "data.root=/data/market"])

Every key is a field of the dataclasses below; an unknown key, a value of the wrong type or an
impossible value is a `ConfigError` naming the dotted key. A field typed `Literal[...]` takes one
of the listed values; the alias comes from the module that owns the option, so the allowed values
are written once. A config file may name a `base:` file (relative to itself) whose values it
overrides. The resolved config is saved with every run.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ognet.data.dataset import BadSamples
from ognet.data.fetch import Access, RemoteCache
from ognet.data.sampler import SamplerMode, StratifiedSampler
from ognet.data.transforms import TransformConfig
from ognet.dist import SyncBN
from ognet.errors import ConfigError
from ognet.io import atomic_write, read_yaml_mapping
from ognet.losses import GAMMA, CircleForm
from ognet.metrics import APMode
from ognet.model.network import EdgeConvPath, Variant
from ognet.model.ops import PointOpsName
from ognet.rank_lists import RankListSelect

Backend = Literal["ddp", "deepspeed"]
Precision = Literal["fp32", "bf16", "fp16"]  # fp16: CUDA only, with a grad scaler
NonFinite = Literal["stop", "skip"]
CircleFeature = Literal["dropout", "bn"]


@dataclass
class DataConfig:
    root: str = "data/shards"  # folder, fsspec URL (s3://, https://, ...) or pipe: template with the splits
    train_split: str = "train_all"  # split trained on (the original trains on train_all)
    query_split: str = "query"  # split of the evaluation's queries
    gallery_split: str = "gallery"  # split of the evaluation's gallery
    access: Access = "indexed"  # indexed: the exact sampler, samples read by offset | stream: shards streamed
    cache_dir: str | None = None  # node-local cache of remote shards (default $TMPDIR/ognet-<uid>/shards)
    remote_cache: RemoteCache = "range"  # range: byte ranges via a block cache | shard: whole shards (pipe: always)
    cache_bytes: int = 4 * 2**30  # bound on the block cache's size (0: no cache, exact byte ranges)
    block_bytes: int = 2**20  # block size of the block cache
    remote_timeout_s: float = 60.0  # limit of one request (or one read of a pipe: command), then retried
    remote_retries: int = 3  # retries of a remote read that failed for a reason that may pass
    remote_backoff_s: float = 1.0  # first wait before a retry, doubled each time
    storage_options: dict = field(default_factory=dict)  # fsspec options (credentials, endpoint_url, ...)
    stream_buffer: int = 1000  # stream mode: samples each DataLoader worker holds to draw balanced batches
    num_workers: int = 2  # DataLoader workers per rank
    slim: float = 0.5  # share of the points kept per cloud (the original's --slim)
    flip: bool = True  # training: mirror x with probability 0.5
    scale: bool = True  # training: per-axis scale in [0.75, 1.33] and clipped point jitter
    rotate: bool = False  # training: random rotation about the vertical axis
    erase: float = 0.0  # training: grey out a block of up to this share of the points
    # what an unreadable (corrupt, truncated, missing) sample does. skip: training replaces it by a
    # readable sample of the same identity, evaluation leaves it out; both count it
    bad_samples: BadSamples = "error"


@dataclass
class ModelConfig:
    variant: Variant = "ognet"  # OG-Net, OG-Net-Small or OG-Net-Deep
    overrides: dict = field(default_factory=dict)  # constructor options, e.g. {k: 9}
    # FPS and ball query: reference (pure PyTorch, any device) | triton (one kernel launch per call,
    # CUDA; pip install triton) | auto (triton on CUDA when installed, else reference). Same indices.
    point_ops: PointOpsName = "auto"
    # EdgeConv's computation, same values up to rounding: fused (conv per point, BatchNorm and pooling
    # from per-point sums; fastest), gather (conv per point, then gathered), edge_tensor (the original's)
    edge_conv: EdgeConvPath = "fused"

    def options(self) -> dict:
        """The model constructor's keyword options: the overrides and edge_conv."""
        return {**self.overrides, "edge_conv": self.edge_conv}


@dataclass
class SamplerConfig:
    mode: SamplerMode = "balance"  # balance (--balance), class_sampler (--class_sampler), shuffle, pk (P x K)
    k: int = 4  # images per class per pass (class_sampler) or instances per identity (pk)
    camera_aware: bool = False  # pk: an identity's K instances from as many cameras as possible


@dataclass
class LossConfig:
    circle: bool = False  # add the circle loss over the all-gathered global batch (--circle)
    gamma: float = GAMMA  # the circle loss's scale (--gamma; its README commands pass 64 or 96)
    m: float = 0.25  # the circle loss's margin
    form: CircleForm = "global"  # global (the original's) | per_anchor
    feature: CircleFeature = "dropout"  # dropout: the original's post-dropout feature | bn: the clean BN feature


@dataclass
class OptimConfig:
    lr: float = 1e-3  # Adam's learning rate for the global batch (--lrRate)
    weight_decay: float = 5e-4  # coupled L2 on every parameter, as the original
    amsgrad: bool = True  # Adam's AMSGrad variant (--amsgrad)
    betas: tuple = (0.9, 0.999)  # Adam's betas
    eps: float = 1e-8  # Adam's epsilon
    min_lr_ratio: float = 0.01  # cosine annealing per epoch down to min_lr_ratio * lr
    loss_warmup_epochs: int = 10  # the original's loss warm-up (scales the loss from 0.1 to 1)
    lr_warmup_epochs: int = 0  # option: linear LR warm-up (not in the original)


@dataclass
class TrainConfig:
    epochs: int = 1500  # epochs to train (--num-epoch)
    global_batch_size: int = 36  # the same whatever the world size
    seed: int = 0  # fixes initialisation, data order, augmentation and dropout on every rank
    # fine-tuning: start from this checkpoint's weights (ours, or ognet-import-original's) with a fresh
    # schedule; the classifier is re-initialised when the class count differs; a resume wins over it
    init_from: str | None = None
    backend: Backend = "ddp"  # ddp (also a single process) or deepspeed (ZeRO 1/2)
    deepspeed_config: str = "configs/deepspeed/zero2.json"  # DeepSpeed's JSON (ZeRO stage and options)
    precision: Precision = "fp32"  # fp32, bf16 (autocast), fp16 (CUDA, grad scaler)
    # BatchNorm's training statistics over the global batch (ognet.dist.SyncBatchNorm, gloo and nccl):
    # auto = when the world size is above 1, as the original's single GPU saw the whole batch
    sync_bn: SyncBN = "auto"
    wa: bool = False  # weight averaging from wa_start * epochs, BN re-estimated at the end
    wa_start: float = 0.9  # share of the epochs after which weight averaging starts (--wa_start)
    max_steps_per_epoch: int = 0  # > 0 cuts epochs short (demos, tests)
    checkpoint_every_steps: int = 0  # > 0: also checkpoint inside epochs
    keep_checkpoints: int = 2  # newest training checkpoints kept in <run_dir>/checkpoints
    log_every_steps: int = 10  # log line and TensorBoard values every this many steps
    eval_every_epochs: int = 0  # 0: evaluate only at the end
    nonfinite: NonFinite = "stop"  # what a non-finite loss or gradient does
    collective_timeout_s: float = 600.0  # a collective waiting longer fails, naming itself


@dataclass
class EvalConfig:
    batch_size: int = 48  # clouds per forward pass when extracting features
    scales: tuple = (1.0, 1.1)  # the original's test-time augmentation: f(xyz) + f(1.1 xyz)
    flip: bool = False  # option: also add the features of the x-flipped cloud
    ap: APMode = "trapezoid"  # trapezoid (Market devkit, the original) | noninterp (torchreid, fast-reid)
    save_features: bool = False  # also write the features (.npy, and the original's .mat)
    rank_list_queries: int = 4  # rank-list pictures written to TensorBoard (0: none)
    rank_list_select: RankListSelect = "first"  # first: the first queries | worst_ap: those of lowest AP


@dataclass
class Config:
    run_dir: str = "runs/default"  # where config, checkpoints, models, metrics, logs and TensorBoard go
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
    "data.block_bytes",
    "data.remote_timeout_s",
    "data.stream_buffer",
)
_NON_NEGATIVE = (
    "data.num_workers",
    "data.cache_bytes",
    "data.remote_retries",
    "data.remote_backoff_s",
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
    if "edge_conv" in config.model.overrides:
        raise ConfigError("model.overrides.edge_conv: set model.edge_conv instead")
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
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    allowed = typing.get_args(hint) if union else (hint,)
    choices = [c for t in allowed if typing.get_origin(t) is Literal for c in typing.get_args(t)]
    if any(value == c and type(value) is type(c) for c in choices):  # type too: True is not 1
        return value
    if value is None and type(None) in allowed:
        return None
    allowed = tuple(t for t in allowed if typing.get_origin(t) is not Literal)
    if choices and not allowed:
        raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(str, choices))}")
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
    names = " or ".join([*(repr(c) for c in choices), *(getattr(t, "__name__", str(t)) for t in allowed)])
    raise ConfigError(f"config key {key} must be {names}, got {value!r} ({type(value).__name__})")


def describe_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, meaning) of every config key. The meaning is the field's comment in
    this file (the comment lines just above it and the one after it), so it is written once."""
    comments = _field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe_keys(hint, f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((f"{prefix}{f.name}", plain(default), comments.get(f.name, "")))
    return rows


def _field_comments(cls: type) -> dict[str, str]:
    lines, first = inspect.getsourcelines(cls)
    by_line = {}
    for token in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if token.type == tokenize.COMMENT:
            by_line[token.start[0]] = token.string.lstrip("# ").strip()
    found = {}
    for node in ast.parse("".join(lines)).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, line = [], node.lineno - 1
            while line in by_line and not lines[line - 1].split("#")[0].strip():
                above.insert(0, by_line[line])
                line -= 1
            found[node.target.id] = " ".join(above + [by_line.get(node.end_lineno, "")]).strip()
    return found


def keys_help() -> str:
    """Every config key, its default and its meaning, for `--help`."""
    rows = describe_keys()
    width = max(len(f"{key}={default}") for key, default, _ in rows) + 2
    return "\n".join(f"  {f'{key}={default}':<{width}}{meaning}" for key, default, meaning in rows)


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
