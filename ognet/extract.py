"""Features of new point clouds, without packing them as a split: the Python API
(`ognet.load_model`, `ognet.extract_features`) and the `ognet-extract` command.

A feature is what `ognet-eval` computes for the same cloud: the same test transform
(`eval_transforms`: centre, deterministic slim, colour shift) and the same test-time augmentation
and padding (`ognet.evaluate.embed`), so with the same `eval.batch_size` the numbers are equal.

    ognet-extract --checkpoint model_last.pt --clouds FOLDER_OR_LIST --out DIR [--gallery G/features.npy]

writes `DIR/features.npy` (N, 512) float32, `DIR/names.txt` (one cloud per line, the row order),
`DIR/extract.json` (checkpoint, model and test-time options) and `DIR/pytorch_result.mat` (the
original's keys `<set>_f`, `<set>_label`, `<set>_cam`; `--mat-set query|gallery`; `--mat FILE` merges
into an existing file, so that two runs make the file the original's evaluate_gpu.py reads). With
`--gallery`, `DIR/ranking.txt` lists each cloud's top-k gallery names and cosine similarities.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ognet import evaluate
from ognet.cli import run_command
from ognet.config import Config, eval_transforms
from ognet.data.layouts import detect_scheme, parse_name
from ognet.data.points import POINT_SUFFIXES, read_points, validate_points
from ognet.data.transforms import TransformConfig, transform
from ognet.errors import ConfigError, DataError
from ognet.io import atomic_write
from ognet.model import OGNet
from ognet.rank_lists import ranked_gallery

log = logging.getLogger("ognet")

Cloud = str | os.PathLike | tuple[np.ndarray, np.ndarray]  # a point file, or (xyz (N, 3), rgb (N, 3) in [0, 1])
MAT_SETS = ("query", "gallery")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(checkpoint: str | os.PathLike, device: torch.device | str | None = None) -> OGNet:
    """The model of an ognet checkpoint (model_last.pt, model_average.pt, step-*.pt, or an original
    imported with ognet-import-original), in eval mode, on `device` (default: CUDA when present)."""
    return evaluate.load_model(checkpoint, device or default_device()).eval()


def cloud_source(cloud: Cloud, i: int) -> str:
    return str(cloud) if isinstance(cloud, (str, os.PathLike)) else f"clouds[{i}]"


class CloudSet(Dataset):
    """Clouds read (files) or checked (arrays) and test-transformed, as `EvalSet` does for a split."""

    def __init__(self, clouds: Sequence[Cloud], config: TransformConfig, min_points: int):
        self.clouds, self.config, self.min_points = clouds, config, min_points

    def __len__(self) -> int:
        return len(self.clouds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | DataError:
        """The test-transformed cloud, or its DataError (returned, not raised: a DataLoader worker would
        bury the message in a traceback; the main process raises it)."""
        try:
            return self._load(self.clouds[i], cloud_source(self.clouds[i], i))
        except DataError as e:
            return e

    def _load(self, cloud: Cloud, source: str) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(cloud, (str, os.PathLike)):
            points = read_points(cloud)
        elif isinstance(cloud, (tuple, list)) and len(cloud) == 2:
            points = validate_points(*cloud, source)
        else:
            raise DataError(f"{source}: expected a point file path or an (xyz, rgb) pair, got {type(cloud).__name__}")
        xyz, rgb = transform(points.xyz, points.rgb, self.config, None)
        if len(xyz) < self.min_points:
            raise DataError(
                f"{source}: {len(points.xyz)} points leave {len(xyz)} after data.slim={self.config.slim}, "
                f"fewer than the model's k={self.min_points} neighbours"
            )
        return torch.from_numpy(xyz), torch.from_numpy(rgb)


def same_count_batches(
    items: Iterator[tuple[torch.Tensor, torch.Tensor] | DataError], size: int
) -> Iterator[list[tuple]]:
    """Consecutive clouds, at most `size` per batch; a cloud of another point count starts a new batch
    (in eval mode a feature does not depend on its batch)."""
    batch: list[tuple] = []
    for item in items:
        if isinstance(item, DataError):
            raise item
        if batch and (len(batch) == size or item[0].shape != batch[0][0].shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


@torch.no_grad()
def extract_features(
    model: nn.Module,
    clouds: Sequence[Cloud],
    config: Config | None = None,
    *,
    num_workers: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """(N, embedding_dim) float32 test features of `clouds` on the CPU, row i for clouds[i], computed
    on the model's device in batches of `eval.batch_size`, with `data.slim`, `eval.scales` and
    `eval.flip` of `config` (default: the defaults, as ognet-eval's). Files are read by
    `num_workers` DataLoader workers (default `data.num_workers`). Leaves the model in eval mode."""
    config = config or Config()
    # ognet-eval pads a short last batch to eval.batch_size (same bits on any world size); fewer clouds
    # than that need no more than their own count: one cloud would otherwise cost eval.batch_size forwards
    size = max(1, min(config.eval.batch_size, len(clouds)))
    config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, batch_size=size))
    model.eval()
    device = next(model.parameters()).device
    dataset = CloudSet(clouds, eval_transforms(config.data), model.config.k)
    workers = config.data.num_workers if num_workers is None else num_workers
    loader = DataLoader(dataset, batch_size=None, num_workers=min(workers, len(clouds)))
    features = []
    with tqdm(total=len(clouds), desc="features", unit="cloud", disable=not progress, leave=False) as bar:
        for batch in same_count_batches(iter(loader), config.eval.batch_size):
            xyz, rgb = (torch.stack(t).to(device) for t in zip(*batch))
            features.append(evaluate.embed(model, xyz, rgb, config).cpu())
            bar.update(len(batch))
    return torch.cat(features) if features else torch.zeros(0, model.config.embedding_dim)


# ------------------------------------------------------------------------------------------------
# ognet-extract


def list_clouds(source: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """(paths, names) of a folder's point files (recursively, in folder then file order, as a split
    is scanned; names relative to the folder) or of a list file (one path per line, relative ones
    from the list's folder; names as written)."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(
            (p for p in source.rglob("*") if p.is_file() and p.name.lower().endswith(POINT_SUFFIXES)),
            key=lambda p: p.relative_to(source).parts,
        )
        names = [p.relative_to(source).as_posix() for p in paths]
    elif source.is_file():
        names = [line.strip() for line in source.read_text().splitlines() if line.strip()]
        paths = [source.parent / name for name in names]
    else:
        raise DataError(f"{source}: neither a folder of point files nor a list file")
    if not paths:
        raise DataError(f"{source}: no point files ({'/'.join(POINT_SUFFIXES)})")
    return paths, names


