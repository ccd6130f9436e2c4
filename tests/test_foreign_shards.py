"""Shards other tools wrote: webdataset.TarWriter (PAX headers, keys with folders) and GNU tar
(GNU and PAX formats, directory entries, `./` names, long names), indexed by `ognet-index` and
read, streamed and trained on like packed shards; hostile foreign tars are refused by name."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from data_fixtures import TINY_SPLITS, assert_sample_equal, source_samples, tiny_root, tiny_shards  # noqa: F401
from dist_scripts.procs import REPO, clean_env, run, run_here
from test_train import train_args

from ognet.data.foreign import index_folder
from ognet.data.shards import INDEX_NAME, ShardReader, load_index, stream_split
from ognet.errors import ShardError
from ognet.train import main as train_main


def stem(path: str) -> str:
    """`train_all/0002/0002_c1s1_000451_03.jpg.obj` -> `0002_c1s1_000451_03` (dots would end a key)."""
    return Path(path).name.split(".")[0]


def write_with_tarwriter(root: Path, split: str, out: Path, with_json: bool, per_shard: int = 7) -> list[dict]:
    """The split's samples as webdataset.TarWriter writes them: keys `<pid folder>/<stem>`."""
    samples = source_samples(root, split)
    out.mkdir(parents=True)
    for shard, first in enumerate(range(0, len(samples), per_shard)):
        with wds.TarWriter(str(out / f"part-{shard:03d}.tar")) as sink:
            for s in samples[first : first + per_shard]:
                record = {
                    "__key__": f"{Path(s['path']).parent.name}/{stem(s['path'])}",
                    "xyz.npy": s["xyz"],
                    "rgb.npy": s["rgb"],
                }
                if with_json:
                    record["json"] = {"pid": s["pid"], "camid": s["camid"], "source": "elsewhere"}
                sink.write(record)
    return samples


def check_reads(folder: Path, samples: list[dict]) -> None:
    reader = ShardReader(folder)
    assert len(reader) == len(samples)
    for i in np.random.default_rng(0).permutation(len(samples)):
        got = reader[i]
        assert (got.index, got.pid, got.camid) == (i, samples[i]["pid"], samples[i]["camid"])
        np.testing.assert_array_equal(got.xyz, samples[i]["xyz"])
        np.testing.assert_array_equal(got.rgb, samples[i]["rgb"])
    assert [(s.index, s.pid) for s in stream_split(folder)] == [(i, s["pid"]) for i, s in enumerate(samples)]


@pytest.mark.parametrize("with_json", [True, False])
def test_tarwriter_shards_are_indexed_and_read(tiny_root, tmp_path, with_json):
    folder = tmp_path / "gallery"
    samples = write_with_tarwriter(tiny_root, "gallery", folder, with_json)
    with tarfile.open(folder / "part-000.tar") as tar:  # what made the reader refuse them before
        assert any(m.pax_headers for m in tar.getmembers())
    index = index_folder(folder, naming=None if with_json else "market")
    assert index.keys[0] == f"{Path(samples[0]['path']).parent.name}/{stem(samples[0]['path'])}"
    assert (index.labels == -1).all() and index.split == "gallery"
    check_reads(folder, samples)
    assert load_index(folder).keys == index.keys  # written and read back


