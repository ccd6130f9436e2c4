"""The synthetic person generator: layout, file contents, determinism, resumability, difficulty."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from ognet.data import synth
from ognet.data.layouts import parse_name, scan_split
from ognet.data.points import read_points
from ognet.errors import ConfigError

TINY = synth.PRESETS["tiny"]
# a handful of files, for the tests that generate several times
MINI = synth.SynthConfig(
    train_ids=3, train_images=6, test_ids=2, query_images=2, gallery_images=4, distractors=1, junk=1, cameras=3, seed=7
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    counts = synth.generate_dataset(out, TINY, workers=2, progress=False)
    gallery = TINY.gallery_images + TINY.distractors + TINY.junk
    assert counts == {
        "train_all": TINY.train_images,
        "query": TINY.query_images,
        "gallery": gallery,
        "written": TINY.train_images + TINY.query_images + gallery,
        "skipped": 0,
    }
    return out


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg.obj"))}


def test_layout_names_and_splits(tiny):
    train, query, gallery = (scan_split(tiny, split) for split in ("train_all", "query", "gallery"))
    assert (len(train), len(query)) == (TINY.train_images, TINY.query_images)
    assert len(gallery) == TINY.gallery_images + TINY.distractors + TINY.junk
    for s in train + query + gallery:
        folder, name = s.path.split("/")[1:]
        assert parse_name(name, "market") == (s.pid, s.camid)
        assert folder == ("-1" if s.pid == -1 else f"{s.pid:04d}")
        assert 1 <= s.camid <= TINY.cameras
    train_ids, query_ids = {s.pid for s in train}, {s.pid for s in query}
    assert len(train_ids) == TINY.train_ids and len(query_ids) == TINY.test_ids
    assert not train_ids & query_ids
    assert {s.pid for s in gallery} == query_ids | {-1, 0}
    assert [s.pid for s in gallery].count(-1) == TINY.junk and [s.pid for s in gallery].count(0) == TINY.distractors
    assert len({s.camid for s in train + query + gallery}) == TINY.cameras
    assert len({s.path.rsplit("/", 1)[1] for s in train + query + gallery}) == len(train + query + gallery)


def test_every_query_has_a_cross_camera_match_and_some_same_camera_junk(tiny):
    gallery_cams = defaultdict(set)
    for s in scan_split(tiny, "gallery"):
        gallery_cams[s.pid].add(s.camid)
    query = scan_split(tiny, "query")
    assert all(gallery_cams[q.pid] - {q.camid} for q in query)
    assert any(q.camid in gallery_cams[q.pid] for q in query)


def test_files_are_person_images(tiny):
    with_white = 0
    samples = [s for split in ("train_all", "query", "gallery") for s in scan_split(tiny, split)]
    for s in samples:
        xyz, rgb = read_points(tiny / s.path)
        assert xyz.shape == rgb.shape == (TINY.points, 3)
        assert rgb.min() >= 0 and rgb.max() <= 1
        # the body comes first, then the background: a suffix of points on one plane, behind the body
        z = xyz[:, 2]
        n_body = int(np.flatnonzero(z != z[-1])[-1]) + 1
        assert (z[n_body:] == z[-1]).all() and (z[:n_body] > z[-1]).all()
        if s.pid != -1:
            assert 1000 <= n_body <= 4500, (s.path, n_body)
            height = xyz[:n_body, 1].max() - xyz[:n_body, 1].min()
            assert 1.2 < height < 2.1 and abs(xyz[:n_body].mean(0)).max() < 0.6
        with_white += bool((rgb == 1).all(axis=1).any())
    assert with_white >= 0.9 * len(samples)  # the original's "blank" points: glare, highlights


def test_same_seed_same_bytes_any_worker_count(tmp_path):
    synth.generate_dataset(tmp_path / "a", MINI, workers=1, progress=False)
    synth.generate_dataset(tmp_path / "b", MINI, workers=2, progress=False)
    synth.generate_dataset(tmp_path / "c", dataclasses.replace(MINI, seed=8), workers=1, progress=False)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(a) == 14 and a == b
    assert set(a.values()).isdisjoint(c.values())


def test_rerun_writes_only_missing_files(tmp_path):
    assert synth.generate_dataset(tmp_path, MINI, workers=1, progress=False)["written"] == 14
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.jpg.obj")}
    victim = sorted(before)[5]
    data = victim.read_bytes()
    victim.unlink()
    counts = synth.generate_dataset(tmp_path, MINI, workers=2, progress=False)
    assert (counts["written"], counts["skipped"]) == (1, 13)
    assert victim.read_bytes() == data
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p != victim)


def test_refuses_to_mix_two_configs_in_one_folder(tmp_path):
    synth.generate_dataset(tmp_path, MINI, workers=1, progress=False)
    with pytest.raises(ConfigError, match="seed"):
        synth.generate_dataset(tmp_path, dataclasses.replace(MINI, seed=8), workers=1, progress=False)


@pytest.mark.parametrize(
    "change", [dict(cameras=1), dict(points=8000), dict(gallery_images=3), dict(train_ids=0), dict(query_images=-1)]
)
def test_impossible_configs_are_refused(change):
    with pytest.raises(ConfigError):
        dataclasses.replace(MINI, **change).validate()


def test_cli(tmp_path, capsys):
    synth.main(
        [
            "--preset",
            "tiny",
            "--out",
            str(tmp_path),
            "--train-ids",
            "2",
            "--train-images",
            "3",
            "--test-ids",
            "2",
            "--query-images",
            "2",
            "--gallery-images",
            "4",
            "--distractors",
            "0",
            "--junk",
            "1",
            "--points",
            "2048",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert "train_all 3, query 2, gallery 5 files" in capsys.readouterr().out
    assert len(read_points(next(tmp_path.rglob("*.jpg.obj"))).xyz) == 2048
    with pytest.raises(SystemExit) as exit_:
        synth.main(["--out", str(tmp_path / "x"), "--cameras", "1"])
    assert exit_.value.code == 2 and "ognet-synth: error: synth: cameras must be 2..9" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _descriptor(xyz: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Mean colour of the upper, middle and lower body thirds, and body height."""
    z = xyz[:, 2]
    body = z != z[-1]
    y, colour = xyz[body, 1], rgb[body]
    thirds = np.array_split(np.argsort(-y), 3)
    return np.concatenate([colour[t].mean(axis=0) for t in thirds] + [[y.max() - y.min()]])


