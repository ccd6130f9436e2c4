"""`ognet-export`: a checkpoint as ONNX or as a torch.export program (.pt2) that maps test-transformed
clouds to test features, for a fixed batch and point count; and `load_exported`/`exported_features`
to run either on point files with the evaluation's test transform.

The exported graph holds the whole test-time feature: the views of `eval.scales` (and `eval.flip`)
in one batch, the 512-d BN-neck features summed over the views and L2-normalised. The test transform
itself (centring, the slim that prefers coloured points) depends on the data and stays in Python:
a cloud of N points becomes round(N * data.slim) points, the count the graph is exported for.

Point ops: kNN (a matmul and topk per block of rows) and ball query (a where and topk per block)
trace as they run; the blocks unroll into a fixed number of nodes for the fixed shape. Farthest
point sampling is a sequential loop of m steps; traced as it runs it would unroll into m copies of
its body per layer (1344 for OG-Net), so while exporting it runs as a `scan` (ONNX `Scan`): one body,
m iterations, the same picks (`fps_scan`). The default ops are not changed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ognet.cli import run_command
from ognet.config import Config
from ognet.data.transforms import TransformConfig
from ognet.errors import ConfigError, DataError
from ognet.evaluate import pad_batch, test_views
from ognet.extract import Cloud, CloudSet, cloud_source, comparable, load_model, same_count_batches
from ognet.model import OGNet, PointOps, using_point_ops
from ognet.model.ops import FPS_MIN_SQUARED_NORM

log = logging.getLogger("ognet")

FORMATS = {".onnx": "onnx", ".pt2": "torch.export"}
METADATA = "ognet.json"  # ONNX metadata key / .pt2 extra file: batch, points, test-time options, model
TOLERANCE = 1e-4  # largest |exported - eager| feature difference the export check accepts


@torch.no_grad()
def fps_scan(xyz: Tensor, m: int) -> Tensor:
    """`ops.farthest_point_sample` as one `scan` of m - 1 steps instead of a Python loop: the same
    float32 operations in the same order, so the same picks (argmax: the first maximum, also in ONNX)."""
    from torch._higher_order_ops.scan import scan

    p = xyz.detach().float()
    x, y, z = (c.contiguous() for c in p.unbind(-1))
    norm2 = x * x + y * y + z * z
    dist = torch.where(norm2.double() > FPS_MIN_SQUARED_NORM, 1e10, -1.0).to(torch.float32)
    first = torch.zeros(p.shape[0], 1, dtype=torch.long, device=p.device)

    def step(carry: tuple[Tensor, Tensor], _: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor]:
        dist, last = carry
        d = (x - x.gather(1, last)).square() + (y - y.gather(1, last)).square()
        dist = torch.minimum(dist, d + (z - z.gather(1, last)).square())
        pick = dist.argmax(dim=1, keepdim=True)
        return (dist, pick), pick.clone()

    if m == 1:
        return first
    _, picks = scan(step, (dist, first), torch.zeros(m - 1, device=p.device))  # picks (m - 1, B, 1)
    return torch.cat([first, picks.squeeze(-1).transpose(0, 1)], dim=1)


EXPORT_OPS = PointOps(farthest_point_sample=fps_scan)


class FeatureModule(nn.Module):
    """Transformed clouds (B, P, 3) x 2 -> L2-normalised test features (B, embedding_dim), every
    test-time view in one forward (in eval mode a feature does not depend on its batch)."""

    def __init__(self, model: OGNet, scales: tuple[float, ...], flip: bool):
        super().__init__()
        self.model, self.scales, self.flip = model.eval(), tuple(scales), flip

    def forward(self, xyz: Tensor, rgb: Tensor) -> Tensor:
        views = test_views(xyz, self.scales, self.flip)
        out = self.model(torch.cat(views), rgb.repeat(len(views), 1, 1)).feature.float()
        f = out.view(len(views), xyz.shape[0], -1).sum(0)
        return f / (f.norm(dim=1, keepdim=True) + 1e-6)


def example_inputs(batch: int, points: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A centred random batch in the test transform's ranges (xyz about unit scale, rgb in [-0.5, 0.5])."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, points, 3, generator=g) * 0.3, torch.rand(batch, points, 3, generator=g) - 0.5


def export_model(model: OGNet, out: str | os.PathLike, config: Config, file_points: int, batch: int = 1) -> dict:
    """Write `out` (.onnx or .pt2) for clouds of `file_points` points, `batch` per call; returns its
    metadata (with `comparable`: ognet-extract compares its features with eager ones). CPU,
    float32, eval mode."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise ConfigError(f"{out}: unknown export format {out.suffix!r}; expected one of {sorted(FORMATS)}")
    points = int(round(file_points * config.data.slim))
    if points < model.config.k or batch < 1:
        raise ConfigError(
            f"--points {file_points} (x data.slim) and --batch {batch} leave no cloud for k={model.config.k}"
        )
    module = FeatureModule(
        copy.deepcopy(model).cpu().float(), config.eval.scales, config.eval.flip
    )  # the caller keeps its model
    meta = {
        "format": FORMATS[out.suffix],
        "batch": batch,
        "points": points,
        "file_points": file_points,
        "slim": config.data.slim,
        "k": model.config.k,
        "embedding_dim": model.config.embedding_dim,
        **comparable(model, config),
    }
    inputs = example_inputs(batch, points)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), using_point_ops(EXPORT_OPS):
        program = torch.export.export(module, inputs)
        if out.suffix == ".pt2":
            torch.export.save(program, out, extra_files={METADATA: json.dumps(meta)})
        else:
            onnx_program = torch.onnx.export(program, inputs, input_names=["xyz", "rgb"], output_names=["feature"])
            onnx_program.model.metadata_props[METADATA] = json.dumps(meta)
            onnx_program.save(out)
    return meta


