"""Remote shards: byte ranges through the block cache, whole shards once per node, `pipe:`
templates, and the faults of a network (dropped connections, stalls, 404, truncated answers, a
shard changed under its index). A real threaded HTTP server on 127.0.0.1 serves the shards."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import stat
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import assert_sample_equal, source_samples, tiny_root, tiny_shards  # noqa: F401
from http_server import FileServer
from test_shards import copy_split, flip_byte, shard_paths

from ognet.data.fetch import ReadOptions
from ognet.data.locations import file_location, join_location
from ognet.data.remote import RemoteOptions
from ognet.data.shards import ShardReader, load_index, shard_name, stream_split
from ognet.errors import ShardError

FAST = RemoteOptions(timeout_s=1.0, retries=2, backoff_s=0.01)


def options(tmp_path: Path, **kw) -> ReadOptions:
    return ReadOptions(cache_dir=str(tmp_path / "cache"), remote=kw.pop("remote", FAST), **kw)


def cached_files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def shard_gets(server: FileServer) -> list[tuple[str, str | None]]:
    return [(path, rng) for method, path, rng, _ in server.requests if method == "GET" and path.endswith(".tar")]


# ------------------------------------------------------------------------------------------------
# Byte ranges


def test_range_reads_fetch_exactly_the_samples_and_copy_nothing(tiny_root, tiny_shards, tmp_path):
    want = source_samples(tiny_root, "gallery")
    index = load_index(tiny_shards / "gallery")
    with FileServer(tiny_shards) as server:
        reader = ShardReader(f"{server.url}/gallery", options=options(tmp_path, cache_bytes=0))
        order = np.random.default_rng(1).permutation(len(want))
        for i in order:
            assert_sample_equal(reader[i], want[i])
        gets = shard_gets(server)
    assert not cached_files(tmp_path)  # no copy of anything on disk
    lengths = index.locations[:, 1]
    assert server.bytes_sent(".tar") == lengths.sum()  # each sample's bytes, once
    expected = [
        (
            f"/gallery/{index.shards[index.shard_ids[i]]['name']}",
            f"bytes={index.locations[i, 0]}-{index.locations[i, 0] + lengths[i] - 1}",
        )
        for i in order
    ]
    assert gets == expected


def test_block_cache_serves_repeats_and_stays_within_its_bound(tiny_root, tiny_shards, tmp_path):
    want = source_samples(tiny_root, "gallery")
    block = 8192
    with FileServer(tiny_shards) as server:
        reader = ShardReader(f"{server.url}/gallery", options=options(tmp_path, block_bytes=block, cache_bytes=2**30))
        for i in range(len(want)):
            assert_sample_equal(reader[i], want[i])
        first = server.bytes_sent(".tar")
        index = reader.index
        ends = [
            max(o + n for (o, n, _), s in zip(index.locations, index.shard_ids) if s == k)
            for k in range(len(index.shards))
        ]
        assert first == sum(
            min(-(-e // block) * block, s["bytes"]) for e, s in zip(ends, index.shards)
        )  # each block once
        for i in reversed(range(len(want))):
            assert_sample_equal(reader[i], want[i])
        assert server.bytes_sent(".tar") == first  # all from the cache
    assert all(p.stat().st_size <= block for p in cached_files(tmp_path))
    assert not [p for p in cached_files(tmp_path) if p.suffix == ".tar"]  # blocks, never whole shards

    bounded = tmp_path / "bounded"
    with FileServer(tiny_shards) as server:
        reader = ShardReader(
            f"{server.url}/gallery", options=options(bounded, block_bytes=block, cache_bytes=10 * block)
        )
        for i in range(len(want)):
            assert_sample_equal(reader[i], want[i])
    held = sum(p.stat().st_size for p in cached_files(bounded))
    assert 0 < held <= 10 * block + 2 * block  # trimmed each eighth of the bound: at most one batch over


def test_fsspec_file_urls_read_by_ranges(tiny_root, tiny_shards, tmp_path):
    want = source_samples(tiny_root, "query")
    reader = ShardReader(f"file://{tiny_shards}/query", options=options(tmp_path, cache_bytes=0))
    for i in range(len(want)):
        assert_sample_equal(reader[i], want[i])


# ------------------------------------------------------------------------------------------------
# Whole shards, once per node


def _read_all(args: tuple[str, str]) -> int:
    url, cache = args
    reader = ShardReader(url, options=ReadOptions(remote_cache="shard", cache_dir=cache, remote=FAST))
    return sum(reader[i].index for i in range(len(reader)))


def test_whole_shards_are_downloaded_once_per_node(tiny_root, tiny_shards, tmp_path):
    n = len(source_samples(tiny_root, "gallery"))
    cache = tmp_path / "cache"
    with FileServer(tiny_shards) as server:
        with mp.get_context("fork").Pool(4) as pool:  # four processes race for the same shards
            sums = pool.map(_read_all, [(f"{server.url}/gallery", str(cache))] * 4)
        assert sums == [n * (n - 1) // 2] * 4
        assert sorted(path for path, _ in shard_gets(server)) == [
            f"/gallery/{p.name}" for p in shard_paths(tiny_shards / "gallery")
        ]
        for entry in load_index(tiny_shards / "gallery").shards:
            copy = cache / entry["sha256"][:32] / entry["name"]
            assert copy.read_bytes() == (tiny_shards / "gallery" / entry["name"]).read_bytes()
        streamed = list(stream_split(f"{server.url}/gallery", cache_dir=cache))  # the same cache: no new GET
        assert len(shard_gets(server)) == len(shard_paths(tiny_shards / "gallery"))
    assert [s.index for s in streamed] == list(range(n))


def test_default_cache_is_node_local(monkeypatch, tmp_path):
    from ognet.data.cache import default_cache_dir

    monkeypatch.delenv("OGNET_CACHE", raising=False)
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "job"))
    assert default_cache_dir() == tmp_path / "job" / f"ognet-{os.getuid()}" / "shards"
    monkeypatch.delenv("SLURM_TMPDIR")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its answer
    assert default_cache_dir() == tmp_path / f"ognet-{os.getuid()}" / "shards"
    assert not str(default_cache_dir()).startswith(str(Path.home()))


# ------------------------------------------------------------------------------------------------
# Faults


def test_dropped_connections_are_retried_with_a_warning_naming_the_url(tiny_root, tiny_shards, tmp_path, caplog):
    want = source_samples(tiny_root, "query")
    with FileServer(tiny_shards) as server:
        reader = ShardReader(f"{server.url}/query", options=options(tmp_path, cache_bytes=0))
        server.faults.drop, server.faults.only = 2, ".tar"
        with caplog.at_level(logging.WARNING, logger="ognet.data.remote"):
            assert_sample_equal(reader[5], want[5])
    url = f"{server.url}/query/{shard_name(0)}"
    assert re.search(rf"{re.escape(url)} \(bytes \d+-\d+\): attempt 1/3 failed \(ClientPayloadError", caplog.text)
    assert "attempt 2/3 failed" in caplog.text


@pytest.mark.serial
def test_a_stalled_server_fails_within_the_timeout_naming_the_url_and_sample(tiny_shards, tmp_path):
    with FileServer(tiny_shards) as server:
        reader = ShardReader(f"{server.url}/query", options=options(tmp_path, cache_bytes=0))
        server.faults.stall, server.faults.only = 10, ".tar"
        tic = time.monotonic()
        with pytest.raises(ShardError) as info:
            reader[3]
        elapsed = time.monotonic() - tic
    url = f"{server.url}/query/{shard_name(0)}"
    assert re.match(
        rf"^sample 3: {re.escape(url)} \(bytes \d+-\d+\): failed after 3 attempts \(no answer within 1 s",
        str(info.value),
    )
    assert elapsed < 3 * (1 + 1) + 1  # three attempts of about a second each (fsspec checks once a second)


def test_missing_unreachable_and_truncated_shards_name_the_url_and_sample(tiny_shards, tmp_path):
    served = tmp_path / "served"
    folder = copy_split(tiny_shards / "query", served / "query")
    (folder / shard_name(1)).unlink()
    with FileServer(served) as server:
        reader = ShardReader(f"{server.url}/query", options=options(tmp_path, cache_bytes=0))
        with pytest.raises(ShardError, match=f"^sample 10: {re.escape(server.url)}/query/{shard_name(1)}: not found"):
            reader[10]
        server.faults.drop, server.faults.only = 10, ".tar"  # every answer cut in half
        with pytest.raises(
            ShardError,
            match=r"^sample 2: .*shard-000000.tar \(bytes \d+-\d+\): failed after 3 attempts \(ClientPayloadError",
        ):
            reader[2]
        url = server.url
    with pytest.raises(
        ShardError, match=f"^{re.escape(url)}/query/index.json: cannot read shard index: failed after 3 attempts"
    ):
        ShardReader(f"{url}/query", options=options(tmp_path))  # the server is gone


def test_a_shard_changed_under_its_index_is_named(tiny_shards, tmp_path):
    served = tmp_path / "served"
    folder = copy_split(tiny_shards / "query", served / "query")
    index = load_index(folder)
    flip_byte(folder / shard_name(0), int(index.locations[4, 0]) + 900)  # same size, other bytes
    with open(folder / shard_name(1), "ab") as f:
        f.write(b"\0" * 512)  # another size
    with FileServer(served) as server:
        for mode in ("range", "shard"):
            reader = ShardReader(f"{server.url}/query", options=options(tmp_path / mode, remote_cache=mode))
            url = f"{server.url}/query/"
            if mode == "range":
                reader[3]  # the same shard, another sample: fine
                with pytest.raises(ShardError, match=f"^{re.escape(url)}shard-000000.tar, sample 4: checksum mismatch"):
                    reader[4]
                with pytest.raises(
                    ShardError,
                    match=f"^sample 10: {re.escape(url)}shard-000001.tar: .* the shard changed under its index",
                ):
                    reader[10]
            else:
                with pytest.raises(
                    ShardError,
                    match=f"^sample 4: {re.escape(url)}shard-000000.tar: fetched shard does not match the index",
                ):
                    reader[4]
                assert not list((tmp_path / mode).rglob("shard-*.tar"))  # nothing bad was cached


def test_a_server_that_ignores_ranges_is_a_clear_error(tiny_shards, tmp_path):
    with FileServer(tiny_shards) as server:
        server.faults.ignore_ranges = True
        reader = ShardReader(f"{server.url}/query", options=options(tmp_path, cache_bytes=0))
        with pytest.raises(ShardError, match="does not serve byte ranges \\(use data.remote_cache=shard\\)"):
            reader[3]
        reader = ShardReader(f"{server.url}/query", options=options(tmp_path, remote_cache="shard"))
        assert reader[3].index == 3


# ------------------------------------------------------------------------------------------------
# pipe: templates


def test_the_readme_s3_example_works_as_written(tiny_root, tiny_shards, tmp_path, monkeypatch):
    """`pipe:aws s3 cp s3://bucket/market/{} -`, with an `aws` on PATH that copies from a folder as
    the real one copies from a bucket (and fails the same way on a missing key)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    aws = bin_dir / "aws"
    aws.write_text(
        "#!/bin/sh\n"
        '[ "$1 $2" = "s3 cp" ] && [ "$4" = "-" ] || { echo "usage: aws s3 cp SRC DST" >&2; exit 2; }\n'
        f'key="${{3#s3://bucket/market/}}"\n'
        f'[ -f "{tiny_shards}/$key" ] || {{ echo "fatal error: An error occurred (404) when calling the HeadObject operation: Key \\"$key\\" does not exist" >&2; exit 1; }}\n'
        f'cat "{tiny_shards}/$key"\n'
    )
    aws.chmod(aws.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    root = "pipe:aws s3 cp s3://bucket/market/{} -"
    location = join_location(root, "query")
    assert file_location(location, shard_name(1)) == f"pipe:aws s3 cp s3://bucket/market/query/{shard_name(1)} -"
    want = source_samples(tiny_root, "query")
    reader = ShardReader(location, options=options(tmp_path))
    for i in range(len(want)):
        assert_sample_equal(reader[i], want[i])
    with pytest.raises(ShardError) as info:
        ShardReader(join_location(root, "nowhere"), options=options(tmp_path))
    assert "exited with status 1: fatal error: An error occurred (404)" in str(info.value)
    assert 'Key "nowhere/index.json" does not exist' in str(info.value)


@pytest.mark.serial
def test_a_stalled_pipe_command_is_stopped_after_the_timeout(tiny_shards, tmp_path):
    shutil.copytree(tiny_shards / "query", tmp_path / "query")
    location = f"pipe:case {{}} in *.tar) sleep 60;; esac; cat {tmp_path}/query/{{}}"
    reader = ShardReader(location, options=options(tmp_path))
    tic = time.monotonic()
    with pytest.raises(
        ShardError,
        match=r"^sample 0: .*shard-000000.tar: failed after 3 attempts .*no output for 1 s, the command was stopped",
    ):
        reader[0]
    assert time.monotonic() - tic < 3 * 1 + 2


def test_crc_of_the_range_is_what_is_checked(tiny_shards):
    """The index's crc32 covers exactly the bytes a range read returns."""
    index = load_index(tiny_shards / "query")
    data = (tiny_shards / "query" / shard_name(0)).read_bytes()
    for i in np.flatnonzero(index.shard_ids == 0):
        offset, length, crc = index.locations[i]
        assert zlib.crc32(data[offset : offset + length]) == crc


# ------------------------------------------------------------------------------------------------
# End to end: 2-rank training and evaluation from the HTTP server


@pytest.mark.slow
def test_two_rank_training_and_evaluation_over_http_ranges_equal_local(tiny_shards, tmp_path):
    """torchrun, 2 ranks, data.root an HTTP URL read by byte ranges through 16 KiB blocks: the
    weights and metrics equal those of the same run on local files, and no shard is on disk."""
    from dist_scripts.procs import TORCHRUN, run
    from test_train import TRAIN, assert_same_weights, train_args

    cache = tmp_path / "cache"
    base = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", TRAIN]
    extra = ("train.epochs=1", "data.num_workers=1", "eval.rank_list_queries=0")
    run([*base, *train_args(tiny_shards, tmp_path / "local", *extra)], timeout=400)
    with FileServer(tiny_shards) as server:
        remote = (f"data.cache_dir={cache}", "data.block_bytes=16384")
        run([*base, *train_args(server.url, tmp_path / "http", *extra, *remote)], timeout=400)
        ranged = [rng for method, path, rng, _ in server.requests if method == "GET" and path.endswith(".tar")]
    assert ranged and all(r is not None for r in ranged)  # never a whole-shard GET
    assert_same_weights(tmp_path / "local" / "model_last.pt", tmp_path / "http" / "model_last.pt")
    local, http = (json.loads((tmp_path / r / "metrics-eval.json").read_text()) for r in ("local", "http"))
    assert local == http and local["num_queries"] == 12
    files = [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert files and all(p.stat().st_size <= 16384 for p in files) and not [p for p in files if p.suffix == ".tar"]
