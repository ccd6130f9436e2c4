"""Sharded evaluation: every rank embeds a contiguous slice of query and gallery, the features are
merged in data set order, every rank ranks a slice of the queries against the whole gallery, and
the per-query results are reduced. The numbers do not depend on the world size.

    torchrun --nproc_per_node=N launch/evaluate.py --config <config> --checkpoint <file> [key=value ...]

Test-time augmentation is the original's: feature = f(xyz) + f(1.1 xyz) (`eval.scales`), then
L2-normalised; the feature is the 512-d BN-neck output. `eval.flip` also adds the x-flipped cloud.

With `data.bad_samples=skip` an unreadable query or gallery sample is left out of the ranking, as
if absent from its split; which samples are left out is merged by sample index like the features,
so the numbers still do not depend on the world size.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ognet import dist
from ognet.checkpoint import load_checkpoint, load_model_state
from ognet.cli import run_command
from ognet.config import Config, eval_transforms
from ognet.data.dataset import EvalSet, collate_eval, ignore_preemption_signal
from ognet.data.loading import open_split, stream_eval_loader
from ognet.data.shards import ShardReader
from ognet.errors import ShardError
from ognet.io import atomic_write
from ognet.metrics import PerQueryResult, format_result_line, rank_queries, reduce_results
from ognet.model import OGNet, build_from_spec, select_point_ops, set_point_ops
from ognet.monitor import Monitor
from ognet.rank_lists import write_rank_lists
from ognet.session import session

METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")  # scalars `<tag>/<name>` of every evaluation


def metric_tags(tag: str) -> list[str]:
    """The TensorBoard tags of an evaluation's metrics (scalars, and the HParams tab's metrics)."""
    return [f"{tag}/{name}" for name in METRICS]


def rank_slice(n: int, info: dist.DistInfo) -> np.ndarray:
    """This rank's contiguous slice of n items (sizes differ by at most one)."""
    return np.array_split(np.arange(n), info.world_size)[info.rank]


def test_views(xyz: torch.Tensor, scales: tuple[float, ...], flip: bool) -> list[torch.Tensor]:
    """The test-time views of a batch: xyz at each of `scales`, and with `flip` their x-mirrors."""
    views = [xyz * s for s in scales]
    if flip:
        views += [v * torch.tensor([-1.0, 1.0, 1.0], device=xyz.device) for v in views]
    return views