def _rank1(features: np.ndarray, specs: list[synth.ImageSpec]) -> float:
    """Market protocol: junk and same-camera matches of the query's identity are skipped."""
    pid = np.array([s.pid for s in specs])
    cam = np.array([s.camera for s in specs])
    is_query = np.array([s.split == "query" for s in specs])
    hits = []
    for i in np.flatnonzero(is_query):
        distance = ((features - features[i]) ** 2).sum(axis=1)
        distance[is_query | (pid == -1) | ((pid == pid[i]) & (cam == cam[i]))] = np.inf
        hits.append(pid[np.argmin(distance)] == pid[i])
    return float(np.mean(hits))


def test_identity_is_learnable_but_not_trivial():
    config = synth.SynthConfig(
        train_ids=1, train_images=1, test_ids=30, query_images=60, gallery_images=120, distractors=15, junk=5, seed=3
    )
    specs = [s for s in synth.plan_images(config) if s.split != "train_all"]
    features = np.array([_descriptor(*synth.render_image(s, config)) for s in specs])
    features = (features - features.mean(axis=0)) / features.std(axis=0)
    chance = 1 / config.test_ids
    handcrafted = _rank1(features, specs)
    random = _rank1(np.random.default_rng(0).normal(size=features.shape), specs)
    assert 5 * chance < handcrafted < 0.9
    assert random < 3 * chance
