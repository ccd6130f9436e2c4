"""Packing and reading shards: round trips, the index, foreign readers, resume, verify, corruption,
remote locations, hostile tars, and the DataLoader path over them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import require_program
from data_fixtures import MAX_COUNT, TINY, TINY_SPLITS, assert_sample_equal, source_samples, tiny_root, tiny_shards  # noqa: F401
from torch.utils.data import DataLoader

from ognet.data.dataset import EvalSet, SamplerBatches, TrainSet, train_loader
from ognet.data.layouts import label_map, scan_split
from ognet.data.pack import PARTS_DIR, PackOptions, pack_dataset, verify_main, verify_split
from ognet.data.pack import main as pack_main
from ognet.data.sampler import StratifiedSampler
from ognet.data.shards import (
    INDEX_NAME,
    ShardIndex,
    ShardReader,
    decode_sample,
    encode_sample,
    load_index,
    read_npy,
    read_tar_members,
    shard_name,
    stream_split,
    write_shard,
)
from ognet.data.transforms import TransformConfig, transform
from ognet.errors import DataError, ShardError

NO_PROGRESS = PackOptions(max_count=MAX_COUNT, workers=1, progress=False)


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file of a packed split folder (hidden ones included), by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def shard_paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.tar"))


def copy_split(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------
# Round trips: the shards hold exactly what the reader returns from the source files


@pytest.mark.parametrize("split", TINY_SPLITS)
def test_shard_reader_round_trip_in_random_order(tiny_root, tiny_shards, split):
    reader = ShardReader(tiny_shards / split, cache_dir=None)
    want = source_samples(tiny_root, split)
    assert len(reader) == len(want) == len(scan_split(tiny_root, split))
    for i in np.random.default_rng(0).permutation(len(want)):
        assert_sample_equal(reader[i], want[i])
    assert_sample_equal(reader[-1], want[-1])
    with pytest.raises(IndexError):
        reader[len(want)]


def test_plain_webdataset_reads_the_shards(tiny_root, tiny_shards):
    """No ognet code on the reading side: webdataset's own decoder gives arrays and dicts."""
    for split in TINY_SPLITS:
        urls = [str(p) for p in shard_paths(tiny_shards / split)]
        got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
        want = source_samples(tiny_root, split)
        assert len(got) == len(want)
        for sample, w in zip(got, want):
            assert sample["__key__"] == f"{w['index']:08d}"
            assert sample["xyz.npy"].dtype == np.float32 and sample["rgb.npy"].dtype == np.float32
            np.testing.assert_array_equal(sample["xyz.npy"], w["xyz"])
            np.testing.assert_array_equal(sample["rgb.npy"], w["rgb"])
            assert sample["json"] == {k: w[k] for k in ("index", "pid", "camid", "label", "path")}


