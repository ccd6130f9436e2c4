"""Launch and sync budget of one training step: device ops and host synchronisations per step.

    python benchmarks/step_budget.py [--variants ognet ognet-small ognet-deep] [--batch 36] [--points 4096]
        [--point-ops reference triton] [--threads 2]

Measures the real `Trainer.step` (the training loop's body: the previous verdicts, learning rate
and seed, forward, loss, backward, optimizer, BatchNorm rollback, vote, meters) of a one-process
Trainer built from `configs/market/<variant>-circle.yaml`, on a step that neither logs nor
checkpoints, after a warm-up step (which creates the optimizer state). Counted in one `torch.profiler` step:
- device ops: top-level `aten::` ops (none of their ancestors is an aten op), plus one per Triton
  launch (the `triton_launch::` ranges of ognet.model.triton_ops; what the interpreter does inside
  them is not counted). On CUDA each counts as one kernel launch or more;
- host synchronisations: `SYNC_OPS` anywhere in the tree (an `.item()`, a boolean-mask index's
  `nonzero`, a Python `if` on a tensor ...).
The reference ops chunk kNN and ball query as they do on CUDA (`ops.DEVICE_BLOCK_ELEMENTS`). Off
CUDA, `triton` runs under Triton's interpreter (TRITON_INTERPRET=1), slowly but with the same
launches. Each (variant, point ops) runs in its own process. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ognet import dist  # noqa: E402
from ognet.config import load_config  # noqa: E402
from ognet.data import synth  # noqa: E402
from ognet.data.pack import PackOptions, pack_dataset  # noqa: E402
from ognet.model import VARIANTS, edgeconv, ops  # noqa: E402
from ognet.monitor import Monitor  # noqa: E402
from ognet.train import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SYNC_OPS = frozenset(
    {
        "aten::_local_scalar_dense",  # .item(), float(t), int(t), bool(t)
        "aten::item",
        "aten::is_nonzero",  # `if tensor:`
        "aten::nonzero",  # boolean-mask indexing, torch.where(cond)
        "aten::nonzero_static",
        "aten::masked_select",
        "aten::equal",
        "aten::_unique2",
        "aten::unique_consecutive",
        "aten::allclose",
    }
)
CPU_KERNEL_HOST_READS = frozenset({"aten::_fused_adam_", "aten::_fused_adamw_"})
LAUNCH_PREFIX = "triton_launch::"
# Ops that only make tensor metadata or allocate: no kernel runs for them on a GPU. An aten op is a
# kernel op when it or one of the ops it calls is not one of these (`to` and `reshape` copy only
# sometimes: then they call `_to_copy` or `clone`, which are kernel ops).
NO_KERNEL_OPS = frozenset(
    "aten::" + name
    for name in [
        "view",
        "view_as",
        "reshape",
        "_reshape_alias",
        "_unsafe_view",
        "detach",
        "detach_",
        "alias",
        "transpose",
        "t",
        "permute",
        "expand",
        "expand_as",
        "unsqueeze",
        "squeeze",
        "narrow",
        "slice",
        "select",
        "split",
        "split_with_sizes",
        "unbind",
        "chunk",
        "as_strided",
        "diagonal",
        "flatten",
        "unflatten",
        "movedim",
        "to",
        "empty",
        "empty_like",
        "empty_strided",
        "set_",
        "lift_fresh",
        "resolve_conj",
        "resolve_neg",
        "contiguous",
        "_has_compatible_shallow_copy_type",
        "result_type",
    ]
)
TRAIN_IDS, TRAIN_IMAGES = 8, 240  # enough samples for several non-logging steps of batch 36


def make_data(folder: Path) -> Path:
    """Tiny synthetic shards (the Trainer needs an index; the measured step gets its own clouds)."""
    config = synth.SynthConfig(
        train_ids=TRAIN_IDS, train_images=TRAIN_IMAGES, test_ids=2, query_images=2, gallery_images=4, points=128
    )
    synth.generate_dataset(folder / "synth", config, workers=1, progress=False)
    pack_dataset(folder / "synth", folder / "shards", options=PackOptions(max_count=100, workers=1, progress=False))
    return folder / "shards"


def build_trainer(
    variant: str, point_ops: str, batch: int, shards: Path, run_dir: Path, device: str, extra: Sequence[str] = ()
) -> Trainer:
    """A one-process Trainer of the paper's circle config for `variant`, never logging or checkpointing
    (`extra`: more config overrides)."""
    overrides = [
        f"data.root={shards}",
        f"run_dir={run_dir}",
        "data.num_workers=0",
        f"model.point_ops={point_ops}",
        f"train.global_batch_size={batch}",
        "train.log_every_steps=1000000",
        "train.checkpoint_every_steps=0",
        *extra,
    ]
    config = load_config(ROOT / "configs" / "market" / f"{variant}-circle.yaml", overrides)
    info = dist.DistInfo(0, 0, 1, torch.device(device), None, True)
    return Trainer(config, info, Monitor(None, False))


def step_inputs(batch: int, points: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Person-like clouds (host tensors, as the loader gives them); pairs of identities, so the
    circle loss has positive and negative pairs."""
    g = torch.Generator().manual_seed(0)
    xyz = torch.randn(batch, points, 3, generator=g) * torch.tensor([0.2, 0.5, 0.1])
    rgb = torch.rand(batch, points, 3, generator=g) - 0.5
    labels = (torch.arange(batch) // 2) % TRAIN_IDS
    if device == "cuda":
        xyz, rgb, labels = xyz.pin_memory(), rgb.pin_memory(), labels.pin_memory()
    return xyz, rgb, labels


def _launches_kernel(event: Any) -> bool:
    if event.name.startswith("aten::") and event.name not in NO_KERNEL_OPS:
        return True
    return any(_launches_kernel(child) for child in event.cpu_children)


def count_events(prof: profile) -> dict[str, Any]:
    """Top-level aten ops (and those of them that run a kernel), Triton launches and host
    synchronisations of one profiled region.

    A sync counts once (`.item()` is aten::item over aten::_local_scalar_dense). The CPU kernel of
    the fused Adam reads every step counter with `.item()`; the CUDA kernel reads them on the
    device: those reads are reported apart, as `cpu_kernel_reads`."""
    aten, kernels, launches, cpu_kernel_reads = 0, 0, 0, 0
    syncs: collections.Counter[str] = collections.Counter()
    for event in prof.events():
        name, ancestors = event.name, []
        parent = event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        if any(a.startswith(LAUNCH_PREFIX) for a in ancestors):
            continue  # inside a kernel launch (the interpreter's own work on CPU)
        if name.startswith(LAUNCH_PREFIX):
            launches += 1
        elif name in SYNC_OPS and not any(a in SYNC_OPS for a in ancestors):
            if any(a in CPU_KERNEL_HOST_READS for a in ancestors):
                cpu_kernel_reads += 1
            else:
                syncs[name] += 1
        if name.startswith("aten::") and not any(a.startswith("aten::") for a in ancestors):
            aten += 1
            kernels += _launches_kernel(event)
    return {
        "aten_ops": aten,
        "kernel_ops": kernels,
        "triton_launches": launches,
        "device_ops": aten + launches,
        "kernel_launches": kernels + launches,
        "syncs": dict(syncs),
        "cpu_kernel_reads": cpu_kernel_reads,
    }


def budget(trainer: Trainer, inputs: tuple[torch.Tensor, ...], warmup: int = 1) -> dict[str, Any]:
    """Device ops and host syncs of one step (not a log or checkpoint step) after `warmup` steps."""
    steps = trainer.data.steps_per_epoch
    if warmup + 1 >= steps:
        raise ValueError(f"{steps} steps per epoch: too few for {warmup} warm-up steps and a non-logging step")
    for _ in range(warmup):
        trainer.step(*inputs, [])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.step(*inputs, [])
    if trainer.info.device.type == "cuda":
        torch.cuda.synchronize()
    return count_events(prof)


def measure_one(variant: str, point_ops: str, batch: int, points: int, shards: Path) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ops.CPU_BLOCK_ELEMENTS = ops.DEVICE_BLOCK_ELEMENTS  # chunk as on CUDA: the counted budget is CUDA's
    edgeconv.COUNT_AS_ON_ACCELERATORS = True  # EdgeConv's statistics as on CUDA too
    if point_ops == "triton" and device == "cpu":
        from ognet.model import triton_ops

        # The interpreter is faster with big tiles; launches per call do not depend on tile sizes.
        triton_ops.BALL_BLOCK_M, triton_ops.BALL_BLOCK_N = 128, 1024
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(variant, point_ops, batch, shards, Path(run_dir), device)
        result = budget(trainer, step_inputs(batch, points, device))
        trainer.close()
    return {"variant": variant, "point_ops": point_ops, "batch": batch, "points": points, **result}


def report(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    lines = [f"Command: `python benchmarks/step_budget.py {' '.join(sys.argv[1:])}`", ""]
    lines += [
        f"Batch {args.batch} x {args.points} points, one process, fp32, one step that neither logs nor checkpoints.",
        "",
        "| variant | point ops | top-level aten ops + Triton launches | of which run a kernel | host syncs "
        "| CPU fused-Adam reads |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        syncs = sum(r["syncs"].values())
        detail = f" ({', '.join(f'{k} x{v}' for k, v in sorted(r['syncs'].items()))})" if syncs else ""
        lines.append(
            f"| {r['variant']} | {r['point_ops']} | {r['device_ops']:,} ({r['aten_ops']:,} + {r['triton_launches']})"
            f" | {r['kernel_launches']:,} | {syncs}{detail} | {r['cpu_kernel_reads']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--point-ops", nargs="+", default=["reference", "triton"], choices=["reference", "triton"])
    parser.add_argument("--batch", type=int, default=36)
    parser.add_argument("--points", type=int, default=4096)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: variant point_ops shards
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        variant, point_ops, shards = args.one
        print(json.dumps(measure_one(variant, point_ops, args.batch, args.points, Path(shards))))
        return
    results = []
    with tempfile.TemporaryDirectory() as folder:
        shards = make_data(Path(folder))
        for variant in args.variants:
            for point_ops in args.point_ops:
                env = {**os.environ, "TRITON_INTERPRET": "1"} if point_ops == "triton" else dict(os.environ)
                if torch.cuda.is_available():
                    env.pop("TRITON_INTERPRET", None)
                cmd = [sys.executable, __file__, "--one", variant, point_ops, str(shards)]
                cmd += ["--batch", str(args.batch), "--points", str(args.points)]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
                results.append(json.loads(out.splitlines()[-1]))
                print(json.dumps(results[-1]), file=sys.stderr)
    print(report(args, results))


if __name__ == "__main__":
    main()