def _labels(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(pids, camids) parsed from the file names as a split's are; -1 where the naming is not known."""
    try:
        scheme = detect_scheme(names)
        pairs = [parse_name(name, scheme) for name in names]
    except DataError as e:
        log.warning(f"{e}: pytorch_result.mat gets label and camera -1")
        pairs = [(-1, -1)] * len(names)
    pids, camids = (np.array(v, dtype=np.int64) for v in zip(*pairs))
    return pids, camids


def _write_mat(path: Path, features: np.ndarray, names: list[str], mat_set: str) -> None:
    """The original's `pytorch_result.mat` keys for one set, merged with what the file already holds."""
    try:
        import scipy.io  # the `extract` extra: only this file needs it
    except ImportError:
        log.warning(f"scipy is not installed: {path} not written (pip install 'ognet[extract]')")
        return
    held = {}
    if path.exists():
        held = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    pids, camids = _labels(names)
    held.update({f"{mat_set}_f": features, f"{mat_set}_label": pids, f"{mat_set}_cam": camids})
    held[f"{mat_set}_name"] = np.array(names, dtype=object)
    with atomic_write(path) as f:
        scipy.io.savemat(f, held)


def comparable(model: OGNet, config: Config) -> dict[str, Any]:
    """What makes two feature files comparable: the model (its classifier aside) and the test-time
    options. Exported models carry it (ognet.export)."""
    spec = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(model.config).items() if k != "num_classes"}
    test_time = {"slim": config.data.slim, "scales": list(config.eval.scales), "flip": config.eval.flip}
    return {"model": spec, "test_time": test_time}


