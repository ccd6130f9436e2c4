"""Streaming mode: the shard plan, the identity-balanced buffer, training batches streamed from
local shards and from a real HTTP server (no copy on disk), exact resume, equal steps on every
rank, stream evaluation, and bad samples."""

from __future__ import annotations

import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch
from data_fixtures import tiny_shards  # noqa: F401
from http_server import FileServer
from test_shards import flip_byte

from ognet.config import load_config
from ognet.data.balance import IdentityBuffer
from ognet.data.loading import open_split, train_data
from ognet.data.shards import load_index, shard_name
from ognet.data.stream import epoch_shards
from ognet.dist import DistInfo
from ognet.errors import ConfigError, ShardError
from ognet.evaluate import _eval_loader
from ognet.evaluate import main as evaluate_main

pytestmark = pytest.mark.usefixtures("one_thread")


def rank_info(rank: int, world: int) -> DistInfo:
    return DistInfo(rank, rank, world, torch.device("cpu"), None, rank == 0)


def stream_config(root, *overrides: str):
    return load_config(
        None,
        [
            f"data.root={root}",
            "data.access=stream",
            "data.num_workers=2",
            "sampler.mode=pk",
            "sampler.k=2",
            "train.global_batch_size=8",
            "data.stream_buffer=24",
            "data.remote_retries=0",
            *overrides,
        ],
    )


def eval_loader(config, info: DistInfo, split: str = "gallery"):
    """Evaluation batches of this rank as ognet-eval reads them (either access mode)."""
    return _eval_loader(open_split(config.data, split), config, info)


def batches(config, rank: int = 0, world: int = 1, epoch: int = 0, start: int = 0) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() for t in b) for b in train_data(config, rank_info(rank, world)).loader(epoch, start)]


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y))


# ------------------------------------------------------------------------------------------------
# The plan and the buffer


def test_epoch_shards_are_disjoint_complete_and_reshuffled_per_epoch():
    for world, workers in ((1, 1), (2, 2), (3, 2)):
        plans = [epoch_shards(13, 7, 0, r, world, workers) for r in range(world)]
        flat = np.concatenate([s for plan in plans for s in plan])
        assert sorted(flat.tolist()) == list(range(13))
    assert [s.tolist() for s in epoch_shards(13, 7, 0, 1, 2, 2)] == [
        s.tolist() for s in epoch_shards(13, 7, 0, 1, 2, 2)
    ]
    assert epoch_shards(13, 7, 0, 0, 1, 1)[0].tolist() != epoch_shards(13, 7, 1, 0, 1, 1)[0].tolist()


def test_identity_buffer_bounds_and_pk_draws():
    labels = np.repeat(np.arange(50), 6)  # 50 identities x 6 samples, in identity order as packed
    camids = np.tile(np.arange(3), 100)
    buffer = IdentityBuffer(labels, 40, 5, np.random.default_rng(0), camids=camids)
    buffer.set_k(4)
    left = []
    for i in range(len(labels)):
        left += buffer.feed(i)
        assert len(buffer) <= 40 and all(len(m) <= 5 for m in buffer.held.values())
    assert len(left) == len(labels) - len(buffer)  # what left is exactly what is not held
    batch, gone = buffer.draw_pk(3, 4)
    ids = labels[batch].reshape(3, 4)
    assert (ids == ids[:, :1]).all() and len(set(ids[:, 0])) == 3  # 3 identities x 4
    assert all(len(set(row)) == 4 for row in batch.reshape(3, 4).tolist())  # distinct samples
    assert all(len(set(camids[row])) == 3 for row in batch.reshape(3, 4).tolist())  # every camera of the identity
    assert not set(ids[:, 0]) & set(buffer.held)  # drawn identities leave
    assert set(batch.tolist()) <= set(gone) and len(gone) == 3 * 5  # all their held samples left
    assert buffer.draw_pk(100, 4) is None


