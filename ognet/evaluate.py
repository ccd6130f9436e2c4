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

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ognet import dist
from ognet.checkpoint import load_checkpoint, load_model_state
from ognet.config import Config
from ognet.data.dataset import EvalSet, collate_eval, ignore_preemption_signal
from ognet.data.shards import ShardReader, join_location
from ognet.data.transforms import TransformConfig
from ognet.errors import ShardError
from ognet.io import atomic_write
from ognet.metrics import PerQueryResult, format_result_line, rank_queries, reduce_results
from ognet.model import build_model
from ognet.monitor import Monitor, enable_stack_dumps, render_rank_list


def rank_slice(n: int, info: dist.DistInfo) -> np.ndarray:
    """This rank's contiguous slice of n items (sizes differ by at most one)."""
    return np.array_split(np.arange(n), info.world_size)[info.rank]


@torch.no_grad()
def extract_features(
    model: nn.Module, reader: ShardReader, config: Config, info: dist.DistInfo, desc: str
) -> tuple[torch.Tensor, np.ndarray]:
    """L2-normalised test features of every sample of `reader`, in sample order, on every rank, and
    which samples were unreadable and left out (data.bad_samples=skip; their feature rows are 0)."""
    transforms = TransformConfig(slim=config.data.slim)
    indices = rank_slice(len(reader), info)
    loader = DataLoader(
        Subset(EvalSet(reader, transforms, config.data.bad_samples), indices.tolist()),
        batch_size=config.eval.batch_size,
        num_workers=config.data.num_workers,
        pin_memory=info.device.type == "cuda",
        worker_init_fn=ignore_preemption_signal,
        collate_fn=collate_eval,
    )
    model.eval()
    features, order, bad = [], [], []
    for xyz, rgb, index, unreadable in tqdm(loader, desc=desc, disable=not info.is_main, unit="batch", leave=False):
        bad.append(unreadable.to(info.device))
        if xyz is None:
            continue
        xyz, rgb = xyz.to(info.device), rgb.to(info.device)
        # A short batch (the end of a slice) is padded to the full size with copies of its last
        # cloud: BLAS picks its kernels by batch size, so a sample's feature would otherwise differ
        # in the last bits between world sizes. Every forward has the same shape on any rank.
        n, pad = len(xyz), config.eval.batch_size - len(xyz)
        if pad:
            xyz, rgb = (torch.cat([t, t[-1:].expand(pad, *t.shape[1:])]) for t in (xyz, rgb))
        views = [xyz * s for s in config.eval.scales]
        if config.eval.flip:
            views += [v * torch.tensor([-1.0, 1.0, 1.0], device=info.device) for v in views]
        f = sum(model(v, rgb).feature.float() for v in views)[:n]
        features.append(f / (f.norm(dim=1, keepdim=True) + 1e-6))
        order.append(index.to(info.device))
    local = torch.cat(features) if features else torch.zeros(0, model.config.embedding_dim, device=info.device)
    local_order = torch.cat(order) if order else torch.zeros(0, dtype=torch.long, device=info.device)
    merged = torch.zeros(len(reader), local.shape[1], device=info.device)
    merged[dist.all_gather_uneven(local_order)] = dist.all_gather_uneven(local)
    left_out = np.zeros(len(reader), dtype=bool)
    local_bad = torch.cat(bad) if bad else torch.zeros(0, dtype=torch.long, device=info.device)
    left_out[dist.all_gather_uneven(local_bad).cpu().numpy()] = True
    return merged, left_out