def pad_batch(xyz: torch.Tensor, rgb: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch padded to `size` clouds with copies of its last cloud."""
    pad = size - len(xyz)
    if pad <= 0:
        return xyz, rgb
    return tuple(torch.cat([t, t[-1:].expand(pad, *t.shape[1:])]) for t in (xyz, rgb))


@torch.no_grad()
def embed(model: nn.Module, xyz: torch.Tensor, rgb: torch.Tensor, config: Config) -> torch.Tensor:
    """L2-normalised test features of a batch: the sum of the features of the test-time views
    (`eval.scales`, and their x-mirror with `eval.flip`), as the original.

    A batch shorter than `eval.batch_size` is padded with copies of its last cloud: BLAS picks its
    kernels by batch size, so a sample's feature would otherwise differ in the last bits between
    world sizes. Every forward has the same shape on any rank."""
    n = len(xyz)
    xyz, rgb = pad_batch(xyz, rgb, config.eval.batch_size)
    f = sum(model(v, rgb).feature.float() for v in test_views(xyz, config.eval.scales, config.eval.flip))[:n]
    return f / (f.norm(dim=1, keepdim=True) + 1e-6)


def _eval_loader(reader: ShardReader, config: Config, info: dist.DistInfo) -> DataLoader:
    """This rank's contiguous slice of a split (data.access=stream: its shards), test-transformed,
    with sample indices."""
    if config.data.access == "stream":
        return stream_eval_loader(reader, config, info)
    dataset = EvalSet(reader, eval_transforms(config.data), config.data.bad_samples)
    return DataLoader(
        Subset(dataset, rank_slice(len(reader), info).tolist()),
        batch_size=config.eval.batch_size,
        num_workers=config.data.num_workers,
        pin_memory=info.device.type == "cuda",
        worker_init_fn=ignore_preemption_signal,
        collate_fn=collate_eval,
    )


@torch.no_grad()
def extract_features(
    model: nn.Module, reader: ShardReader, config: Config, info: dist.DistInfo, desc: str
) -> tuple[torch.Tensor, np.ndarray]:
    """Test features of every sample of `reader` in sample order, on every rank, and which samples
    were unreadable and left out (data.bad_samples=skip; their feature rows are 0). Every rank
    embeds its slice; features travel with their sample indices and are put back in order."""
    model.eval()
    device = info.device
    features, order, bad = [], [], []
    batches = tqdm(_eval_loader(reader, config, info), desc=desc, disable=not info.is_main, unit="batch", leave=False)
    for xyz, rgb, index, unreadable in batches:
        bad.append(unreadable.to(device))
        if xyz is not None:
            features.append(embed(model, xyz.to(device), rgb.to(device), config))
            order.append(index.to(device))
    local = torch.cat(features) if features else torch.zeros(0, model.config.embedding_dim, device=device)
    local_order = torch.cat(order) if order else torch.zeros(0, dtype=torch.long, device=device)
    merged = torch.zeros(len(reader), local.shape[1], device=device)
    merged[dist.all_gather_uneven(local_order)] = dist.all_gather_uneven(local)
    left_out = np.zeros(len(reader), dtype=bool)
    local_bad = torch.cat(bad) if bad else torch.zeros(0, dtype=torch.long, device=device)
    left_out[dist.all_gather_uneven(local_bad).cpu().numpy()] = True
    return merged, left_out


@dataclass
class Evaluation:
    """Everything an evaluation computed, the same on every rank."""

    metrics: dict[str, Any]
    query: ShardReader
    gallery: ShardReader
    query_features: torch.Tensor
    gallery_features: torch.Tensor
    query_left_out: np.ndarray  # unreadable samples left out (data.bad_samples=skip)
    gallery_left_out: np.ndarray
    per_query: PerQueryResult | None = None  # of the readable queries, in query order


def _rank_my_queries(e: Evaluation, config: Config, info: dist.DistInfo) -> PerQueryResult:
    """Rank this rank's slice of the readable queries against the readable gallery, then gather the
    per-query results of every rank in query order."""
    qi, gi = e.query.index, e.gallery.index
    queries, kept = np.flatnonzero(~e.query_left_out), np.flatnonzero(~e.gallery_left_out)
    gf = e.gallery_features[kept] if e.gallery_left_out.any() else e.gallery_features  # no copy if none left out
    mine = queries[rank_slice(len(queries), info)]
    if len(mine):
        part = rank_queries(
            e.query_features[mine],
            qi.pids[mine],
            qi.camids[mine],
            gf,
            gi.pids[kept],
            gi.camids[kept],
            ap=config.eval.ap,
        )
    else:  # more ranks than queries: nothing to rank here (rank_queries refuses an empty set), still gather
        empty = torch.zeros(0, dtype=torch.float64)
        part = PerQueryResult(empty, empty, torch.zeros(0, dtype=torch.long))
    return PerQueryResult(
        *(dist.all_gather_uneven(t.to(info.device)).cpu() for t in (part.ap, part.inp, part.first_good))
    )


def compute_metrics(model: nn.Module, config: Config, info: dist.DistInfo) -> Evaluation:
    """Extract, merge, rank and reduce, on every rank; writes nothing."""
    was_training = model.training
    query, gallery = (
        open_split(config.data, config.data.query_split),
        open_split(config.data, config.data.gallery_split),
    )
    qf, q_out = extract_features(model, query, config, info, "query")
    gf, g_out = extract_features(model, gallery, config, info, "gallery")
    model.train(was_training)
    for reader, out in ((query, q_out), (gallery, g_out)):
        if out.all():
            raise ShardError(
                f"{reader.location}: no sample is readable (data.bad_samples=skip leaves out all {len(out)})"
            )
    e = Evaluation({}, query, gallery, qf, gf, q_out, g_out)
    e.per_query = _rank_my_queries(e, config, info)
    e.metrics = reduce_results([e.per_query])
    if config.data.bad_samples == "skip":
        e.metrics["num_bad_samples"] = int(q_out.sum() + g_out.sum())
    return e


def write_results(e: Evaluation, config: Config, monitor: Monitor, out: Path, step: int, tag: str) -> None:
    """The main rank's outputs: log line, metrics JSON, the original's result line, TensorBoard
    scalars, features (eval.save_features) and rank-list pictures."""
    m, skip = e.metrics, config.data.bad_samples == "skip"
    line = format_result_line(m)
    kept = len(e.gallery_left_out) - int(e.gallery_left_out.sum())
    note = f"; {e.query_left_out.sum()} query and {e.gallery_left_out.sum()} gallery samples unreadable, left out"
    monitor.log(f"{tag}: {line} mINP:{m['mINP']:f} ({m['num_queries']} queries, {kept} gallery{note if skip else ''})")
    with atomic_write(out / f"metrics-{tag}.json", "w") as f:
        json.dump({"step": step, **m}, f, indent=1)
    with open(out / "result.txt", "a") as f:
        f.write(f"{tag} step {step}: {line}\n")
    names = METRICS + (("num_bad_samples",) if skip else ())
    monitor.scalars({f"{tag}/{name.replace('num_', '')}": m[name] for name in names}, step)
    if config.eval.save_features:
        qf, gf = e.query_features.cpu().numpy(), e.gallery_features.cpu().numpy()
        save_features(out, tag, qf, gf, e.query.index, e.gallery.index, monitor)
    write_rank_lists(e, config.eval.rank_list_queries, config.eval.rank_list_select, monitor, out, step, tag)
    monitor.flush()


def evaluate_model(
    model: nn.Module,
    config: Config,
    info: dist.DistInfo,
    monitor: Monitor,
    step: int = 0,
    tag: str = "eval",
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Compute the metrics on every rank; the main rank writes them (see write_results)."""
    e = compute_metrics(model, config, info)
    if info.is_main:
        write_results(e, config, monitor, Path(out_dir or config.run_dir), step, tag)
    return e.metrics


def save_features(out: Path, tag: str, qf: np.ndarray, gf: np.ndarray, qi, gi, monitor: Monitor) -> None:
    """Features as .npy, and as the original's `pytorch_result.mat` (keys of its evaluate_gpu.py)
    when scipy is installed."""
    np.save(out / f"features-{tag}-query.npy", qf)
    np.save(out / f"features-{tag}-gallery.npy", gf)
    try:
        import scipy.io  # optional: only for the .mat file
    except ImportError:
        monitor.log("scipy is not installed: pytorch_result.mat not written (pip install scipy)")
        return
    scipy.io.savemat(
        out / f"pytorch_result-{tag}.mat",
        {
            "query_f": qf,
            "query_label": qi.pids,
            "query_cam": qi.camids,
            "gallery_f": gf,
            "gallery_label": gi.pids,
            "gallery_cam": gi.camids,
        },
    )


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> OGNet:
    """The model a checkpoint holds (ours, or an imported original), its weights loaded strictly."""
    return _model_from(load_checkpoint(checkpoint, map_location=device), str(checkpoint)).to(device)


def _model_from(payload: dict[str, Any], source: str) -> OGNet:
    model = build_from_spec(payload["model_config"])
    load_model_state(model, payload["model"], source)
    return model


def evaluate_checkpoint(config: Config, checkpoint: str | Path) -> dict[str, Any]:
    """The `ognet-eval` command: one checkpoint (ours, or an imported original) on query/gallery,
    logged at the training step the checkpoint was written at (0 if it does not say)."""
    out_dir = Path(config.run_dir)
    with session(out_dir, "eval.log", config.train.collective_timeout_s) as (info, monitor):
        set_point_ops(select_point_ops(config.model.point_ops, info.device))
        payload = load_checkpoint(checkpoint, map_location=info.device)
        model = _model_from(payload, str(checkpoint)).to(info.device)
        step = int(payload.get("step", 0))
        monitor.log(f"evaluating {checkpoint} (training step {step})")
        monitor.text("eval/checkpoint", f"{Path(checkpoint).resolve()} (training step {step})", step)
        monitor.hparams(config.to_dict(), metric_tags("eval"))
        return evaluate_model(model, config, info, monitor, step=step, tag="eval", out_dir=out_dir)


def main(argv: list[str] | None = None) -> None:
    """`ognet-eval --config FILE --checkpoint FILE [key=value ...]`."""

    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--checkpoint", required=True, help="ognet checkpoint (model_last.pt, step-*.pt, or imported)"
        )

    run_command(
        "ognet-eval",
        "Evaluate an OG-Net checkpoint (sharded over ranks).",
        lambda config, args: evaluate_checkpoint(config, args.checkpoint),
        argv,
        arguments,
    )


if __name__ == "__main__":
    main()
