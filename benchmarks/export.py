"""Export cost and speed: eager PyTorch against onnxruntime and torch.export (.pt2) per cloud on CPU.

    python benchmarks/export.py --variant ognet --points 8192 --repeats 5 --out benchmarks/results/export.md

A random-weight model of the variant (751 classes) is exported once per format (the export time is
recorded), then each path computes the test feature (two scales, one forward) of the same batch-1
cloud; runs are interleaved, after a warm-up, and the medians are reported with the ratio to eager.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import load_average, provenance

from ognet.config import Config
from ognet.export import ExportedModel, FeatureModule, example_inputs, export_model
from ognet.model import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="ognet")
    parser.add_argument("--points", type=int, default=8192, help="points per cloud file (halved by data.slim)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.variant, 751).eval()
    config = Config()
    load = os.getloadavg()
    folder = Path(tempfile.mkdtemp())
    paths, export_s = {}, {}
    for fmt in ("pt2", "onnx"):
        start = time.perf_counter()
        export_model(model, folder / f"model.{fmt}", config, args.points)
        export_s[fmt] = time.perf_counter() - start
        paths[fmt] = ExportedModel(folder / f"model.{fmt}")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = args.threads
    paths["onnx"]._session = onnxruntime.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])  # fmt: skip
    eager = FeatureModule(model, config.eval.scales, config.eval.flip)
    xyz, rgb = example_inputs(1, paths["onnx"].meta["points"])
    runs = {"eager": lambda: eager(xyz, rgb), "onnxruntime": lambda: paths["onnx"](xyz, rgb), "torch.export .pt2": lambda: paths["pt2"](xyz, rgb)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        ref = eager(xyz, rgb)
        diffs = {name: float((run() - ref).abs().max()) for name, run in runs.items()}  # also the warm-up
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    report(args, load, export_s, times, diffs)


def report(args, load, export_s: dict, times: dict, diffs: dict) -> None:
    base = statistics.median(times["eager"])
    lines = [
        *provenance("Export: eager against onnxruntime and torch.export, per cloud on CPU"),
        f"- threads per path {args.threads}; onnxruntime {__import__('onnxruntime').__version__}",
        f"- load average (1, 5, 15 min) at start: {' '.join(f'{x:.2f}' for x in load)}; at end: {load_average()}",
        f"- model: {args.variant}, 751 classes, random weights; batch 1 cloud of {args.points} points, {args.points // 2} after data.slim=0.5; test feature f(xyz) + f(1.1 xyz), both views in one forward",
        f"- export time (tracing, and for ONNX the translation): .pt2 {export_s['pt2']:.0f} s, .onnx {export_s['onnx']:.0f} s",
        f"- medians of {args.repeats} interleaved runs after one warm-up run",
        "",
        "| path | s per cloud (median) | runs | vs eager | max abs feature diff vs eager |",
        "|---|---:|---|---:|---:|",
    ]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(
            f"| {name} | {med:.3f} | {', '.join(f'{t:.3f}' for t in ts)} | {base / med:.2f}x | {diffs[name]:.2g} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