@pytest.mark.parametrize("split", TINY_SPLITS)
def test_tar_lists_and_extracts_the_shards(tiny_root, tiny_shards, tmp_path, split):
    tar = require_program("tar", "GNU tar must read the shards")
    want = source_samples(tiny_root, split)
    names = []
    for path in shard_paths(tiny_shards / split):
        names += subprocess.run([tar, "-tf", str(path)], check=True, capture_output=True, text=True).stdout.split()
        subprocess.run([tar, "-xf", str(path), "-C", str(tmp_path)], check=True)
    assert names == [f"{i:08d}.{field}" for i in range(len(want)) for field in ("xyz.npy", "rgb.npy", "json")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    for w in want:
        key = tmp_path / f"{w['index']:08d}"
        np.testing.assert_array_equal(np.load(f"{key}.xyz.npy", allow_pickle=False), w["xyz"])
        np.testing.assert_array_equal(np.load(f"{key}.rgb.npy", allow_pickle=False), w["rgb"])
        assert json.loads(Path(f"{key}.json").read_text()) == {
            k: w[k] for k in ("index", "pid", "camid", "label", "path")
        }


@pytest.mark.parametrize("split", TINY_SPLITS)
def test_stream_split_yields_what_the_shard_reader_does(tiny_shards, tmp_path, split):
    reader = ShardReader(tiny_shards / split)
    streamed = list(stream_split(tiny_shards / split, cache_dir=tmp_path))
    assert len(streamed) == len(reader)
    for s in streamed:
        r = reader[s.index]
        assert (s.index, s.pid, s.camid, s.label, s.path) == (r.index, r.pid, r.camid, r.label, r.path)
        np.testing.assert_array_equal(s.xyz, r.xyz)
        np.testing.assert_array_equal(s.rgb, r.rgb)
    assert [s.index for s in streamed] == list(range(len(reader)))


# ------------------------------------------------------------------------------------------------
# The index


@pytest.mark.parametrize("split", TINY_SPLITS)
def test_index_matches_the_shards_and_the_sources(tiny_root, tiny_shards, split):
    folder = tiny_shards / split
    raw = json.loads((folder / INDEX_NAME).read_text())
    assert (raw["format"], raw["version"], raw["split"], raw["colors"]) == ("ognet-shards", 1, split, "float32")
    index = load_index(folder)
    samples = scan_split(tiny_root, split)
    train = scan_split(tiny_root, "train_all")
    n = len(samples)
    assert raw["num_samples"] == len(index) == n

    # shards: names, counts, sizes, checksums
    counts = [min(MAX_COUNT, n - start) for start in range(0, n, MAX_COUNT)]
    assert [s["name"] for s in index.shards] == [shard_name(i) for i in range(len(counts))]
    assert [p.name for p in shard_paths(folder)] == [s["name"] for s in index.shards]
    assert [s["num_samples"] for s in index.shards] == counts
    for entry in index.shards:
        data = (folder / entry["name"]).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()

    # per sample metadata and the label map (labels: index of the pid among the sorted training pids)
    labels = {pid: i for i, pid in enumerate(sorted({s.pid for s in train}))}
    assert index.label_map == labels == label_map(train) and index.num_classes == TINY.train_ids
    assert raw["label_map"] == {str(k): v for k, v in labels.items()}
    assert index.pids.tolist() == [s.pid for s in samples]
    assert index.camids.tolist() == [s.camid for s in samples]
    assert index.paths == [s.path for s in samples]
    assert index.labels.tolist() == [labels.get(s.pid, -1) for s in samples]
    if split == "train_all":
        assert (index.labels >= 0).all()
        assert index.class_counts().tolist() == [sum(s.pid == pid for s in train) for pid in sorted(labels)]
    else:  # test identities are not training classes
        assert (index.labels == -1).all() and index.class_counts().sum() == 0
    assert raw["class_counts"] == index.class_counts().tolist()
    assert index.shard_ids.tolist() == [i // MAX_COUNT for i in range(n)]

    # locations: each sample's byte range holds exactly its three members, and the ranges tile the shard
    for shard, entry in enumerate(index.shards):
        data = (folder / entry["name"]).read_bytes()
        rows = index.locations[index.shard_ids == shard]
        assert rows[0, 0] == 0
        assert (rows[1:, 0] == rows[:-1, 0] + rows[:-1, 1]).all()
        assert rows[-1, 0] + rows[-1, 1] + 1024 <= len(data)  # then the tar's end-of-archive blocks
        for i, (offset, length, crc) in zip(np.flatnonzero(index.shard_ids == shard), rows):
            chunk = data[offset : offset + length]
            assert zlib.crc32(chunk) == crc
            assert [name for name, _ in read_tar_members(chunk, "t")] == [
                f"{i:08d}.xyz.npy",
                f"{i:08d}.rgb.npy",
                f"{i:08d}.json",
            ]


def test_malformed_indexes_are_refused(tiny_shards, tmp_path):
    folder = copy_split(tiny_shards / "query", tmp_path / "q")
    good = json.loads((folder / INDEX_NAME).read_text())

    def refused(data, message: str) -> None:
        (folder / INDEX_NAME).write_text(data if isinstance(data, str) else json.dumps(data))
        with pytest.raises(ShardError, match=f"^{re.escape(str(folder / INDEX_NAME))}: .*{message}"):
            ShardReader(folder)

    refused("{not json", "not valid JSON")
    refused({**good, "format": "something"}, "not an ognet shard index")
    refused({**good, "version": 99}, "index version 99")
    refused({**good, "num_samples": 13}, "disagree in length")
    refused({**good, "samples": {**good["samples"], "pid": good["samples"]["pid"][:-1]}}, "disagree in length")
    bad_shards = [dict(good["shards"][0], name="../etc/passwd")] + good["shards"][1:]
    refused({**good, "shards": bad_shards}, "not a plain file name")
    bad_counts = [dict(good["shards"][0], num_samples=3)] + good["shards"][1:]
    refused({**good, "shards": bad_counts}, "lists 3 samples")
    location = [list(row) for row in good["samples"]["location"]]
    location[4][0] = good["shards"][0]["bytes"]
    refused({**good, "samples": {**good["samples"], "location": location}}, "outside its shard")
    del good["label_map"]
    refused(good, "malformed index")
    (folder / INDEX_NAME).unlink()
    with pytest.raises(ShardError, match="index.json: cannot read shard index"):
        ShardReader(folder)


# ------------------------------------------------------------------------------------------------
# Packing options: determinism, parallelism, uint8 colours, shard sizes


def test_repack_with_two_workers_is_byte_identical(tiny_root, tiny_shards, tmp_path):
    out = tmp_path / "again"
    pack_dataset(tiny_root, out, options=PackOptions(max_count=MAX_COUNT, workers=2, progress=False))
    for split in TINY_SPLITS:
        assert files_of(out / split) == files_of(tiny_shards / split)  # index.json and every shard
        assert not (out / split / PARTS_DIR).exists()


def test_uint8_colours_within_half_a_step(tiny_root, tiny_shards, tmp_path):
    index = pack_dataset(
        tiny_root, tmp_path, ["train_all"], PackOptions(max_count=MAX_COUNT, colors="uint8", workers=1, progress=False)
    )["train_all"]
    assert index.colors == "uint8" and load_index(tmp_path / "train_all").colors == "uint8"
    reader = ShardReader(tmp_path / "train_all")
    for w in source_samples(tiny_root, "train_all"):
        s = reader[w["index"]]
        np.testing.assert_array_equal(s.xyz, w["xyz"])  # coordinates stay lossless
        assert s.rgb.dtype == np.float32
        assert np.abs(s.rgb - w["rgb"]).max() <= 0.5 / 255 + 1e-7
        np.testing.assert_allclose(s.rgb * 255, np.rint(s.rgb * 255), atol=1e-4)
    stored = next(
        iter(wds.WebDataset([str(p) for p in shard_paths(tmp_path / "train_all")], shardshuffle=False).decode())
    )
    assert stored["rgb.npy"].dtype == np.uint8
    uint8_bytes = sum(p.stat().st_size for p in shard_paths(tmp_path / "train_all"))
    float_bytes = sum(p.stat().st_size for p in shard_paths(tiny_shards / "train_all"))
    assert uint8_bytes < 0.75 * float_bytes


def test_max_count_and_max_bytes(tiny_root, tiny_shards, tmp_path):
    def counts(name: str, **options) -> list[int]:
        opts = PackOptions(workers=1, progress=False, **options)
        return [
            s["num_samples"] for s in pack_dataset(tiny_root, tmp_path / name, ["train_all"], opts)["train_all"].shards
        ]

    assert counts("c7", max_count=7) == [7] * 6 + [6]
    assert counts("c100", max_count=100) == [48]
    sample_bytes = int(load_index(tiny_shards / "train_all").locations[0, 1])
    limit = int(3.5 * sample_bytes)
    by_bytes = counts("b", max_bytes=limit)
    assert sum(by_bytes) == 48 and len(set(by_bytes[:-1])) == 1 and 1 <= by_bytes[0] <= 3
    index = load_index(tmp_path / "b" / "train_all")
    for shard in range(len(index.shards)):  # the samples of a shard fit the byte budget
        assert index.locations[index.shard_ids == shard, 1].sum() <= limit
    assert counts("tiny", max_bytes=100) == [1] * 48  # at least one sample per shard
    assert counts("both", max_count=2, max_bytes=10**9) == [2] * 24
    with pytest.raises(DataError, match="max_count must be >= 1"):
        counts("zero", max_count=0)


def test_pack_and_verify_commands(tiny_root, tmp_path, capsys):
    pack_main([str(tiny_root), str(tmp_path / "out"), "--splits", "query", "--max-count", "5", "--workers", "1"])
    assert "query: 12 samples, 8 classes, 3 shards" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        verify_main([str(tmp_path / "out" / "query")])
    assert info.value.code == 0 and "ok {'split': 'query'" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        verify_main([str(tmp_path / "out" / "query"), str(tmp_path / "nothing")])
    assert info.value.code == 1 and "nothing: FAILED" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="ognet-pack: error: .*no split folders"):
        pack_main([str(tmp_path / "empty"), str(tmp_path / "out2")])


def test_pack_refuses_an_empty_split(tmp_path):
    (tmp_path / "data" / "query" / "0001").mkdir(parents=True)
    with pytest.raises(DataError, match="empty split"):
        pack_dataset(tmp_path / "data", tmp_path / "out", options=NO_PROGRESS)


# ------------------------------------------------------------------------------------------------
# Interrupted packing resumes; every shard is written atomically


def train_only_copy(tiny_root: Path, dst: Path) -> Path:
    shutil.copytree(tiny_root / "train_all", dst / "train_all")
    return dst


def test_failed_pack_resumes_writing_only_the_missing_shards(tiny_root, tiny_shards, tmp_path):
    root = train_only_copy(tiny_root, tmp_path / "data")
    out = tmp_path / "out"
    bad = root / scan_split(root, "train_all")[2 * MAX_COUNT].path  # the first sample of shard 2
    good_text = bad.read_bytes()
    bad.write_text("v 1 2 3\nv 4 5 6\n")  # no colours: packing stops at shard 2
    with pytest.raises(DataError, match=f"^{re.escape(str(bad))}: points have no colours"):
        pack_dataset(root, out, options=NO_PROGRESS)

    folder = out / "train_all"
    assert [p.name for p in shard_paths(folder)] == [shard_name(0), shard_name(1)]  # complete shards only
    assert not (folder / INDEX_NAME).exists()
    assert not [p for p in folder.rglob("*") if p.name.endswith(".partial")]
    for p in shard_paths(folder):
        os.utime(p, ns=(10**18, 10**18))  # mark them: a rewrite would change the mtime

    bad.write_bytes(good_text)
    pack_dataset(root, out, options=PackOptions(max_count=MAX_COUNT, workers=2, progress=False))
    mtimes = {p.name: p.stat().st_mtime_ns for p in shard_paths(folder)}
    assert [name for name, t in mtimes.items() if t == 10**18] == [shard_name(0), shard_name(1)]
    assert len(mtimes) == 5
    assert files_of(folder) == files_of(tiny_shards / "train_all")
    assert verify_split(folder)["samples"] == 48


SLOW_PACK = """
import sys, time
import ognet.data.pack as pack
read = pack.read_points
def slow_read(path, *args, **kwargs):
    time.sleep(0.03)
    return read(path, *args, **kwargs)
pack.read_points = slow_read
pack.pack_dataset(sys.argv[1], sys.argv[2], ["train_all"], pack.PackOptions(max_count=4, workers=1, progress=False))
"""


def test_killed_pack_leaves_complete_shards_and_resumes(tiny_root, tmp_path):
    root = train_only_copy(tiny_root, tmp_path / "data")
    out, clean = tmp_path / "out", tmp_path / "clean"
    folder = out / "train_all"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PACK, str(root), str(out)])
    try:
        deadline = time.monotonic() + 60
        while not (folder / PARTS_DIR / f"{shard_name(2)}.json").exists():
            assert proc.poll() is None, "the packing process ended before it could be killed"
            assert time.monotonic() < deadline, "packing made no progress in 60 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (folder / INDEX_NAME).exists()
    present = {p.name: p.read_bytes() for p in shard_paths(folder)}
    done = {
        p.name: p.stat().st_mtime_ns for p in shard_paths(folder) if (folder / PARTS_DIR / f"{p.name}.json").exists()
    }  # complete and recorded as such
    assert 3 <= len(done) <= len(present) < 12  # 48 samples, 4 per shard: killed part-way

    pack_dataset(root, out, ["train_all"], PackOptions(max_count=4, workers=1, progress=False))
    pack_dataset(root, clean, ["train_all"], PackOptions(max_count=4, workers=1, progress=False))
    for name, data in present.items():  # every shard file there was complete
        assert data == (clean / "train_all" / name).read_bytes()
    for name, mtime in done.items():  # and the recorded ones were not written again
        assert (folder / name).stat().st_mtime_ns == mtime
    resumed = {k: v for k, v in files_of(folder).items() if not k.endswith(".partial")}  # a killed write's leftover
    assert resumed == files_of(clean / "train_all")