def test_gnu_tar_shards_are_indexed_and_read(tiny_root, tmp_path):
    """GNU tar in its own format (long names, `./` prefixes, a directory entry) and in PAX."""
    samples = source_samples(tiny_root, "query")
    folder = tmp_path / "query"
    folder.mkdir()
    for fmt, part in (("gnu", samples[:5]), ("pax", samples[5:])):
        files = tmp_path / f"files-{fmt}"
        files.mkdir()
        for s in part:
            key = stem(s["path"]) + "_" + "x" * 110  # a name over 100 characters needs an extension header
            np.save(files / f"{key}.xyz.npy", s["xyz"])
            np.save(files / f"{key}.rgb.npy", s["rgb"])
        names = sorted(p.name for p in files.iterdir())
        # --sort=name keeps a key's members adjacent, as webdataset needs them
        subprocess.run(
            ["tar", f"--format={fmt}", "--sort=name", "-cf", str(folder / f"{fmt}.tar"), "-C", str(files), "."],
            check=True,
        )
        listed = subprocess.run(["tar", "-tf", str(folder / f"{fmt}.tar")], check=True, capture_output=True, text=True)
        assert listed.stdout.split() == ["./"] + [f"./{n}" for n in names]
    proc = run([sys.executable, str(REPO / "shards" / "index.py"), str(folder), "--naming", "market"])
    assert f"{folder}: {len(samples)} samples" in proc.stdout
    reader = ShardReader(folder)
    by_stem = {stem(s["path"]): s for s in samples}
    for i in range(len(reader)):
        got = reader[i]
        want = by_stem[reader.index.keys[i].split("_x")[0]]
        assert (got.pid, got.camid) == (want["pid"], want["camid"])
        np.testing.assert_array_equal(got.xyz, want["xyz"])


def hostile_tar(path: Path, *infos: tarfile.TarInfo) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info in infos:
            tar.addfile(info, io.BytesIO(b"\x93NUMPY" + b"\0" * (info.size - 6)) if info.isreg() else None)


@pytest.mark.parametrize(
    "kind,message",
    [
        ("symlink", "member '0001_c1s1_000001_00.rgb.npy' is not a regular file"),
        ("escape", "member name '../0001_c1s1_000001_00.rgb.npy' is not a plain file name"),
        ("device", "member '0001_c1s1_000001_00.rgb.npy' is not a regular file"),
    ],
)
def test_hostile_foreign_tars_are_refused_naming_the_tar(tmp_path, kind, message):
    folder = tmp_path / "query"
    folder.mkdir()
    good = tarfile.TarInfo("0001_c1s1_000001_00.xyz.npy")
    good.size = 128
    bad = tarfile.TarInfo(("../" if kind == "escape" else "") + "0001_c1s1_000001_00.rgb.npy")
    bad.type = {"symlink": tarfile.SYMTYPE, "escape": tarfile.REGTYPE, "device": tarfile.CHRTYPE}[kind]
    bad.linkname, bad.size = "/etc/passwd", 128 if kind == "escape" else 0
    hostile_tar(folder / "a.tar", good, bad)
    with pytest.raises(ShardError, match=f"^{re.escape(str(folder / 'a.tar'))}: {re.escape(message)}"):
        index_folder(folder, naming="market")
    assert not (folder / INDEX_NAME).exists()
    proc = subprocess.run(
        [sys.executable, str(REPO / "shards" / "index.py"), str(folder), "--naming", "market"],
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and proc.stderr.startswith("ognet-index: error: ") and "Traceback" not in proc.stderr


def test_samples_without_identity_or_arrays_are_named(tiny_root, tmp_path):
    folder = tmp_path / "gallery"
    write_with_tarwriter(tiny_root, "gallery", folder, with_json=False)
    with pytest.raises(
        ShardError, match=r"part-000.tar, sample '-1/-1_c.*': no .json member with pid and camid; give a naming scheme"
    ):
        index_folder(folder)
    with tarfile.open(folder / "part-000.tar", "a") as tar:
        info = tarfile.TarInfo("lonely.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ShardError, match=r"part-000.tar, sample 'lonely': cannot take pid and camid \(KeyError"):
        index_folder(folder, naming="market")


def test_training_and_evaluation_on_foreign_shards(tiny_root, tmp_path):
    """The tiny data set written by TarWriter, indexed, then trained on and evaluated end to end."""
    data = tmp_path / "foreign"
    for split in TINY_SPLITS:
        write_with_tarwriter(tiny_root, split, data / split, with_json=True, per_shard=10)
        index_folder(data / split)
    run_dir = tmp_path / "run"
    run_here(train_main, train_args(data, run_dir, "train.epochs=1", "train.max_steps_per_epoch=2"))
    metrics = json.loads((run_dir / "metrics-eval.json").read_text())
    assert metrics["num_queries"] > 0 and 0 <= metrics["mAP"] <= 1
    assert (run_dir / "model_last.pt").exists()
    shutil.rmtree(run_dir)