def _features(checkpoint: str, paths: list[Path], config: Config) -> tuple[np.ndarray, dict[str, Any]]:
    """Features and extract.json info of an ognet checkpoint, or of a model exported by ognet-export (.onnx, .pt2:
    its own test-time options apply)."""
    if Path(checkpoint).suffix in (".onnx", ".pt2"):
        from ognet.export import ExportedModel, exported_features  # ognet.export imports this module

        exported = ExportedModel(checkpoint)
        log.info(f"{len(paths)} clouds, exported model {checkpoint} ({exported.meta['format']}, CPU)")
        info = {"checkpoint": str(Path(checkpoint).resolve()), **{k: exported.meta[k] for k in ("model", "test_time")}}
        return exported_features(exported, paths).numpy(), info
    model = load_model(checkpoint)
    log.info(f"{len(paths)} clouds, model {checkpoint} on {next(model.parameters()).device}")
    info = {"checkpoint": str(Path(checkpoint).resolve()), **comparable(model, config)}
    return extract_features(model, paths, config).numpy(), info


def load_gallery(path: Path, info: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """Features and names written by ognet-extract, checked against this run's model and options."""
    try:
        features = np.load(path, allow_pickle=False)
        names = (path.parent / "names.txt").read_text().splitlines()
        theirs = json.loads((path.parent / "extract.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(
            f"{path}: not a gallery written by ognet-extract (features.npy, names.txt, extract.json): {e}"
        ) from e
    if features.ndim != 2 or len(features) != len(names) or features.shape[1] != info["model"]["embedding_dim"]:
        raise DataError(
            f"{path}: features of shape {features.shape} with {len(names)} names, expected "
            f"(len(names), {info['model']['embedding_dim']})"
        )
    for key in ("model", "test_time"):
        if theirs.get(key) != info[key]:
            raise ConfigError(
                f"{path}: extracted with another {key} ({theirs.get(key)}) than this run ({info[key]}); "
                f"features of different models or test-time options do not compare"
            )
    return features, names


def write_ranking(path: Path, features: np.ndarray, names: list[str], gallery: Path, info: dict, top: int) -> None:
    """Each cloud's `top` gallery items by cosine similarity (the features are unit vectors)."""
    gf, g_names = load_gallery(gallery, info)
    none = np.zeros(len(gf), dtype=bool)
    with atomic_write(path, "w") as f:
        for name, scores in zip(names, features.astype(np.float64) @ gf.astype(np.float64).T):
            items = ranked_gallery(scores, none, none, top)
            f.write(name + "\t" + "\t".join(f"{g_names[it.index]} {it.score:.6f}" for it in items) + "\n")


def extract_command(config: Config, args: argparse.Namespace) -> None:
    paths, names = list_clouds(args.clouds)
    if args.gallery and args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    features, info = _features(args.checkpoint, paths, config)
    out = Path(args.out)
    with atomic_write(out / "features.npy") as f:
        np.save(f, features)
    with atomic_write(out / "names.txt", "w") as f:
        f.write("".join(name + "\n" for name in names))
    with atomic_write(out / "extract.json", "w") as f:
        json.dump({**info, "clouds": str(args.clouds), "count": len(names)}, f, indent=1)
    _write_mat(Path(args.mat) if args.mat else out / "pytorch_result.mat", features, names, args.mat_set)
    if args.gallery:
        write_ranking(out / "ranking.txt", features, names, Path(args.gallery), info, args.top)
    log.info(f"{features.shape} features written to {out}")


def main(argv: list[str] | None = None) -> None:
    """`ognet-extract --checkpoint FILE --clouds FOLDER|LIST --out DIR [--gallery FEATURES.npy] [key=value ...]`."""

    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--checkpoint", required=True, help="ognet checkpoint (model_last.pt, or imported), or .onnx/.pt2"
        )
        parser.add_argument("--clouds", required=True, help="a folder of point files, or a file listing one per line")
        parser.add_argument("--out", required=True, help="folder for features.npy, names.txt, pytorch_result.mat")
        parser.add_argument("--mat-set", choices=MAT_SETS, default="query", help="key prefix in pytorch_result.mat")
        parser.add_argument(
            "--mat", help="the .mat file (default OUT/pytorch_result.mat); an existing one keeps its keys"
        )
        parser.add_argument("--gallery", help="features.npy of an earlier ognet-extract: rank against it")
        parser.add_argument("--top", type=int, default=10, help="gallery items per cloud in ranking.txt")

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_command("ognet-extract", "Features of point clouds for re-identification.", extract_command, argv, arguments)


if __name__ == "__main__":
    main()