# ------------------------------------------------------------------------------------------------
# verify, and reading damaged shards


def test_verify_passes_on_good_shards(tiny_shards):
    total = sum(p.stat().st_size for p in shard_paths(tiny_shards / "train_all"))
    assert verify_split(tiny_shards / "train_all") == {
        "split": "train_all",
        "shards": 5,
        "samples": 48,
        "classes": 8,
        "bytes": total,
    }


def test_verify_names_the_shard_and_sample_at_fault(tiny_shards, tmp_path):
    folder = copy_split(tiny_shards / "train_all", tmp_path / "t")
    index = load_index(folder)
    shard2 = folder / shard_name(2)
    original = shard2.read_bytes()

    flip_byte(shard2, int(index.locations[23, 0]) + 700)  # inside sample 23's coordinates
    with pytest.raises(ShardError, match=f"^{re.escape(str(shard2))}, sample 23: checksum mismatch"):
        verify_split(folder)
    shard2.write_bytes(original)
    flip_byte(shard2, len(original) - 10)  # in the tar's end padding: no sample is hurt, the shard is
    with pytest.raises(ShardError, match=f"^{re.escape(str(shard2))}: sha256 mismatch"):
        verify_split(folder)
    shard2.write_bytes(original[:5000])
    with pytest.raises(ShardError, match=f"^{re.escape(str(shard2))}: 5000 bytes, the index says {len(original)}"):
        verify_split(folder)
    shard2.unlink()
    with pytest.raises(ShardError, match=f"^{re.escape(str(shard2))}: missing or unreadable shard"):
        verify_split(folder)