def test_identity_buffer_tops_up_identities_smaller_than_k():
    labels = np.array([0, 0, 1, 2, 2, 2])
    buffer = IdentityBuffer(labels, 10, 10, np.random.default_rng(0), expected={0: 2, 1: 1, 2: 3})
    buffer.set_k(3)
    for i in range(6):
        buffer.feed(i)
    batch, _ = buffer.draw_pk(3, 3)
    by_id = {int(labels[row[0]]): sorted(row) for row in batch.reshape(3, 3).tolist()}
    assert set(by_id[1]) == {2} and set(by_id[0]) == {0, 1} and by_id[2] == [3, 4, 5]


# ------------------------------------------------------------------------------------------------
# Training batches


@pytest.mark.parametrize("mode", ["pk", "balance"])
def test_stream_batches_are_deterministic_equal_on_ranks_and_resume_exactly(tiny_shards, mode):
    config = stream_config(tiny_shards, f"sampler.mode={mode}")
    index = load_index(tiny_shards / "train_all")
    for world in (1, 2):
        for rank in range(world):
            first = batches(config, rank, world)
            steps = train_data(config, rank_info(rank, world)).steps_per_epoch
            assert len(first) == steps == (8 // 4 if mode == "pk" else 48 // 8)  # the exact sampler's count
            assert_same(first, batches(config, rank, world))
            assert_same(first[3 % steps :], batches(config, rank, world, start=3 % steps))  # resume inside the epoch
            for xyz, _, labels in first:
                assert xyz.shape == (8 // world, 256, 3) and labels.min() >= 0 and labels.max() < index.num_classes
                if mode == "pk":  # whole identities of k=2 on each rank
                    assert (labels.view(-1, 2) == labels.view(-1, 2)[:, :1]).all()
                    assert len(set(labels.view(-1, 2)[:, 0].tolist())) == len(labels) // 2
        assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches(config, epoch=0), batches(config, epoch=1)))


def test_stream_from_http_equals_local_and_leaves_nothing_on_disk(tiny_shards, tmp_path):
    local = batches(stream_config(tiny_shards))
    cache = tmp_path / "cache"
    with FileServer(tiny_shards) as server:
        remote = batches(stream_config(server.url, f"data.cache_dir={cache}"))
        ranges = [rng for method, path, rng, _ in server.requests if method == "GET" and path.endswith(".tar")]
    assert_same(local, remote)
    assert ranges and all(r is not None and r.startswith("bytes=0-") for r in ranges)  # each shard read front to back
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


def test_stream_mode_refuses_what_it_cannot_do(tiny_shards):
    with pytest.raises(ConfigError, match="data.access = 'streaming' is not one of indexed, stream"):
        stream_config(tiny_shards, "data.access=streaming")
    with pytest.raises(ConfigError, match="sampler.mode='class_sampler' is not available with data.access=stream"):
        train_data(stream_config(tiny_shards, "sampler.mode=class_sampler"), rank_info(0, 1))
    config = stream_config(tiny_shards, "data.num_workers=0", "sampler.mode=balance", "train.global_batch_size=12")
    data = train_data(config, rank_info(5, 6))  # 5 shards, 6 ranks: the sixth has none
    with pytest.raises(ConfigError, match="stream mode: 5 shards for 6 ranks x 1 workers; every worker needs one"):
        list(data.loader(0))


# ------------------------------------------------------------------------------------------------
# Evaluation and bad samples


def test_stream_evaluation_covers_each_sample_once_as_indexed(tiny_shards):
    indexed = {}
    for xyz, _, index, _ in eval_loader(stream_config(tiny_shards, "data.access=indexed"), rank_info(0, 1)):
        indexed.update(zip(index.tolist(), xyz))
    seen = []
    for rank in range(2):
        for xyz, _, index, bad in eval_loader(stream_config(tiny_shards), rank_info(rank, 2)):
            assert not len(bad)
            seen += index.tolist()
            for i, x in zip(index.tolist(), xyz):
                assert torch.equal(x, indexed[i])
    assert sorted(seen) == list(range(len(indexed)))


