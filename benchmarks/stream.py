"""Streaming and remote reading: throughput per worker, bytes per sample, and how close the stream
sampler's batches come to the exact sampler's.

    python benchmarks/stream.py [--samples 400] [--repeats 5] [--sim-samples 1000000 --sim-ids 100000]
                                [--out benchmarks/results/stream.md]

Part 1, throughput (one process = one DataLoader worker; samples decoded, no transform): the same
packed split (8192-point synthetic persons, 100 samples per shard) read
- local indexed: `ShardReader[i]` in a random order (the default path);
- local stream: every shard front to back (`shard_samples` + decode);
- HTTP stream: the same from a threaded HTTP server on 127.0.0.1 in another process;
- HTTP ranges: `ShardReader[i]` in a random order, one byte-range request per sample (no cache);
- HTTP ranges, 1 MiB block cache, cold and warm.
Bytes per sample are counted by the server. Median of `--repeats` interleaved passes.

Part 2, the stream sampler on a simulated stream (metadata only: sample indices and labels):
`--sim-samples` samples over `--sim-ids` identities (sizes 1 + Poisson(9)), packed in identity
order into shards of 1000 (as `ognet-pack` does), read by 8 ranks x 4 workers with a global batch
of 256 (pk: P = 64 x K = 4; balance: 256 draws). Per-identity draw counts per epoch against the
exact sampler on the same labels, the share of valid P x K batches, and the buffer's memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' HTTP file server

from common import load_average, provenance  # noqa: E402
from data_throughput import make_data  # noqa: E402

from ognet.data.balance import IdentityBuffer  # noqa: E402
from ognet.data.fetch import ReadOptions  # noqa: E402
from ognet.data.sampler import StratifiedSampler  # noqa: E402
from ognet.data.shards import ShardReader  # noqa: E402
from ognet.data.stream import buffered_draws, epoch_shards, shard_samples, worker_stream  # noqa: E402

SAMPLE_BYTES = 8192 * 6 * 4 + 3 * 512 + 2 * 128  # one float32 sample in a shard: arrays, tar headers, .npy headers


# ------------------------------------------------------------------------------------------------
# Part 1: throughput


def serve(folder: str, conn) -> None:
    """The HTTP server in its own process (its CPU time is not the reader's)."""
    from http_server import FileServer

    with FileServer(folder) as server:
        conn.send(server.url)
        while (message := conn.recv()) != "stop":
            conn.send(server.bytes_sent(".tar") if message == "bytes" else None)


def make_split(folder: Path, samples: int) -> Path:
    """The data_throughput benchmark's data: `samples` synthetic persons of 8192 points, packed 100 per shard."""
    return make_data(folder, samples, os.cpu_count() or 1)[1].parent


def passes(shards: Path, url: str, samples: int, cache: Path) -> dict:
    """Each path as a function reading `samples` samples and returning how many it read."""
    order = np.random.default_rng(0).permutation(samples)
    local = ShardReader(shards / "train_all")
    nocache = ReadOptions(cache_dir=str(cache / "none"), cache_bytes=0)

    def indexed(reader):
        return lambda: sum(1 for i in order if reader[int(i)] is not None)

    def stream(reader):
        return lambda: sum(
            1
            for s in range(len(reader.index.shards))
            for i, d in shard_samples(reader, s, False)
            if reader.decode(i, d) and i < samples
        )

    def cold_blocks():
        for p in (cache / "blocks").rglob("*"):
            if p.is_file():
                p.unlink()
        return indexed(ShardReader(f"{url}/train_all", options=ReadOptions(cache_dir=str(cache))))()

    warm = ShardReader(f"{url}/train_all", options=ReadOptions(cache_dir=str(cache)))
    return {
        "local indexed (baseline)": indexed(local),
        "local stream": stream(local),
        "HTTP stream": stream(ShardReader(f"{url}/train_all", options=nocache)),
        "HTTP ranges, no cache": indexed(ShardReader(f"{url}/train_all", options=nocache)),
        "HTTP ranges, 1 MiB blocks, cold": cold_blocks,
        "HTTP ranges, 1 MiB blocks, warm": indexed(warm),
    }


def throughput(samples: int, repeats: int) -> tuple[list[str], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.time()
        shards = make_split(Path(tmp), samples)
        n = len(ShardReader(shards / "train_all"))
        made = time.time() - tic
        parent, child = mp.get_context("spawn").Pipe()
        server = mp.get_context("spawn").Process(target=serve, args=(str(shards), child), daemon=True)
        server.start()
        url = parent.recv()
        runs = passes(shards, url, n, Path(tmp) / "cache")
        rates = {name: [] for name in runs}
        sent = {name: [] for name in runs}
        for run in runs.values():
            run()  # warm-up: imports, connections, page cache (and the warm block cache)
        for _ in range(repeats):
            for name, run in runs.items():
                parent.send("bytes")
                before = parent.recv()
                tic = time.perf_counter()
                count = run()
                rates[name].append(count / (time.perf_counter() - tic))
                parent.send("bytes")
                sent[name].append((parent.recv() - before) / count)
        parent.send("stop")
        server.join(10)
    base = statistics.median(rates["local indexed (baseline)"])
    lines = [
        f"- {n} samples of 8192 points in shards of 100 (float32, {SAMPLE_BYTES / 1000:.0f} kB/sample); data made in {made:.0f} s",
        "",
        "| path | samples/s (wall) | passes | vs local indexed | bytes over HTTP per sample |",
        "|---|---:|---|---:|---:|",
    ]
    for name, r in rates.items():
        m = statistics.median(r)
        b = statistics.median(sent[name])
        lines.append(
            f"| {name} | {m:,.0f} | {', '.join(f'{x:,.0f}' for x in r)} | {m / base:.2f}x | {b:,.0f} ({b / SAMPLE_BYTES:.2f} samples) |"
        )
    return lines, rates


# ------------------------------------------------------------------------------------------------
# Part 2: the stream sampler on a simulated stream


@dataclasses.dataclass
class Sim:
    labels: np.ndarray
    shard_of: np.ndarray
    shard_members: list[np.ndarray]
    ranks: int = 8
    workers: int = 4
    batch: int = 256
    k: int = 4


def simulated(samples: int, ids: int, seed: int = 0) -> Sim:
    rng = np.random.default_rng(seed)
    sizes = 1 + rng.poisson(9, ids)
    labels = np.repeat(np.arange(ids), sizes)[:samples]
    shard_of = np.arange(len(labels)) // 1000
    members = np.split(np.arange(len(labels)), np.flatnonzero(np.diff(shard_of)) + 1)
    return Sim(labels, shard_of, members)


def simulate_epoch(
    sim: Sim, mode: str, buffer: int, epoch: int, seed: int = 0
) -> tuple[np.ndarray, list[np.ndarray], int]:
    """All ranks' and workers' draws of one epoch: (per-sample draw counts, per-rank batches, max held)."""
    c = len(np.unique(sim.labels))
    steps = (c // (sim.batch // sim.k)) if mode == "pk" else len(sim.labels) // sim.batch
    local = sim.batch // sim.ranks
    drawn = np.zeros(len(sim.labels), dtype=np.int64)
    batches, held_max = [], 0
    for rank in range(sim.ranks):
        plan = epoch_shards(len(sim.shard_members), seed, epoch, rank, sim.ranks, sim.workers)
        for w, shards in enumerate(plan):
            mine = np.concatenate([sim.shard_members[s] for s in shards])
            labels, counts = np.unique(sim.labels[mine], return_counts=True)
            buf = IdentityBuffer(
                sim.labels,
                buffer,
                min(buffer, 64),
                np.random.default_rng([seed, epoch, rank, w, 0]),
                dict(zip(labels.tolist(), counts.tolist())),
            )
            stream = worker_stream(
                shards, lambda s: ((int(i), True) for i in sim.shard_members[s]), seed, epoch, rank, w
            )
            n = len(range(w, steps, sim.workers))
            for batch, held, _ in buffered_draws(stream, buf, mode, local, sim.k, n, len(mine)):
                np.add.at(drawn, batch, 1)
                batches.append(batch)
                held_max = max(held_max, len(held))
    return drawn, batches, held_max


def exact_epoch(sim: Sim, mode: str, epoch: int) -> np.ndarray:
    sampler = StratifiedSampler(sim.labels, global_batch_size=sim.batch, mode=mode, k=sim.k)
    drawn = np.zeros(len(sim.labels), dtype=np.int64)
    np.add.at(drawn, sampler._schedule(epoch).ravel(), 1)
    return drawn


def per_identity(sim: Sim, drawn: np.ndarray) -> np.ndarray:
    return np.bincount(sim.labels, weights=drawn, minlength=sim.labels.max() + 1)


def valid_pk(sim: Sim, batches: list[np.ndarray], sizes: np.ndarray) -> float:
    """Share of per-rank batches of P distinct identities x K distinct samples (K repeats allowed
    only for identities with fewer than K samples, as the exact sampler does)."""
    good = 0
    for b in batches:
        rows = b.reshape(-1, sim.k)
        ids = sim.labels[rows[:, 0]]
        same = (sim.labels[rows] == ids[:, None]).all()
        distinct = all(len(set(r)) == min(sim.k, sizes[i]) for r, i in zip(rows.tolist(), ids.tolist()))
        good += same and len(set(ids.tolist())) == len(ids) and distinct
    return good / len(batches)


def sampler_stats(samples: int, ids: int, buffers: list[int]) -> list[str]:
    sim = simulated(samples, ids)
    sizes = np.bincount(sim.labels)
    lines = [
        f"- {len(sim.labels):,} samples over {len(sizes):,} identities (sizes 1 + Poisson(9): {sizes.min()}..{sizes.max()}, mean {sizes.mean():.1f}), "
        f"{len(sim.shard_members)} shards of 1000 in identity order; {sim.ranks} ranks x {sim.workers} workers, global batch {sim.batch} (pk: P {sim.batch // sim.k} x K {sim.k})",
        "",
        "pk, one epoch (the exact sampler draws every identity once, except the last C mod P):",
        "",
        "| sampler | buffer (samples per worker) | identities drawn 0 / 1 / 2+ times | valid P x K batches | peak held per worker | memory at 8192 points | time |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    exact = per_identity(sim, exact_epoch(sim, "pk", 0)) / sim.k
    lines.append(f"| exact | - | {_share(exact)} | 100 % | - | - | - |")
    for buffer in buffers:
        tic = time.time()
        drawn, batches, held = simulate_epoch(sim, "pk", buffer, 0)
        counts = per_identity(sim, drawn) / sim.k
        lines.append(
            f"| stream | {buffer:,} | {_share(counts)} | {100 * valid_pk(sim, batches, sizes):.1f} % | {held:,} | "
            f"{held * SAMPLE_BYTES / 2**20:,.0f} MiB | {time.time() - tic:.0f} s |"
        )
    lines += [
        "",
        "balance, one epoch (N draws; per identity the exact sampler's count is binomial around N/C):",
        "",
        "| sampler | buffer | draws per identity: mean, std, CV | identities never drawn | samples drawn at least once | time |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, buffer in [("exact", None), *[("stream", b) for b in buffers]]:
        tic = time.time()
        drawn = exact_epoch(sim, "balance", 0) if buffer is None else simulate_epoch(sim, "balance", buffer, 0)[0]
        counts = per_identity(sim, drawn)
        lines.append(
            f"| {name} | {buffer or '-'} | {counts.mean():.2f}, {counts.std():.2f}, {counts.std() / counts.mean():.3f} | "
            f"{100 * (counts == 0).mean():.2f} % | {100 * (drawn > 0).mean():.1f} % | {time.time() - tic:.0f} s |"
        )
    return lines


def _share(counts: np.ndarray) -> str:
    return " / ".join(f"{100 * x:.1f} %" for x in ((counts == 0).mean(), (counts == 1).mean(), (counts >= 2).mean()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sim-samples", type=int, default=1_000_000)
    p.add_argument("--sim-ids", type=int, default=100_000)
    p.add_argument("--buffers", type=int, nargs="+", default=[500, 1000, 2000])
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    head = [*provenance("Streaming and remote reading"), f"- load average at start: {load_average()}"]
    part1, _ = throughput(args.samples, args.repeats)
    part2 = sampler_stats(args.sim_samples, args.sim_ids, args.buffers)
    report = "\n".join(
        [
            *head,
            f"- load average at end: {load_average()}",
            "",
            "## Throughput per worker",
            "",
            *part1,
            "",
            "## The stream sampler",
            "",
            *part2,
            "",
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