def test_reader_names_the_shard_and_sample_of_corrupt_or_truncated_data(tiny_shards, tmp_path):
    folder = copy_split(tiny_shards / "train_all", tmp_path / "t")
    index = load_index(folder)
    flip_byte(folder / shard_name(2), int(index.locations[23, 0]) + 700)
    last = folder / shard_name(4)  # samples 40..47
    last.write_bytes(last.read_bytes()[: int(index.locations[44, 0]) + 100])  # cut inside sample 44
    reader = ShardReader(folder)
    with pytest.raises(ShardError, match=f"^{re.escape(str(folder / shard_name(2)))}, sample 23: checksum mismatch"):
        reader[23]
    with pytest.raises(ShardError, match=f"^{re.escape(str(last))}, sample 44: shard is truncated"):
        reader[44]
    for i in (22, 24, 43):  # the rest of those shards still reads
        assert reader[i].index == i
    (folder / shard_name(0)).unlink()
    with pytest.raises(ShardError, match=f"{re.escape(str(folder / shard_name(0)))}: cannot open shard"):
        ShardReader(folder)[0]


def test_stream_split_refuses_truncated_and_corrupt_shards(tiny_shards, tmp_path):
    folder = copy_split(tiny_shards / "train_all", tmp_path / "t")
    index = load_index(folder)
    shard1 = folder / shard_name(1)
    original = shard1.read_bytes()
    shard1.write_bytes(original[:20000])
    with pytest.raises(ShardError, match=f"^{re.escape(str(shard1))}: 20000 bytes, the index says"):
        list(stream_split(folder, cache_dir=tmp_path))
    # a damaged member header: tarfile's stream mode would just end the shard there
    shard1.write_bytes(original)
    flip_byte(shard1, int(index.locations[13, 0]) + 3)
    with pytest.raises(ShardError, match=f"{re.escape(str(shard1))}: 3 samples read, the index lists 10"):
        list(stream_split(folder, cache_dir=tmp_path))
    shard1.write_bytes(original)
    flip_byte(shard1, 3)  # the shard's very first header
    with pytest.raises(ShardError, match=f"corrupt tar data after .*sample 00000009 .*{re.escape(str(shard1))}"):
        list(stream_split(folder, cache_dir=tmp_path))
    shard1.unlink()
    with pytest.raises(ShardError, match=f"^{re.escape(str(shard1))}: missing or unreadable shard"):
        list(stream_split(folder, cache_dir=tmp_path))