class ExportedModel:
    """An exported model file, run on CPU: ONNX with onnxruntime, .pt2 with torch.export.load."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.suffix not in FORMATS:
            raise ConfigError(f"{self.path}: not an exported model (expected {sorted(FORMATS)})")
        if not self.path.is_file():
            raise DataError(f"{self.path}: exported model does not exist")
        if self.path.suffix == ".pt2":
            extra = {METADATA: ""}
            self._program = torch.export.load(self.path, extra_files=extra).module()
            self.meta = json.loads(extra[METADATA])
        else:
            import onnxruntime  # the `export` extra

            self._session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
            self.meta = json.loads(self._session.get_modelmeta().custom_metadata_map[METADATA])

    def __call__(self, xyz: Tensor, rgb: Tensor) -> Tensor:
        if self.path.suffix == ".pt2":
            with torch.no_grad():
                return self._program(xyz, rgb)
        return torch.from_numpy(self._session.run(None, {"xyz": xyz.numpy(), "rgb": rgb.numpy()})[0])


def _checked(dataset: CloudSet, clouds: Sequence[Cloud], exported: ExportedModel) -> Iterator:
    """The dataset's items, a cloud of another point count than the export's replaced by its DataError."""
    m = exported.meta
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, DataError) and len(item[0]) != m["points"]:
            item = DataError(
                f"{cloud_source(clouds[i], i)}: {len(item[0])} points after data.slim={m['slim']}, but {exported.path} "
                f"takes {m['points']} (clouds of {m['file_points']} points); export again with --points"
            )
        yield item


def exported_features(exported: ExportedModel, clouds: Sequence[Cloud]) -> Tensor:
    """(N, embedding_dim) features of `clouds` (files or (xyz, rgb) arrays) by an exported model, with
    the test transform it was exported with; a cloud of another point count is a DataError naming it."""
    m = exported.meta
    dataset = CloudSet(clouds, TransformConfig(slim=m["slim"]), m["k"])
    features = []
    for batch in same_count_batches(_checked(dataset, clouds, exported), m["batch"]):
        xyz, rgb = pad_batch(*(torch.stack(t) for t in zip(*batch)), m["batch"])
        features.append(exported(xyz, rgb)[: len(batch)])
    return torch.cat(features) if features else torch.zeros(0, m["embedding_dim"])


def check_export(model: OGNet, exported: ExportedModel, config: Config) -> float:
    """Largest |exported - eager| feature difference on a random batch; above TOLERANCE it is an error."""
    m = exported.meta
    xyz, rgb = example_inputs(m["batch"], m["points"], seed=1)
    with torch.no_grad():
        eager = FeatureModule(model, config.eval.scales, config.eval.flip)(xyz, rgb)
    diff = float((exported(xyz, rgb) - eager).abs().max())
    if not diff <= TOLERANCE:
        raise ConfigError(f"{exported.path}: exported features differ from eager ones by {diff:.3g} > {TOLERANCE}")
    return diff


def export_command(config: Config, args: argparse.Namespace) -> None:
    model = load_model(args.checkpoint, "cpu")
    meta = export_model(model, args.out, config, args.points, args.batch)
    diff = check_export(model, ExportedModel(args.out), config)
    log.info(
        f"{args.out}: {meta['format']}, {meta['batch']} x {meta['points']} points ({args.points} before "
        f"data.slim={meta['slim']}); features within {diff:.2g} of eager"
    )


def main(argv: list[str] | None = None) -> None:
    """`ognet-export --checkpoint FILE --out model.onnx|model.pt2 [--points N] [--batch B] [key=value ...]`."""

    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--checkpoint", required=True, help="ognet checkpoint (model_last.pt, or imported)")
        parser.add_argument("--out", required=True, help="model.onnx (onnxruntime) or model.pt2 (torch.export)")
        parser.add_argument("--points", type=int, default=8192, help="points per cloud file (3DMarket+bg: 8192)")
        parser.add_argument("--batch", type=int, default=1, help="clouds per call of the exported model")

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_command("ognet-export", "Export an OG-Net checkpoint to ONNX or torch.export.", export_command, argv, arguments)


if __name__ == "__main__":
    main()