def evaluate_model(
    model: nn.Module,
    config: Config,
    info: dist.DistInfo,
    monitor: Monitor,
    step: int = 0,
    tag: str = "eval",
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Extract, merge, rank and reduce; the main rank writes metrics (JSON, result line, TensorBoard)."""
    was_training = model.training
    query = ShardReader(join_location(config.data.root, config.data.query_split), config.data.cache_dir)
    gallery = ShardReader(join_location(config.data.root, config.data.gallery_split), config.data.cache_dir)
    qf, q_out = extract_features(model, query, config, info, "query")
    gf, g_out = extract_features(model, gallery, config, info, "gallery")
    qi, gi = query.index, gallery.index
    for reader, out in ((query, q_out), (gallery, g_out)):
        if out.all():
            raise ShardError(
                f"{reader.location}: no sample is readable (data.bad_samples=skip leaves out all {len(out)})"
            )

    queries, kept = np.flatnonzero(~q_out), np.flatnonzero(~g_out)
    kept_f = gf[kept] if g_out.any() else gf  # no copy of the gallery's features when none is left out
    mine = queries[rank_slice(len(queries), info)]
    if len(mine):
        part = rank_queries(
            qf[mine], qi.pids[mine], qi.camids[mine], kept_f, gi.pids[kept], gi.camids[kept], ap=config.eval.ap
        )
    else:  # more ranks than queries: nothing to rank here (rank_queries refuses an empty set), still gather
        part = PerQueryResult(
            torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
        )
    merged = PerQueryResult(
        *(dist.all_gather_uneven(t.to(info.device)).cpu() for t in (part.ap, part.inp, part.first_good))
    )
    metrics = reduce_results([merged])
    skip = config.data.bad_samples == "skip"
    if skip:
        metrics["num_bad_samples"] = int(q_out.sum() + g_out.sum())
    model.train(was_training)

    if info.is_main:
        out = Path(out_dir or config.run_dir)
        line = format_result_line(metrics)
        note = f"; {q_out.sum()} query and {g_out.sum()} gallery samples unreadable, left out" if skip else ""
        monitor.log(
            f"{tag}: {line} mINP:{metrics['mINP']:f} ({metrics['num_queries']} queries, {len(kept)} gallery{note})"
        )
        with atomic_write(out / f"metrics-{tag}.json", "w") as f:
            json.dump({"step": step, **metrics}, f, indent=1)
        with open(out / "result.txt", "a") as f:
            f.write(f"{tag} step {step}: {line}\n")
        monitor.scalars(
            {
                f"{tag}/rank1": metrics["rank1"],
                f"{tag}/rank5": metrics["rank5"],
                f"{tag}/rank10": metrics["rank10"],
                f"{tag}/mAP": metrics["mAP"],
                f"{tag}/mINP": metrics["mINP"],
            },
            step,
        )
        if skip:
            monitor.scalars({f"{tag}/bad_samples": metrics["num_bad_samples"]}, step)
        if config.eval.save_features:
            save_features(out, tag, qf.cpu().numpy(), gf.cpu().numpy(), qi, gi, monitor)
        for q in queries[: config.eval.rank_list_queries].tolist():
            picture = rank_list_picture(q, qf, gf, query, gallery, g_out)
            monitor.image(f"{tag}/rank_list_{q}", picture, step)
            Image.fromarray(picture).save(out / f"rank-list-{tag}-{q}.png")
        if config.eval.rank_list_queries:
            monitor.log(f"rank lists (query, then its top 10; green = same identity): {out}/rank-list-{tag}-*.png")
        monitor.flush()
    return metrics


def save_features(out: Path, tag: str, qf: np.ndarray, gf: np.ndarray, qi, gi, monitor: Monitor) -> None:
    """Features as .npy, and as the original's `pytorch_result.mat` (keys of its evaluate_gpu.py)
    when scipy is installed."""
    np.save(out / f"features-{tag}-query.npy", qf)
    np.save(out / f"features-{tag}-gallery.npy", gf)
    try:
        import scipy.io
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


def rank_list_picture(
    q: int,
    qf: torch.Tensor,
    gf: torch.Tensor,
    query: ShardReader,
    gallery: ShardReader,
    left_out: np.ndarray | None = None,
    top: int = 10,
) -> np.ndarray:
    """Query `q` and its top gallery clouds (junk and left-out samples removed), correct matches
    framed green, others red."""
    qi, gi = query.index, gallery.index
    scores = (gf @ qf[q]).cpu().numpy()
    junk = (gi.pids == -1) | ((gi.pids == qi.pids[q]) & (gi.camids == qi.camids[q]))
    if left_out is not None:
        junk |= left_out
    ranked = [int(i) for i in np.argsort(-scores, kind="stable") if not junk[i]][:top]
    clouds = [query[q]] + [gallery[i] for i in ranked]
    matches = [None] + [bool(gi.pids[i] == qi.pids[q]) for i in ranked]
    return render_rank_list([(c.xyz, c.rgb) for c in clouds], matches)


def evaluate_checkpoint(config: Config, checkpoint: str | Path) -> dict[str, Any]:
    """The `ognet-eval` command: one checkpoint (ours, or an imported original) on query/gallery."""
    info = dist.init_distributed(timeout_s=config.train.collective_timeout_s)
    out_dir = Path(config.run_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    monitor = Monitor(out_dir / "tb", info.is_main)
    try:
        payload = load_checkpoint(checkpoint, map_location=info.device)
        mc = payload["model_config"]
        model = build_model(mc["variant"], mc["num_classes"], **mc.get("overrides", {}))
        load_model_state(model, payload["model"], str(checkpoint))
        model.to(info.device)
        return evaluate_model(model, config, info, monitor, tag="eval", out_dir=out_dir)
    finally:
        monitor.close()
        dist.cleanup()


def main(argv: list[str] | None = None) -> None:
    """`ognet-eval --config FILE --checkpoint FILE [key=value ...]`."""
    import argparse
    import sys

    from ognet.config import load_config
    from ognet.errors import OgnetError

    parser = argparse.ArgumentParser(
        prog="ognet-eval", description="Evaluate an OG-Net checkpoint (sharded over ranks)."
    )
    parser.add_argument("--config", help="YAML config naming the data (data.root, data.query_split, ...)")
    parser.add_argument("--checkpoint", required=True, help="ognet checkpoint (model_last.pt, step-*.pt, or imported)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. run_dir=runs/eval data.root=/data/duke")
    args = parser.parse_args(argv)
    enable_stack_dumps()
    try:
        evaluate_checkpoint(load_config(args.config, args.overrides), args.checkpoint)
    except OgnetError as e:
        sys.exit(f"ognet-eval: error: {e}")