# ------------------------------------------------------------------------------------------------
# Hostile tar members


def tar_bytes(*members: tarfile.TarInfo) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info in members:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 4, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size if kind == tarfile.REGTYPE else 0, target
    return info


@pytest.mark.parametrize(
    "info,message",
    [
        (member("/etc/passwd"), "member name '/etc/passwd' is not a plain file name"),
        (member("../00000000.xyz.npy"), "member name '../00000000.xyz.npy' is not a plain file name"),
        (member("a/../../00000000.json"), "member name 'a/../../00000000.json' is not a plain file name"),
        (member(".hidden"), "member name '.hidden' is not a plain file name"),
        (
            member("00000000.xyz.npy", tarfile.SYMTYPE, target="/etc/passwd"),
            "member '00000000.xyz.npy' is not a regular file",
        ),
        (
            member("00000000.rgb.npy", tarfile.LNKTYPE, target="00000000.xyz.npy"),
            "member '00000000.rgb.npy' is not a regular file",
        ),
        (member("somedir", tarfile.DIRTYPE), "member 'somedir/' is not a regular file"),  # tar's own spelling
    ],
)
def test_hostile_tar_members_are_refused(info, message):
    data = tar_bytes(member("00000000.json"), info)
    with pytest.raises(ShardError, match=f"^shard-000000.tar, sample 0: {re.escape(message)}"):
        list(read_tar_members(data, "shard-000000.tar, sample 0"))


