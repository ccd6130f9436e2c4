"""Shared data fixtures: a tiny synthetic data set (512-point persons) and its packed shards.

Test modules import the fixtures they use (`from data_fixtures import tiny_root, tiny_shards`).
Each importing module gets its own fixture instance, so the data itself is written once per test
session under pytest's base temporary folder and reused; treat it as read-only (copy it first to
change it).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest

from ognet.data import synth
from ognet.data.layouts import label_map, scan_split
from ognet.data.pack import PackOptions, pack_dataset
from ognet.data.points import read_points

# the tiny preset (48 train_all, 12 query, 44 gallery files incl. junk and distractors), 512 points each
TINY = dataclasses.replace(synth.PRESETS["tiny"], points=512)
TINY_SPLITS = ("train_all", "query", "gallery")
MAX_COUNT = 10  # samples per shard: 48 train_all samples make 5 shards


@functools.cache
def _tiny_root(base: Path) -> Path:
    root = base / "tiny-data"
    synth.generate_dataset(root, TINY, workers=1, progress=False)
    return root


@functools.cache
def _tiny_shards(base: Path) -> Path:
    out = base / "tiny-shards"
    pack_dataset(_tiny_root(base), out, options=PackOptions(max_count=MAX_COUNT, workers=1, progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """`<root>/{train_all,query,gallery}/<pid>/<name>.jpg.obj`, written once per session."""
    return _tiny_root(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """`tiny_root` packed with `max_count=MAX_COUNT`, one worker: `<out>/<split>/`."""
    return _tiny_shards(tmp_path_factory.getbasetemp())


@functools.cache
def source_samples(root: Path, split: str) -> list[dict]:
    """What the shards must hold for `split`, built from the source files alone."""
    labels = label_map(scan_split(root, "train_all"))
    expected = []
    for index, s in enumerate(scan_split(root, split)):
        cloud = read_points(root / s.path)
        expected.append(
            {
                "index": index,
                "xyz": cloud.xyz,
                "rgb": cloud.rgb,
                "pid": s.pid,
                "camid": s.camid,
                "label": labels.get(s.pid, -1),
                "path": s.path,
            }
        )
    return expected


def assert_sample_equal(sample, want: dict) -> None:
    """A shard `Sample` equals the source sample exactly (float32 colours are lossless)."""
    assert (sample.index, sample.pid, sample.camid, sample.label, sample.path) == (
        want["index"],
        want["pid"],
        want["camid"],
        want["label"],
        want["path"],
    )
    assert sample.xyz.dtype == np.float32 and sample.rgb.dtype == np.float32
    np.testing.assert_array_equal(sample.xyz, want["xyz"])
    np.testing.assert_array_equal(sample.rgb, want["rgb"])