def test_bad_samples_in_a_stream_are_named_or_counted(tiny_shards, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(tiny_shards, root)
    index = load_index(root / "gallery")
    flip_byte(root / "gallery" / shard_name(1), int(index.locations[13, 0]) + 700)
    (root / "gallery" / shard_name(3)).write_bytes(b"")  # samples 30..39 gone
    with pytest.raises(
        ShardError, match=f"^{re.escape(str(root / 'gallery' / shard_name(1)))}, sample 13: checksum mismatch"
    ):
        list(eval_loader(stream_config(root, "data.num_workers=0"), rank_info(1, 2)))
    left_out = []
    with caplog.at_level(logging.WARNING, logger="ognet.data.stream"):
        for rank in range(2):
            for _, _, _, bad in eval_loader(
                stream_config(root, "data.bad_samples=skip", "data.num_workers=0"), rank_info(rank, 2)
            ):
                left_out += bad.tolist()
    assert sorted(left_out) == [13, *range(30, 40)]
    assert f"{root / 'gallery' / shard_name(3)}, sample 30: shard is truncated" in caplog.text

    train = root / "train_all"
    index = load_index(train)
    flip_byte(train / shard_name(2), int(index.locations[23, 0]) + 700)
    with pytest.raises(ShardError, match=f"{re.escape(str(train / shard_name(2)))}, sample 23: checksum mismatch"):
        batches(stream_config(root, "sampler.mode=balance", "data.num_workers=0"))
    skipped = batches(stream_config(root, "sampler.mode=balance", "data.num_workers=0", "data.bad_samples=skip"))
    assert sum(int(b[3].sum()) for b in skipped) == 1 and len(skipped) == 6


# ------------------------------------------------------------------------------------------------
# End to end: 2-rank training and evaluation streamed from the HTTP server


@pytest.mark.slow
def test_two_rank_stream_training_and_evaluation_over_http_equal_local(tiny_shards, tmp_path):
    """torchrun, 2 ranks x 2 workers, data.access=stream from an HTTP URL and from the same files on
    disk: the same batches, so the same weights and metrics; the evaluation's metrics also equal
    those of indexed evaluation of the same weights; nothing is written to the cache."""
    from dist_scripts.procs import TORCHRUN, run, run_here
    from test_train import TRAIN, assert_same_weights, train_args

    cache = tmp_path / "cache"
    base = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", TRAIN]
    extra = ("train.epochs=1", "data.access=stream", "data.num_workers=2", "sampler.mode=pk", "sampler.k=2")
    extra += ("data.stream_buffer=20", "eval.rank_list_queries=0", f"data.cache_dir={cache}")
    run([*base, *train_args(tiny_shards, tmp_path / "local", *extra)], timeout=400)
    with FileServer(tiny_shards) as server:
        run([*base, *train_args(server.url, tmp_path / "http", *extra)], timeout=400)
        gets = [(path, rng) for method, path, rng, _ in server.requests if method == "GET" and path.endswith(".tar")]
    assert gets and all(rng is not None and rng.startswith("bytes=0-") for _, rng in gets)  # streamed, front to back
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]
    assert_same_weights(tmp_path / "local" / "model_last.pt", tmp_path / "http" / "model_last.pt")
    local, http = (json.loads((tmp_path / r / "metrics-eval.json").read_text()) for r in ("local", "http"))
    assert {k: v for k, v in local.items() if k != "step"} == {k: v for k, v in http.items() if k != "step"}
    assert local["num_queries"] == 12

    indexed = tmp_path / "indexed-eval"  # the same weights evaluated by offset, one process
    checkpoint = str(tmp_path / "http" / "model_last.pt")
    run_here(evaluate_main, ["--checkpoint", checkpoint, *train_args(tiny_shards, indexed, "eval.rank_list_queries=0")])
    again = json.loads((indexed / "metrics-eval.json").read_text())
    assert {k: again[k] for k in ("rank1", "mAP", "mINP")} == {k: local[k] for k in ("rank1", "mAP", "mINP")}