def test_garbage_and_truncated_tar_data_are_refused():
    data = tar_bytes(member("00000000.json", size=3000))
    with pytest.raises(ShardError, match="^w: member '00000000.json' is truncated|^w: corrupt tar data"):
        list(read_tar_members(data[:2000], "w"))
    with pytest.raises(ShardError, match="^w: corrupt tar data"):
        list(read_tar_members(b"\x01" * 1024, "w"))


def test_tar_parser_agrees_with_tarfile(tiny_shards):
    """The reader's small ustar parser returns what tarfile does, whole shards included."""
    folder = tiny_shards / "gallery"
    for entry in load_index(folder).shards:
        data = (folder / entry["name"]).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            want = [(m.name, tar.extractfile(m).read()) for m in tar]
        assert list(read_tar_members(data, "t")) == want


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_extension_headers_and_name_prefixes_are_read(fmt):
    """Long names as ustar prefixes, GNU long-name headers and PAX headers (with a large uid and
    a float mtime, as webdataset.TarWriter writes) all give the names tarfile gives."""
    names = ["d" * 90 + "/" + "0" * 60 + ".json", "short/00000001.json"]
    if fmt != tarfile.USTAR_FORMAT:
        names.append("0" * 120 + ".json")  # only an extension header holds this name
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i, name in enumerate(names):
            info = member(name, size=2 + i)
            info.uid, info.mtime = (3_000_000, 1.5) if fmt == tarfile.PAX_FORMAT else (0, 0)
            tar.addfile(info, io.BytesIO(b"{}" + b" " * i))
    assert list(read_tar_members(buf.getvalue(), "t")) == [(n, b"{}" + b" " * i) for i, n in enumerate(names)]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("name", ["../" + "x" * 120 + ".json", "/" + "x" * 120 + ".json", "a/" * 60 + "../../b.json"])
def test_long_names_that_escape_are_refused(fmt, name):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        tar.addfile(member(name, size=2), io.BytesIO(b"{}"))
    with pytest.raises(ShardError, match=f"^t: member name {re.escape(repr(name))} is not a plain file name"):
        list(read_tar_members(buf.getvalue(), "t"))


def test_damaged_tar_headers_are_refused():
    data = bytearray(tar_bytes(member("00000000.json")))
    data[10] ^= 0x01  # in the name: the header checksum no longer matches
    with pytest.raises(ShardError, match="^t: corrupt tar data \\(bad header checksum at byte 0\\)"):
        list(read_tar_members(bytes(data), "t"))
    data = tar_bytes(member("00000000.json"))
    with pytest.raises(ShardError, match="^t: corrupt tar data \\(100 stray bytes at the end\\)"):
        list(read_tar_members(data[:1024] + b"x" * 100, "t"))


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(4, 3),
        np.zeros((0, 3), np.uint8),
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        np.float32(3.5),
    ],
)
@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_read_npy_matches_numpy(array, version):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=version)
    out = read_npy(buf.getvalue())
    assert out.dtype == array.dtype and out.shape == array.shape and out.flags.writeable
    np.testing.assert_array_equal(out, array)


def test_read_npy_refuses_pickles_and_short_data():
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([1, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays"):
        read_npy(buf.getvalue())
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros((10, 3), np.float32))
    with pytest.raises(ValueError):
        read_npy(buf.getvalue()[:-4])
    with pytest.raises(ValueError, match="not an .npy payload"):
        read_npy(b"PK\x03\x04 something else")


def test_reader_refuses_a_shard_with_a_hostile_member(tmp_path):
    xyz, rgb = np.zeros((4, 3), np.float32), np.full((4, 3), 0.5, np.float32)
    members = encode_sample(0, xyz, rgb, {"pid": 1, "camid": 1, "label": 0, "path": "x"})
    members[0] = ("../" + members[0][0], members[0][1])
    entry, locations = write_shard(tmp_path / shard_name(0), [members])
    ShardIndex(
        split="query",
        shards=[entry],
        pids=np.array([1]),
        camids=np.array([1]),
        labels=np.array([0]),
        paths=["x"],
        shard_ids=np.array([0]),
        locations=np.array(locations),
        label_map={1: 0},
    ).save(tmp_path)
    with pytest.raises(ShardError, match=r"sample 0: member name '\.\./00000000\.xyz\.npy' is not a plain file name"):
        ShardReader(tmp_path)[0]
    assert not (tmp_path.parent / "00000000.xyz.npy").exists()


# ------------------------------------------------------------------------------------------------
# The DataLoader path


def collect(loader) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() for t in batch) for batch in loader]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert torch.equal(u, v)


