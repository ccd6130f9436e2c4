"""Ranking time and peak memory: ognet.metrics (vectorised, chunked) against a per-query loop of
the original protocol (evaluate_gpu.py), on random unit features at Market and MSMT17 sizes.

    python benchmarks/ranking.py [--sizes market msmt] [--repeats 3] [--loop-queries N] [--threads T]

Every measurement runs in a fresh subprocess (same seed, same data), so ru_maxrss is its own:
peak memory is ru_maxrss after the measured part minus VmRSS before it. The timed loop is the
original's (float32 scores, numpy argsort reversed: not stable). Exactness is checked in float64
against the same loop with our tie rule (stable argsort of -score), where score rounding cannot
reorder near-equal scores; in float32, matrix-vector and matrix-matrix products round differently
and equal float32 scores are common at MSMT size, so a few APs differ slightly (reported). Where
--loop-queries (or the size's default) is less than the number of queries, the loops run on a
random subset and the loop time is extrapolated linearly; the vectorised path is also timed on
that subset. Prints a Markdown report (see benchmarks/results/ranking.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cpu_model

from ognet.metrics import PerQueryResult, rank_queries, reduce_results  # noqa: E402

DIM = 512
SEED = 0
# Market: the 2D gallery's shares of identities (13,119), distractors pid 0 (2,793) and junk
# pid -1 (3,819) applied to the 15,913 items of the 3D gallery; 750 test identities, 6 cameras.
# MSMT17: 3,060 test identities, 15 cameras, no distractors or junk.
SIZES = {
    "market": dict(queries=3368, gallery=15913, ids=750, cameras=6, distractors=2252, junk=3080, loop=None),
    "msmt": dict(queries=11659, gallery=82161, ids=3060, cameras=15, distractors=0, junk=0, loop=1000),
}


def make_data(size: dict) -> dict[str, torch.Tensor]:
    """Random unit features and labels, generated in blocks so that no transient copy of the
    gallery raises the peak memory measured later."""
    g = torch.Generator().manual_seed(SEED)

    def unit(n: int) -> torch.Tensor:
        out = torch.empty(n, DIM)
        for a in range(0, n, 4096):
            out[a : a + 4096] = F.normalize(torch.randn(min(4096, n - a), DIM, generator=g), dim=1)
        return out

    real = size["gallery"] - size["distractors"] - size["junk"]
    gallery_pids = torch.cat(
        [
            torch.randint(1, size["ids"] + 1, (real,), generator=g),
            torch.zeros(size["distractors"], dtype=torch.long),
            torch.full((size["junk"],), -1, dtype=torch.long),
        ]
    )[torch.randperm(size["gallery"], generator=g)]
    return dict(
        qf=unit(size["queries"]),
        qp=torch.randint(1, size["ids"] + 1, (size["queries"],), generator=g),
        qc=torch.randint(0, size["cameras"], (size["queries"],), generator=g),
        gf=unit(size["gallery"]),
        gp=gallery_pids,
        gc=torch.randint(0, size["cameras"], (size["gallery"],), generator=g),
    )


def loop_subset(num_queries: int, count: int | None) -> np.ndarray:
    if count is None or count >= num_queries:
        return np.arange(num_queries)
    return np.sort(np.random.default_rng(SEED).choice(num_queries, count, replace=False))


def vmrss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def original_loop(data: dict[str, torch.Tensor], subset: np.ndarray, stable: bool) -> dict:
    """evaluate_gpu.py, query by query: score on the device (here the CPU), numpy ranking, devkit
    AP, CMC over the whole gallery. INP (not in the original) costs one division per query."""
    gf, qf = data["gf"], data["qf"]
    ql, qc, gl, gc = (data[k].numpy() for k in ("qp", "qc", "gp", "gc"))
    cmc_sum = np.zeros(len(gl), dtype=np.int64)
    aps, inps, firsts = [], [], []
    for i in subset:
        score = torch.mm(gf, qf[i].view(-1, 1)).squeeze(1).numpy()
        index = np.argsort(-score, kind="stable") if stable else np.argsort(score)[::-1]
        query_index = np.argwhere(gl == ql[i])
        camera_index = np.argwhere(gc == qc[i])
        good_index = np.setdiff1d(query_index, camera_index, assume_unique=True)
        junk_index = np.append(np.intersect1d(query_index, camera_index), np.argwhere(gl == -1))
        ap, inp, first = 0.0, 0.0, -1
        if good_index.size:
            index = index[np.isin(index, junk_index, invert=True)]  # np.in1d in the original
            rows_good = np.argwhere(np.isin(index, good_index)).flatten()
            cmc = np.zeros(len(gl), dtype=np.int64)
            cmc[rows_good[0] :] = 1
            cmc_sum += cmc
            ngood = len(good_index)
            for k in range(ngood):
                d_recall = 1.0 / ngood
                precision = (k + 1) * 1.0 / (rows_good[k] + 1)
                old_precision = k * 1.0 / rows_good[k] if rows_good[k] != 0 else 1.0
                ap = ap + d_recall * (old_precision + precision) / 2
            inp, first = ngood / (rows_good[-1] + 1.0), int(rows_good[0])
        aps.append(ap)
        inps.append(inp)
        firsts.append(first)
    return dict(ap=aps, inp=inps, first_good=firsts, cmc_sum=cmc_sum[:10].tolist())


def child(mode: str, size_name: str, repeats: int, loop_queries: int | None) -> dict:
    size = SIZES[size_name]
    data = make_data(size)
    subset = loop_subset(size["queries"], loop_queries)
    names = ("qf", "qp", "qc", "gf", "gp", "gc")
    rss_before, maxrss_before = vmrss_bytes(), maxrss_bytes()
    out: dict = dict(rss_before=rss_before, maxrss_before=maxrss_before, load_before=os.getloadavg())
    if mode == "fast":
        out["times"], result = timed(repeats, lambda: rank_queries(*(data[k] for k in names)))
        out["peak_increase"] = maxrss_bytes() - rss_before
        out["metrics"] = reduce_results([result])
        sub = {k: data[k][subset] if k.startswith("q") else data[k] for k in names}
        out["subset_times"], sub_result = timed(repeats, lambda: rank_queries(*(sub[k] for k in names)))
        out["subset_identical_to_full"] = all(
            torch.equal(getattr(sub_result, f), getattr(result, f)[subset]) for f in ("ap", "inp", "first_good")
        )
        out["subset"] = as_lists(sub_result)
        sub64 = {k: sub[k].double() if k.endswith("f") else sub[k] for k in names}
        out["subset64"] = as_lists(rank_queries(*(sub64[k] for k in names)))
    else:
        if mode == "check":
            data = {k: data[k].double() if k.endswith("f") else data[k] for k in names}
        start = time.perf_counter()
        out["subset"] = original_loop(data, subset, stable=mode == "check")
        out["time"] = time.perf_counter() - start
        out["peak_increase"] = maxrss_bytes() - rss_before
    out["load_after"] = os.getloadavg()
    return out


def timed(repeats: int, fn: Callable[[], PerQueryResult]) -> tuple[list[float], PerQueryResult]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def as_lists(result: PerQueryResult) -> dict[str, list]:
    return dict(ap=result.ap.tolist(), inp=result.inp.tolist(), first_good=result.first_good.tolist())


def run_child(mode: str, size_name: str, args: argparse.Namespace, loop_queries: int | None) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--sizes", size_name, "--repeats", str(args.repeats)]
    if loop_queries is not None:
        command += ["--loop-queries", str(loop_queries)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def compare(fast: dict, loop: dict) -> dict:
    ap_diff = np.abs(np.array(fast["ap"]) - np.array(loop["ap"]))
    inp_diff = np.abs(np.array(fast["inp"]) - np.array(loop["inp"]))
    return dict(
        first_good_differing=int((np.array(fast["first_good"]) != np.array(loop["first_good"])).sum()),
        queries_differing=int(((ap_diff > 0) | (inp_diff > 0)).sum()),
        max_ap_diff=float(ap_diff.max()),
        max_inp_diff=float(inp_diff.max()),
        mAP_fast=float(np.sum(fast["ap"]) / len(fast["ap"])),
        mAP_loop=float(np.sum(loop["ap"]) / len(loop["ap"])),
    )


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def machine() -> list[str]:
    cpu = cpu_model()
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), numpy {np.__version__}, Python {platform.python_version()}",
        f"- uptime at start: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3, help="runs of the vectorised path (median)")
    parser.add_argument(
        "--loop-queries", type=int, default=None, help="queries the loop ranks (default: all for Market, 1000 for MSMT)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--child", choices=["fast", "loop", "check"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        loop_queries = args.loop_queries if args.loop_queries is not None else SIZES[args.sizes[0]]["loop"]
        print(json.dumps(child(args.child, args.sizes[0], args.repeats, loop_queries)))
        return

    lines = [
        "# Ranking benchmark",
        "",
        f"Command: `python benchmarks/ranking.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
    ]
    lines += machine()
    for name in args.sizes:
        size = SIZES[name]
        loop_queries = args.loop_queries if args.loop_queries is not None else size["loop"]
        fast = run_child("fast", name, args, loop_queries)
        loop = run_child("loop", name, args, loop_queries)
        check = run_child("check", name, args, loop_queries)
        n = len(loop["subset"]["ap"])
        partial = n < size["queries"]
        loop_seconds = loop["time"] * size["queries"] / n
        fast_median = statistics.median(fast["times"])
        exact = compare(fast["subset64"], check["subset"])
        f32 = compare(fast["subset"], loop["subset"])
        m = fast["metrics"]
        lines += [
            "",
            f"## {name}: {size['queries']} queries x {size['gallery']} gallery x {DIM}",
            "",
            f"- labels: {size['ids']} identities, {size['cameras']} cameras, {size['distractors']} distractors "
            f"(pid 0), {size['junk']} junk (pid -1); {m['num_valid_queries']} of {m['num_queries']} queries "
            "have a good match",
            f"- vectorised, all queries: median {fast_median:.2f} s of {len(fast['times'])} runs "
            f"({', '.join(f'{t:.2f}' for t in fast['times'])}); peak RSS increase {gib(fast['peak_increase'])} "
            f"(RSS before {gib(fast['rss_before'])}, ru_maxrss before {gib(fast['maxrss_before'])}); "
            f"mAP {m['mAP']:.6f}, rank1 {m['rank1']:.6f}",
            f"- loop (original, float32) on {n} queries{' (random subset)' if partial else ''}: "
            f"{loop['time']:.1f} s; peak RSS increase {gib(loop['peak_increase'])}",
            f"- vectorised on the same {n} queries: median {statistics.median(fast['subset_times']):.2f} s "
            f"({', '.join(f'{t:.2f}' for t in fast['subset_times'])}); equal to those queries of the full run: "
            f"{fast['subset_identical_to_full']}",
        ]
        if partial:
            lines.append(
                f"- loop time for all {size['queries']} queries, extrapolated linearly "
                f"({loop['time']:.1f} s x {size['queries']}/{n}): {loop_seconds:.0f} s"
            )
        lines += [
            f"- **speed-up: {loop_seconds / fast_median:.1f}x** (loop{' extrapolated' if partial else ''} / "
            "vectorised median)",
            f"- exactness, float64, same tie rule ({n} queries): first good ranks differing "
            f"{exact['first_good_differing']}, queries with any AP/INP difference {exact['queries_differing']} "
            f"(max |dAP| {exact['max_ap_diff']:.1e}, max |dINP| {exact['max_inp_diff']:.1e}); "
            f"mAP {exact['mAP_fast']:.15f} vs {exact['mAP_loop']:.15f}",
            f"- float32 vectorised vs the original loop: first good ranks differing {f32['first_good_differing']}, "
            f"queries with any AP/INP difference {f32['queries_differing']} (max |dAP| {f32['max_ap_diff']:.1e}); "
            f"mAP {f32['mAP_fast']:.9f} vs {f32['mAP_loop']:.9f}",
            "- load average (1 min) before/after: "
            + "; ".join(
                f"{label} {r['load_before'][0]:.2f}/{r['load_after'][0]:.2f}"
                for label, r in (("vectorised", fast), ("loop", loop), ("float64 check loop", check))
            ),
        ]
    lines += ["", f"- uptime at end: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