@pytest.fixture(scope="module")
def train_setup(tiny_shards):
    reader = ShardReader(tiny_shards / "train_all")
    dataset = TrainSet(reader, TransformConfig(), seed=5)
    sampler = StratifiedSampler(reader.index.labels, reader.index.camids, global_batch_size=8, mode="balance", seed=5)
    return reader, dataset, sampler


def test_training_batches_are_identical_with_0_and_2_workers_and_across_runs(train_setup):
    reader, dataset, sampler = train_setup
    epoch0 = collect(train_loader(dataset, sampler, epoch=0, num_workers=0))
    assert len(epoch0) == sampler.steps_per_epoch == 6
    assert_same_batches(collect(train_loader(dataset, sampler, epoch=0, num_workers=2)), epoch0)
    assert_same_batches(collect(train_loader(dataset, sampler, epoch=0, num_workers=0)), epoch0)
    assert_same_batches(collect(train_loader(dataset, sampler, epoch=0, start_step=4, num_workers=2)), epoch0[4:])
    epoch1 = collect(train_loader(dataset, sampler, epoch=1, num_workers=2))
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(epoch0, epoch1))
    for step, (xyz, rgb, labels) in enumerate(epoch0):
        indices = sampler.local_batch(0, step)
        assert labels.tolist() == reader.index.labels[indices].tolist()
        assert xyz.shape == rgb.shape == (8, round(TINY.points * 0.5), 3) and xyz.dtype == torch.float32


def test_training_items_are_seeded_by_seed_epoch_position_and_index(train_setup):
    reader, dataset, sampler = train_setup
    batches = list(SamplerBatches(sampler, epoch=2))
    assert [item[1] for batch in batches for item in batch] == list(range(6 * 8))  # positions in the stream
    epoch, position, index = batches[1][3]
    assert (epoch, position, index) == (2, 11, int(sampler.local_batch(2, 1)[3]))
    xyz, rgb, label = dataset[(epoch, position, index)]
    sample = reader[index]
    want = transform(sample.xyz, sample.rgb, TransformConfig(), np.random.default_rng([5, epoch, position, index]))
    assert torch.equal(xyz, torch.from_numpy(want[0])) and torch.equal(rgb, torch.from_numpy(want[1]))
    assert label == sample.label
    # the same sample at another position of the stream is augmented differently
    assert not torch.equal(dataset[(epoch, position + 1, index)][0], xyz)
    # rank 1 of 2 gets the second half of every global batch, positions included
    half = StratifiedSampler(reader.index.labels, global_batch_size=8, mode="balance", seed=5, world_size=2, rank=1)
    first = next(iter(SamplerBatches(half, epoch=2)))
    assert [(p, i) for _, p, i in first] == [(p, i) for _, p, i in batches[0][4:]]


def test_evaluation_batches_are_identical_with_0_and_2_workers(tiny_shards):
    reader = ShardReader(tiny_shards / "gallery")
    dataset = EvalSet(reader, TransformConfig())
    plain = collect(DataLoader(dataset, batch_size=5, num_workers=0))
    assert_same_batches(collect(DataLoader(dataset, batch_size=5, num_workers=2)), plain)
    assert torch.cat([b[2] for b in plain]).tolist() == list(range(len(reader)))
    sample = reader[7]
    want = transform(sample.xyz, sample.rgb, TransformConfig(), None)
    assert torch.equal(plain[1][0][2], torch.from_numpy(want[0]))
    assert torch.equal(plain[1][1][2], torch.from_numpy(want[1]))


# ------------------------------------------------------------------------------------------------
# Found by tests/test_fuzz.py: each raised something other than the documented error before


def npy_with_header(header: str, body: bytes = bytes(48)) -> bytes:
    text = header.encode("latin1") + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + body


@pytest.mark.parametrize(
    "header",
    [
        "{'descr': '<f4', 'fortran_order': False, 'shape': (9223372036854775808,)}",  # OverflowError
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 6), }" + "(" * 300,  # tokenize.TokenError
        "{[1]: 2}",  # TypeError
    ],
    ids=["huge shape", "unclosed", "unhashable key"],
)
def test_read_npy_refuses_garbled_headers_with_value_error(header):
    with pytest.raises(ValueError):
        read_npy(npy_with_header(header))


def test_decode_sample_refuses_infinite_numbers_and_deep_json():
    members = dict(
        encode_sample(
            0,
            np.zeros((4, 3), np.float32),
            np.zeros((4, 3), np.float32),
            {"pid": 1, "camid": 1, "label": 0, "path": "x"},
        )
    )
    members["00000000.json"] = b'{"index": Infinity, "pid": 1, "camid": 1, "label": 0, "path": "x"}'  # OverflowError
    with pytest.raises(ShardError, match="^w: sample metadata is malformed"):
        decode_sample(members, "00000000", "w")
    members["00000000.json"] = b"[" * 100_000 + b"]" * 100_000  # RecursionError
    with pytest.raises(ShardError, match="^w: cannot decode sample"):
        decode_sample(members, "00000000", "w")


def test_a_negative_tar_member_size_is_refused():
    """int() reads '-1' too; the member data would then have been parsed as the next header."""
    data = bytearray(tar_bytes(member("00000000.json")))
    data[124:136] = b"-0000000001\0"
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\0 " % sum(data[:512])
    with pytest.raises(ShardError, match="^t: member '00000000.json' declares -1 bytes"):
        list(read_tar_members(bytes(data), "t"))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.update(shards=[5]), "malformed index"),  # AttributeError
        (lambda d: d.update(label_map=[1]), "malformed index"),  # AttributeError
        (lambda d: d["samples"].update(pid=[10**30] * len(d["samples"]["pid"])), "malformed index"),  # OverflowError
        (lambda d: d["samples"].update(pid=5), "must be lists of integers"),  # TypeError
        (lambda d: d["shards"][0].update(name=5), "shard name 5 is not a plain file name"),  # TypeError
        (lambda d: d["shards"][0].pop("bytes"), "has byte size None"),  # KeyError
        (lambda d: d["shards"][0].update(bytes="a"), "has byte size 'a'"),  # numpy UFuncTypeError
        (lambda d: d["shards"][0].update(num_samples=[]), "lists [] samples"),  # ValueError: truth value of an array
        (lambda d: d["samples"]["shard"].__setitem__(0, -1), "refers to a shard that is not listed"),  # ValueError
        (lambda d: d["samples"]["shard"].__setitem__(0, 10**13), "refers to a shard that is not listed"),  # MemoryError
        (lambda d: d["samples"]["location"].__setitem__(0, [2**62, 2**62, 0]), "outside its shard"),  # wrapped; OSError
    ],
)
def test_malformed_index_values_are_refused(tiny_shards, tmp_path, edit, message):
    data = json.loads((tiny_shards / "query" / INDEX_NAME).read_text())
    edit(data)
    (tmp_path / INDEX_NAME).write_text(json.dumps(data))
    with pytest.raises(ShardError, match=f"^{re.escape(str(tmp_path / INDEX_NAME))}: .*{re.escape(message)}"):
        load_index(tmp_path)


def test_reader_reads_no_more_than_the_shard_holds(tmp_path):
    """An index may declare any sizes: a 1 TiB length must not become a 1 TiB read buffer."""
    members = encode_sample(
        0, np.zeros((4, 3), np.float32), np.zeros((4, 3), np.float32), {"pid": 1, "camid": 1, "label": 0, "path": "x"}
    )
    entry, locations = write_shard(tmp_path / shard_name(0), [members])
    entry["bytes"] = locations[0][1] = 2**40  # MemoryError before
    ShardIndex(
        split="query",
        shards=[entry],
        pids=np.array([1]),
        camids=np.array([1]),
        labels=np.array([0]),
        paths=["x"],
        shard_ids=np.array([0]),
        locations=np.array(locations),
        label_map={1: 0},
    ).save(tmp_path)
    with pytest.raises(ShardError, match=f"^{re.escape(str(tmp_path / shard_name(0)))}, sample 0: shard is truncated"):
        ShardReader(tmp_path)[0]
