"""Synthetic persons, written in the original's 3DMarket+bg layout and `.obj` format.

No real data set can be downloaded everywhere, so the project ships this generator: it writes
`<out>/{train_all,query,gallery}/<pid>/<PPPP_cCsS_FFFFFF_BB>.jpg.obj` exactly as the original's
data (reference §1): per image 8192 points = a 128x64 "image"; the visible body points first, one
per pixel and in a fixed template order (like SMPL's vertex order), then one background point per
remaining pixel, row-major, on a plane behind the person.

A person is a handful of parametric parts (ellipsoids, domes, tapered tubes) sampled with a fixed
number of surface points each. An identity fixes body shape and clothing, drawn from small
palettes so that look-alikes exist; an image varies viewpoint, walking pose, framing, lighting,
background, occluders and noise, so that identity is learnable but not trivial.

Everything is a pure function of (seed, sizes): an image's randomness comes from a generator
seeded by (seed, split, pid, image index), so files are byte-identical whatever the worker count.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ognet.data.points import write_obj
from ognet.errors import ConfigError
from ognet.io import atomic_write

SPLITS = ("train_all", "query", "gallery")
JUNK, DISTRACTOR = -1, 0  # Market's pid -1 (junk, ignored by the protocol) and 0000 (distractors)
MANIFEST = "synth.json"
FORMAT_VERSION = 1  # bump when the same config would produce different files


# ----------------------------------------------------------------------------------------------
# Configuration and plan: which files exist, with which pid and camera


@dataclass(frozen=True)
class SynthConfig:
    """Sizes of a synthetic data set. Gallery images of the test identities, distractors (0000)
    and junk (-1) are counted separately, as Market-1501's 13,120 + 2,793 + 3,819 = 19,732."""

    train_ids: int = 30
    train_images: int = 300
    test_ids: int = 20
    query_images: int = 40
    gallery_images: int = 160
    distractors: int = 20
    junk: int = 20
    cameras: int = 6
    points: int = 8192
    seed: int = 0

    @property
    def image_size(self) -> tuple[int, int]:
        """(rows, columns) of the image whose pixels the points are; Market's 128x64 for 8192."""
        width = math.isqrt(self.points // 2)
        return 2 * width, width

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"synth: {f.name} must be a non-negative integer, got {value!r}")
        checks = [
            (self.train_ids >= 1 and self.test_ids >= 1, "train_ids and test_ids must be at least 1"),
            (self.train_ids + self.test_ids <= 9999, "train_ids + test_ids must be at most 9999 (4-digit pids)"),
            (self.train_images >= self.train_ids, "train_images must be at least train_ids (one image per identity)"),
            (self.query_images >= self.test_ids, "query_images must be at least test_ids (one query per identity)"),
            (
                self.gallery_images >= 2 * self.test_ids,
                "gallery_images must be at least 2 * test_ids (two cameras per test identity)",
            ),
            (2 <= self.cameras <= 9, "cameras must be 2..9 (cross-camera matches; one digit in the name)"),
            (
                self.points >= 128 and self.points == 2 * math.isqrt(self.points // 2) ** 2,
                "points must be 2 * w * w for an image of 2w x w pixels, e.g. 8192 (128 x 64) or 2048 (64 x 32)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"synth: {message}; got {self}")


PRESETS = {
    # test-size: seconds to write
    "tiny": SynthConfig(
        train_ids=8, train_images=48, test_ids=6, query_images=12, gallery_images=36, distractors=4, junk=4, cameras=4
    ),
    # the demo set: trains within minutes on 2 CPU cores
    "small": SynthConfig(),
    # Market-1501's sizes
    "market": SynthConfig(
        train_ids=751,
        train_images=12936,
        test_ids=750,
        query_images=3368,
        gallery_images=13120,
        distractors=2793,
        junk=3819,
        cameras=6,
    ),
}

# Seed streams: np.random.default_rng([seed, stream, ...]). Split streams are the split's index.
_IDENTITY, _CAMERA, _PLAN = 3, 4, 5


@dataclass(frozen=True)
class ImageSpec:
    """One file to write. `index` counts the images of (split, pid) and seeds the image."""

    split: str
    pid: int
    index: int
    camera: int
    name: str

    @property
    def path(self) -> str:
        return f"{self.split}/{_pid_text(self.pid)}/{self.name}"


def _pid_text(pid: int) -> str:
    """Market's spelling of a pid, in folder and file names: 0002, 0000 (distractor), -1 (junk)."""
    return "-1" if pid == JUNK else f"{pid:04d}"


def plan_images(config: SynthConfig) -> list[ImageSpec]:
    """Every file of the data set, in split, pid, index order.

    Train and test pids are disjoint and interleaved as in Market. Each identity is seen by 2 or
    more cameras; a test identity's queries and gallery images cycle through the same cameras, so
    every query has gallery matches from other cameras and usually some same-camera ones (junk).
    """
    config.validate()
    rng = np.random.default_rng([config.seed, _PLAN])
    pids = rng.permutation(np.arange(1, config.train_ids + config.test_ids + 1))
    train_pids = sorted(pids[: config.train_ids].tolist())
    test_pids = sorted(pids[config.train_ids :].tolist())
    specs: list[ImageSpec] = []

    def add(split: str, pid: int, cameras: list[int]) -> None:
        for index, camera in enumerate(cameras):
            frame = 200_000 * SPLITS.index(split) + 8 * index + int(rng.integers(1, 9))
            name = (
                f"{_pid_text(pid)}_c{camera}s{int(rng.integers(1, 7))}"
                f"_{frame:06d}_{int(rng.integers(1, 9)):02d}.jpg.obj"
            )
            specs.append(ImageSpec(split, pid, index, camera, name))

    def camera_cycle(count: int) -> list[int]:
        seen = rng.permutation(np.arange(1, config.cameras + 1))[: rng.integers(2, config.cameras + 1)]
        return [int(seen[i % len(seen)]) for i in range(count)]

    for pid, count in zip(train_pids, _spread(config.train_images, len(train_pids), rng, minimum=2)):
        add("train_all", pid, camera_cycle(count))
    queries = _share(config.query_images, len(test_pids), rng)
    gallery = _spread(config.gallery_images, len(test_pids), rng, minimum=2)
    test_cameras = {pid: camera_cycle(max(q, g)) for pid, q, g in zip(test_pids, queries, gallery)}
    for pid, count in zip(test_pids, queries):
        add("query", pid, test_cameras[pid][:count])
    for pid, count in ((JUNK, config.junk), (DISTRACTOR, config.distractors)):
        add("gallery", pid, [int(c) for c in rng.integers(1, config.cameras + 1, count)])
    for pid, count in zip(test_pids, gallery):
        # the gallery starts one camera later than the queries: index 0 is then another camera
        add("gallery", pid, (test_cameras[pid] * 2)[1 : count + 1])
    return sorted(specs, key=lambda s: (SPLITS.index(s.split), s.pid, s.index))


def _spread(total: int, n: int, rng: np.random.Generator, minimum: int) -> list[int]:
    """`total` images over `n` identities, at least `minimum` each if possible, uneven as in real data."""
    minimum = min(minimum, total // n)
    extra = rng.multinomial(total - minimum * n, rng.dirichlet(np.full(n, 2.0)))
    return (minimum + extra).tolist()


def _share(total: int, n: int, rng: np.random.Generator) -> list[int]:
    """`total` images over `n` identities as evenly as possible (Market: a query per camera)."""
    counts = np.full(n, total // n)
    counts[rng.choice(n, total % n, replace=False)] += 1
    return counts.tolist()


# ----------------------------------------------------------------------------------------------
# The body template: parts with a fixed number of unit surface samples, in a fixed order

# (name, kind, size): spheres and domes take a point count, tubes (rings, points per ring). Counts
# give ~2 samples per pixel on surfaces facing the camera, so few pixels inside a silhouette are empty.
_PARTS = (
    ("head", "sphere", 1500),
    ("hair", "sphere", 700),
    ("neck", "tube", (12, 28)),
    ("torso", "tube", (56, 96)),
    ("shoulders", "dome", 700),
    ("arm_l", "tube", (52, 30)),
    ("hand_l", "sphere", 280),
    ("arm_r", "tube", (52, 30)),
    ("hand_r", "sphere", 280),
    ("leg_l", "tube", (80, 48)),
    ("foot_l", "sphere", 420),
    ("leg_r", "tube", (80, 48)),
    ("foot_r", "sphere", 420),
    ("backpack", "sphere", 2100),
    ("bag", "sphere", 840),
)
# Limbs swing about their joint together with what hangs on them.
_LIMBS = (("arm_l", "hand_l"), ("arm_r", "hand_r"), ("leg_l", "foot_l"), ("leg_r", "foot_r"))
_GOLDEN_ANGLE = math.pi * (3 - math.sqrt(5))


def _sphere(n: int, bottom: float) -> np.ndarray:
    """Fibonacci lattice on the unit sphere above height `bottom` (-1: all of it): even spacing."""
    i = np.arange(n) + 0.5
    y = 1 - (1 - bottom) * i / n
    r = np.sqrt(1 - y**2)
    phi = i * _GOLDEN_ANGLE
    return np.stack([r * np.cos(phi), y, r * np.sin(phi)], axis=1)


def _tube(rings: int, per_ring: int) -> np.ndarray:
    """(cos theta, t, sin theta) on a staggered grid; t runs from 0 (joint) to 1 (end)."""
    ring, j = np.divmod(np.arange(rings * per_ring), per_ring)
    theta = 2 * np.pi * (j + 0.5 * (ring % 2)) / per_ring
    return np.stack([np.cos(theta), (ring + 0.5) / rings, np.sin(theta)], axis=1)


@functools.cache
def _template() -> tuple[np.ndarray, dict[str, slice]]:
    units, slices, start = [], {}, 0
    for name, kind, size in _PARTS:
        unit = _tube(*size) if kind == "tube" else _sphere(size, 0.0 if kind == "dome" else -1.0)
        units.append(unit)
        slices[name] = slice(start, start + len(unit))
        start += len(unit)
    return np.concatenate(units), slices


def _normalise(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _ellipsoid(unit: np.ndarray, centre, radii) -> tuple[np.ndarray, np.ndarray]:
    radii = np.asarray(radii, dtype=float)
    return centre + unit * radii, _normalise(unit / radii)


def _tapered_tube(unit: np.ndarray, top, length: float, r_top, r_end) -> tuple[np.ndarray, np.ndarray]:
    """A tube hanging down from `top`; `r_top`, `r_end` are its (x, z) half-axes at either end."""
    c, t, s = unit.T
    rx = r_top[0] + (r_end[0] - r_top[0]) * t
    rz = r_top[1] + (r_end[1] - r_top[1]) * t
    xyz = np.asarray(top, dtype=float) + np.stack([c * rx, -t * length, s * rz], axis=1)
    return xyz, _normalise(np.stack([c / rx, np.zeros_like(c), s / rz], axis=1))


# ----------------------------------------------------------------------------------------------
# Identities: body shape and clothing

# Colour roles of a point. Albedo = the identity's colour of the role.
SKIN, HAIR, TOP, ACCENT, BOTTOM, SHOES, BAG, HAT = range(8)

# Small weighted palettes: dark and plain clothes dominate, as in Market, so look-alikes are common.
_SKIN = (
    [(0.92, 0.76, 0.65), (0.85, 0.66, 0.52), (0.72, 0.53, 0.40), (0.55, 0.38, 0.27), (0.38, 0.26, 0.18)],
    [0.35, 0.3, 0.2, 0.1, 0.05],
)
_HAIR = (
    [(0.06, 0.05, 0.05), (0.20, 0.13, 0.08), (0.40, 0.27, 0.15), (0.75, 0.62, 0.38), (0.60, 0.60, 0.60)],
    [0.5, 0.25, 0.1, 0.08, 0.07],
)
_CLOTHES = (
    [
        (0.08, 0.08, 0.09),
        (0.92, 0.92, 0.90),
        (0.50, 0.50, 0.52),
        (0.28, 0.28, 0.30),
        (0.10, 0.13, 0.30),
        (0.20, 0.35, 0.70),
        (0.60, 0.72, 0.88),
        (0.75, 0.12, 0.14),
        (0.92, 0.60, 0.70),
        (0.92, 0.80, 0.25),
        (0.20, 0.48, 0.25),
        (0.62, 0.57, 0.38),
        (0.42, 0.28, 0.18),
        (0.45, 0.25, 0.55),
        (0.92, 0.50, 0.15),
    ],
    [0.18, 0.14, 0.1, 0.08, 0.08, 0.06, 0.05, 0.06, 0.04, 0.04, 0.04, 0.04, 0.04, 0.03, 0.02],
)
_BOTTOMS = (
    [
        (0.08, 0.08, 0.09),
        (0.10, 0.13, 0.30),
        (0.25, 0.35, 0.55),
        (0.50, 0.50, 0.52),
        (0.28, 0.28, 0.30),
        (0.62, 0.57, 0.38),
        (0.80, 0.72, 0.58),
        (0.92, 0.92, 0.90),
        (0.42, 0.28, 0.18),
    ],
    [0.3, 0.1, 0.2, 0.1, 0.1, 0.07, 0.05, 0.04, 0.04],
)
_SHOES = (
    [
        (0.08, 0.08, 0.09),
        (0.92, 0.92, 0.90),
        (0.50, 0.50, 0.52),
        (0.42, 0.28, 0.18),
        (0.75, 0.12, 0.14),
        (0.20, 0.35, 0.70),
    ],
    [0.35, 0.3, 0.1, 0.15, 0.05, 0.05],
)
_SCENES = [
    (0.60, 0.60, 0.58),
    (0.75, 0.70, 0.60),
    (0.55, 0.33, 0.25),
    (0.30, 0.42, 0.25),
    (0.25, 0.30, 0.33),
    (0.35, 0.35, 0.36),
    (0.55, 0.52, 0.48),
    (0.75, 0.75, 0.72),
]


def _pick(rng: np.random.Generator, palette: tuple[list, list]) -> np.ndarray:
    colours, weights = palette
    colour = np.asarray(colours[rng.choice(len(colours), p=np.asarray(weights) / sum(weights))])
    return np.clip(colour + rng.normal(0, 0.035, 3), 0, 1)


@dataclass(frozen=True)
class Identity:
    """A person in rest pose: feet at y = 0, facing +z, arms and legs straight down."""

    height: float
    xyz: np.ndarray  # (N, 3) template points
    normal: np.ndarray  # (N, 3) unit outward normals
    albedo: np.ndarray  # (N, 3) colour under neutral light
    present: np.ndarray  # (N,) bool: parts this person has (long hair, bags)
    joints: np.ndarray  # (4, 3) pivots of _LIMBS
    swing: tuple[float, float]  # arm and leg swing amplitudes when walking, radians
    shine: float  # strength of specular highlights (a glossy jacket)


def make_identity(rng: np.random.Generator) -> Identity:
    """Draw body proportions and clothing; every choice is one a camera can see.

    The helpers draw from `rng` in this order; the order defines the data (bump FORMAT_VERSION
    on any change).
    """
    body = _measure_body(rng)
    xyz, normal = _rest_pose(body)
    clothing = _draw_clothing(rng)
    role = _roles(clothing)
    colours = _role_colours(rng)
    present = _present_parts(rng, clothing.hair_style)
    return Identity(
        height=body.height,
        xyz=xyz,
        normal=normal,
        albedo=colours[role],
        present=present,
        joints=body.joints,
        swing=(rng.uniform(0.15, 0.45), rng.uniform(0.2, 0.45)),
        shine=float(rng.choice([0.0, 0.25, 0.6], p=[0.6, 0.3, 0.1])),
    )


@dataclass(frozen=True)
class _Body:
    """One person's measurements in rest pose (feet at y = 0), shared by the placing of every part."""

    height: float
    head_r: float
    neck: float
    foot_h: float
    torso_len: float
    leg_len: float
    shoulder_y: float
    hip_y: float
    shoulder_w: float
    hip_w: float
    depth: float  # half the torso's front-to-back thickness
    arm_r: float
    leg_r: float
    arm_len: float
    arm_x: float  # shoulder joints at +-arm_x
    leg_x: float  # hip joints at +-leg_x

    @property
    def head_centre(self) -> np.ndarray:
        return np.array([0, self.shoulder_y + self.neck + self.head_r, 0])

    @property
    def joints(self) -> np.ndarray:
        """Pivots of _LIMBS: shoulders, then hips."""
        arm_x, leg_x, shoulder_y, hip_y = self.arm_x, self.leg_x, self.shoulder_y, self.hip_y
        return np.array([[arm_x, shoulder_y, 0], [-arm_x, shoulder_y, 0], [leg_x, hip_y, 0], [-leg_x, hip_y, 0]])


def _measure_body(rng: np.random.Generator) -> _Body:
    """Proportions of a ~1.75 unit tall adult, each scaled per person, so that silhouettes differ."""
    height = float(np.clip(rng.normal(1.74, 0.075), 1.55, 1.98))
    build, hips, limbs = rng.uniform(0.88, 1.15), rng.uniform(0.92, 1.1), rng.uniform(0.85, 1.15)
    head_r = 0.065 * height * rng.uniform(0.93, 1.07)
    neck, foot_h = 0.03 * height, 0.04 * height
    torso_len = 0.30 * height * rng.uniform(0.94, 1.06)
    leg_len = height - 2 * head_r - neck - torso_len - foot_h
    shoulder_w, hip_w, depth = 0.115 * height * build, 0.095 * height * build * hips, 0.06 * height * build
    arm_r, leg_r = 0.026 * height * limbs, 0.045 * height * limbs
    arm_len = 0.33 * height * rng.uniform(0.95, 1.05)
    return _Body(
        height=height,
        head_r=head_r,
        neck=neck,
        foot_h=foot_h,
        torso_len=torso_len,
        leg_len=leg_len,
        shoulder_y=foot_h + leg_len + torso_len,
        hip_y=foot_h + leg_len,
        shoulder_w=shoulder_w,
        hip_w=hip_w,
        depth=depth,
        arm_r=arm_r,
        leg_r=leg_r,
        arm_len=arm_len,
        arm_x=shoulder_w + arm_r,
        leg_x=0.5 * hip_w,
    )


_Surface = tuple[np.ndarray, np.ndarray]  # (xyz, normal) of one part's template points


def _unit(name: str) -> np.ndarray:
    """The unit surface samples of one template part (a view: no copy)."""
    unit, parts = _template()
    return unit[parts[name]]


def _rest_pose(body: _Body) -> _Surface:
    """Every template point placed on the body: (N, 3) positions and outward normals."""
    unit, parts = _template()
    xyz, normal = np.zeros((len(unit), 3)), np.zeros((len(unit), 3))
    for name, (part_xyz, part_normal) in {**_head_parts(body), **_trunk_parts(body), **_limb_parts(body)}.items():
        xyz[parts[name]], normal[parts[name]] = part_xyz, part_normal
    return xyz, normal


def _head_parts(body: _Body) -> dict[str, _Surface]:
    """Head, long hair hanging behind it, and the neck down into the torso."""
    head_r, head_c = body.head_r, body.head_centre
    return {
        "head": _ellipsoid(_unit("head"), head_c, (0.78 * head_r, head_r, 0.88 * head_r)),
        "hair": _ellipsoid(
            _unit("hair"), head_c + [0, -0.5 * head_r, -0.45 * head_r], (0.85 * head_r, 1.35 * head_r, 0.6 * head_r)
        ),
        "neck": _tapered_tube(
            _unit("neck"),
            [0, body.shoulder_y + body.neck + 0.3 * head_r, 0],
            body.neck + 0.3 * head_r,
            (0.35 * head_r,) * 2,
            (0.4 * head_r,) * 2,
        ),
    }


def _trunk_parts(body: _Body) -> dict[str, _Surface]:
    """Torso, shoulders, and what is carried on them: a backpack behind, a bag at the right hip."""
    height, shoulder_y, shoulder_w, depth = body.height, body.shoulder_y, body.shoulder_w, body.depth
    return {
        "torso": _tapered_tube(
            _unit("torso"), [0, shoulder_y, 0], body.torso_len, (shoulder_w, depth), (body.hip_w, 0.95 * depth)
        ),
        "shoulders": _ellipsoid(_unit("shoulders"), [0, shoulder_y, 0], (shoulder_w, 0.05 * height, depth)),
        "backpack": _ellipsoid(
            _unit("backpack"),
            [0, body.hip_y + 0.6 * body.torso_len, -depth - 0.045 * height],
            (0.8 * shoulder_w, 0.13 * height, 0.05 * height),
        ),
        "bag": _ellipsoid(
            _unit("bag"),
            [-(body.hip_w + 0.035 * height), body.hip_y + 0.02 * height, 0],
            (0.02 * height, 0.055 * height, 0.07 * height),
        ),
    }


def _limb_parts(body: _Body) -> dict[str, _Surface]:
    """Arms with hands and legs with feet, hanging straight down from their joints (left at +x)."""
    height, arm_r, leg_r = body.height, body.arm_r, body.leg_r
    hand_y = body.shoulder_y - body.arm_len - 0.03 * height
    limbs = {}
    for side, sign in (("l", 1), ("r", -1)):
        arm_x, leg_x = sign * body.arm_x, sign * body.leg_x
        limbs[f"arm_{side}"] = _tapered_tube(
            _unit(f"arm_{side}"), [arm_x, body.shoulder_y, 0], body.arm_len, (arm_r, arm_r), (0.75 * arm_r,) * 2
        )
        limbs[f"hand_{side}"] = _ellipsoid(
            _unit(f"hand_{side}"), [arm_x, hand_y, 0], (0.7 * arm_r, 0.045 * height, 0.9 * arm_r)
        )
        limbs[f"leg_{side}"] = _tapered_tube(
            _unit(f"leg_{side}"), [leg_x, body.hip_y, 0], body.leg_len, (leg_r, leg_r), (0.62 * leg_r,) * 2
        )
        limbs[f"foot_{side}"] = _ellipsoid(
            _unit(f"foot_{side}"),
            [leg_x, 0.55 * body.foot_h, 0.03 * height],
            (0.028 * height, 0.55 * body.foot_h + 0.01, 0.07 * height),
        )
    return limbs


@dataclass(frozen=True)
class _Clothing:
    """What a person wears; lengths are fractions of the part, from its joint (0) to its end (1)."""

    hair_style: str  # short, long, hat or bald
    coat: bool  # long sleeves, no waist, and the top reaching over the thighs
    sleeve: float
    trousers: float
    waist: float  # where the top ends on the torso
    pattern: str  # of the top: plain, stripes, logo or open (a jacket)


def _draw_clothing(rng: np.random.Generator) -> _Clothing:
    """Draw the clothing. A coat fixes sleeve and waist, so those draws happen only without one."""
    hair_style = rng.choice(["short", "long", "hat", "bald"], p=[0.5, 0.3, 0.15, 0.05])
    coat = rng.random() < 0.15
    sleeve = 1.0 if coat or rng.random() < 0.6 else 0.3
    trousers = rng.choice([1.0, 0.7, 0.4], p=[0.7, 0.1, 0.2])
    waist = 1.0 if coat else rng.uniform(0.78, 0.9)
    pattern = rng.choice(["plain", "stripes", "logo", "open"], p=[0.55, 0.15, 0.15, 0.15])
    return _Clothing(hair_style, coat, sleeve, trousers, waist, pattern)


# Where hair (or a hat) starts on the head: unit-sphere height in front (z > 0) and behind.
_HAIRLINES = {"short": (0.45, -0.1), "long": (0.45, -0.6), "hat": (0.35, 0.35), "bald": (0.8, 0.8)}


def _roles(clothing: _Clothing) -> np.ndarray:
    """The colour role of every template point (SKIN, HAIR, TOP, ...), from the clothing."""
    unit, parts = _template()
    role = np.full(len(unit), SKIN)
    u = unit[parts["head"]]
    front = u[:, 2] > 0
    hairline = _HAIRLINES[clothing.hair_style]
    covered = u[:, 1] > np.where(front, hairline[0], hairline[1])
    role[parts["head"]] = np.where(covered, HAT if clothing.hair_style == "hat" else HAIR, SKIN)
    role[parts["hair"]] = HAIR
    t = unit[parts["torso"]][:, 1]
    role[parts["torso"]] = np.where(t > clothing.waist, BOTTOM, np.where(_accent(clothing.pattern), ACCENT, TOP))
    role[parts["shoulders"]] = TOP
    for side in "lr":
        t = unit[parts[f"arm_{side}"]][:, 1]
        role[parts[f"arm_{side}"]] = np.where(t < clothing.sleeve, TOP, SKIN)
        t = unit[parts[f"leg_{side}"]][:, 1]
        role[parts[f"leg_{side}"]] = np.where(
            (t < 0.35) & clothing.coat, TOP, np.where(t < clothing.trousers, BOTTOM, SKIN)
        )
        role[parts[f"foot_{side}"]] = SHOES
    role[parts["backpack"]] = role[parts["bag"]] = BAG
    return role


def _accent(pattern: str) -> np.ndarray:
    """Which torso points take the accent colour: the pattern that sets similar tops apart."""
    c, t, s = _unit("torso").T
    return {
        "plain": np.zeros_like(t, dtype=bool),
        "stripes": np.sin(2 * np.pi * 5 * t) > 0.4,
        "logo": (s > 0.6) & (t > 0.2) & (t < 0.5),
        "open": (s > 0) & (np.abs(c) < 0.25),
    }[pattern]


def _role_colours(rng: np.random.Generator) -> np.ndarray:
    """One colour per role, in role order (SKIN ... HAT), from the weighted palettes."""
    palettes = (_SKIN, _HAIR, _CLOTHES, _CLOTHES, _BOTTOMS, _SHOES, _CLOTHES, _CLOTHES)
    return np.stack([_pick(rng, palette) for palette in palettes])


def _present_parts(rng: np.random.Generator, hair_style: str) -> np.ndarray:
    """Which template points this person has: long hair and bags are optional parts."""
    unit, parts = _template()
    present = np.ones(len(unit), dtype=bool)
    present[parts["hair"]] = hair_style == "long"
    present[parts["backpack"]] = rng.random() < 0.25
    present[parts["bag"]] = rng.random() < 0.2
    return present


@functools.lru_cache(maxsize=8)  # images come in pid order; an identity is ~2 MB
def identity_of(seed: int, pid: int) -> Identity:
    """The identity of a train or test pid: the same person in every split and image."""
    return make_identity(np.random.default_rng([seed, _IDENTITY, pid]))


# ----------------------------------------------------------------------------------------------
# Cameras and rendering


@dataclass(frozen=True)
class Camera:
    """What a camera contributes to all its images: mounting, light, and its scene."""

    pitch: float  # looking down, radians
    light: np.ndarray  # unit direction towards the light, camera frame
    gain: float  # brightness
    cast: np.ndarray  # per-channel colour cast
    wall: np.ndarray  # background colours above and below the horizon
    ground: np.ndarray
    horizon: float  # fraction of the image height
    stripe_period: float  # pixels; pillars, windows
    stripe_depth: float


@functools.lru_cache(maxsize=16)
def camera_of(seed: int, camera: int) -> Camera:
    rng = np.random.default_rng([seed, _CAMERA, camera])

    def scene() -> np.ndarray:
        return np.clip(np.asarray(_SCENES[rng.integers(len(_SCENES))]) + rng.normal(0, 0.04, 3), 0, 1)

    return Camera(
        pitch=rng.uniform(0.08, 0.35),
        light=_normalise(np.array([rng.uniform(-0.6, 0.6), rng.uniform(0.3, 1.0), rng.uniform(0.4, 1.0)])),
        gain=rng.uniform(0.75, 1.05),
        cast=1 + rng.normal(0, 0.06, 3),
        wall=scene(),
        ground=scene(),
        horizon=rng.uniform(0.45, 0.75),
        stripe_period=rng.uniform(6, 30),
        stripe_depth=rng.uniform(0, 0.12),
    )


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    """Turn the person by `yaw` about the vertical, then tilt the top towards the camera."""
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    turn = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    tilt = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return tilt @ turn


def render_person(
    identity: Identity, camera: Camera, rng: np.random.Generator, points: int = 8192, junk: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One image of a person: (xyz, rgb), `points` rows, visible body points first, then background.

    The camera is orthographic along -z (the original's weak perspective); x is right, y up. A
    body point is kept if it faces the camera, falls inside the image, is not behind an occluder,
    and is the front-most point of its pixel. `junk` frames the person badly (Market's -1 boxes).
    As in make_identity, the order of the helpers' draws from `rng` defines the data.
    """
    rows, cols = 2 * math.isqrt(points // 2), math.isqrt(points // 2)
    xyz, normal = _walking_pose(identity, rng)
    xyz, normal, facing = _view(identity, camera, xyz, normal, rng)
    frame = _frame(identity.height, rows, cols, junk, rng)
    background, occluded = _background(camera, rng, rows, cols)
    light = _light(camera, rng)
    body, body_pixels = _visible(xyz, frame, occluded)
    body_xyz = xyz[body] + rng.normal(0, 0.004, (len(body), 3))
    body_rgb = _body_colours(identity.albedo[facing[body]], normal[body], identity.shine, light, rng)
    bg_xyz, bg_rgb = _background_points(background, body_pixels, body_xyz, frame, light, rng)
    xyz_out = np.concatenate([body_xyz, bg_xyz])
    rgb_out = np.clip(np.concatenate([body_rgb, bg_rgb]), 0, 1)
    return xyz_out, rgb_out


def _walking_pose(identity: Identity, rng: np.random.Generator) -> _Surface:
    """A copy of the identity's points with the limbs swung about shoulders and hips in counter-phase."""
    _, parts = _template()
    xyz, normal = identity.xyz.copy(), identity.normal.copy()
    phase = rng.uniform(0, 2 * np.pi)
    arm, leg = identity.swing
    for (limb, end), joint, amplitude in zip(_LIMBS, identity.joints, (arm, -arm, -leg, leg)):
        sl = slice(parts[limb].start, parts[end].stop)
        a = amplitude * math.sin(phase)
        swing = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
        xyz[sl] = (xyz[sl] - joint) @ swing.T + joint
        normal[sl] = normal[sl] @ swing.T
    return xyz, normal


def _view(
    identity: Identity, camera: Camera, xyz: np.ndarray, normal: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn the posed person to a random yaw in camera coordinates, centred at half height.

    Only points of present parts that face the camera can be seen, so only those are turned (and
    returned, with their template indices `facing`); `xyz` is modified in place.
    """
    rotation = _rotation(rng.uniform(0, 2 * np.pi), camera.pitch + rng.normal(0, 0.03))
    facing = np.flatnonzero(identity.present & (normal @ rotation[2] > 0))
    xyz[:, 1] -= identity.height / 2
    shape_error = rng.uniform([0.95, 0.97, 0.95], [1.05, 1.03, 1.05])  # of a monocular 3D estimate
    return (xyz[facing] * shape_error) @ rotation.T, normal[facing] @ rotation.T, facing


@dataclass(frozen=True)
class _Frame:
    """Where the person falls in the image: the size of a pixel in body units, and the (fractional)
    column and row of the body centre."""

    rows: int
    cols: int
    pixel_size: float
    centre_col: float
    centre_row: float


def _frame(height: float, rows: int, cols: int, junk: bool, rng: np.random.Generator) -> _Frame:
    """Pixel size and where the body centre falls; sometimes cut off, junk badly so."""
    fill = rng.uniform(1.3, 2.2) if junk else (rng.uniform(1.0, 1.2) if rng.random() < 0.1 else rng.uniform(0.82, 0.97))
    shift = (0.25 if junk else 0.06) * rng.normal(size=2)
    return _Frame(rows, cols, height / (fill * rows), cols * (0.5 + shift[0]), rows * (0.5 + 0.5 * shift[1]))


@dataclass(frozen=True)
class _Light:
    """The lighting of one image: the camera's, varied a little."""

    direction: np.ndarray  # unit vector towards the light, camera frame
    gain: float
    cast: np.ndarray  # per-channel colour cast


def _light(camera: Camera, rng: np.random.Generator) -> _Light:
    direction = _normalise(camera.light + rng.normal(0, 0.15, 3))
    gain = camera.gain * rng.uniform(0.85, 1.15)
    return _Light(direction, gain, camera.cast * (1 + rng.normal(0, 0.03, 3)))


def _visible(xyz: np.ndarray, frame: _Frame, occluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points a z-buffer keeps, in template order (like SMPL's vertex order), and their pixels.

    A point is kept if it falls inside the image, not on an occluder, and is the front-most one of
    its pixel; on exact depth ties the first in template order.
    """
    rows, cols = frame.rows, frame.cols
    col = np.floor(xyz[:, 0] / frame.pixel_size + frame.centre_col).astype(np.int64)
    row = np.floor(frame.centre_row - xyz[:, 1] / frame.pixel_size).astype(np.int64)
    candidate = np.flatnonzero((col >= 0) & (col < cols) & (row >= 0) & (row < rows))
    candidate = candidate[~occluded[row[candidate], col[candidate]]]
    pixel_id = row[candidate] * cols + col[candidate]
    depth = np.full(rows * cols, -np.inf)  # a z-buffer: the camera looks down -z
    np.maximum.at(depth, pixel_id, xyz[candidate, 2])
    front = xyz[candidate, 2] == depth[pixel_id]
    _, first = np.unique(pixel_id[front], return_index=True)  # one point per pixel, even on exact ties
    body = np.sort(candidate[front][first])
    return body, row[body] * cols + col[body]


def _body_colours(
    albedo: np.ndarray, normal: np.ndarray, shine: float, light: _Light, rng: np.random.Generator
) -> np.ndarray:
    """Albedo under the image's light, with a specular highlight and sensor noise."""
    half = _normalise(light.direction + [0, 0, 1])
    shade = 0.55 + 0.45 * np.clip(normal @ light.direction, 0, None)
    specular = shine * np.clip(normal @ half, 0, None) ** 30
    rgb = albedo * shade[:, None] * light.gain * light.cast + specular[:, None]
    rgb += rng.normal(0, 0.025, rgb.shape)
    return rgb


def _background_points(
    background: np.ndarray,
    body_pixels: np.ndarray,
    body_xyz: np.ndarray,
    frame: _Frame,
    light: _Light,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """One point per pixel without a body point, row-major, on a plane a little behind the person."""
    free = np.ones(frame.rows * frame.cols, dtype=bool)
    free[body_pixels] = False
    free_row, free_col = np.divmod(np.flatnonzero(free), frame.cols)
    plane_z = (body_xyz[:, 2].min() if len(body_xyz) else 0.0) - rng.uniform(0.05, 0.3)
    pixel_size, centre_col, centre_row = frame.pixel_size, frame.centre_col, frame.centre_row
    bg_xyz = np.stack(
        [
            (free_col + 0.5 - centre_col) * pixel_size,
            (centre_row - free_row - 0.5) * pixel_size,
            np.full(len(free_row), plane_z),
        ],
        axis=1,
    )
    bg_rgb = background[free_row, free_col] * light.gain * light.cast
    bg_rgb = np.where(np.isnan(bg_rgb), 1.0, bg_rgb)  # glare: over-exposed, pure white "blank" pixels
    return bg_xyz, bg_rgb


def _background(camera: Camera, rng: np.random.Generator, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """The scene behind the person, (rows, cols, 3) before lighting, and the occluder mask.

    The camera's wall and ground with stripes and mottling, clutter in clothing colours (other
    people, objects), maybe an occluder in front, and a small glare spot marked NaN; it becomes
    pure white (1, 1, 1), the original's "blank" colour, whatever the lighting.
    """
    r, c = np.mgrid[0:rows, 0:cols]
    horizon = rows * (camera.horizon + rng.normal(0, 0.05))
    image = np.where((r < horizon)[..., None], camera.wall, camera.ground * (0.8 + 0.3 * r / rows)[..., None])
    stripes = 1 + camera.stripe_depth * np.sin(2 * np.pi * (c + rng.uniform(0, 100)) / camera.stripe_period)
    image = image * np.where(r < horizon, stripes, 1.0)[..., None]
    blocks = (rows // 16 + 1, cols // 16 + 1)  # tiles, windows, shade: mostly brightness, a little hue
    mottle = rng.normal(0, rng.uniform(0.02, 0.08), (*blocks, 1)) + rng.normal(0, 0.015, (*blocks, 3))
    image = image + np.repeat(np.repeat(mottle, 16, axis=0), 16, axis=1)[:rows, :cols]
    for _ in range(rng.integers(0, 3)):
        h, w = int(rows * rng.uniform(0.08, 0.4)), int(cols * rng.uniform(0.06, 0.2)) + 1
        top, left = rng.integers(0, rows - h), rng.integers(-w // 2, cols - w // 2)
        image[top : top + h, max(left, 0) : left + w] = _pick(rng, _CLOTHES)

    occluded = np.zeros((rows, cols), dtype=bool)
    kind = rng.choice(["none", "below", "side"], p=[0.75, 0.15, 0.1])
    if kind == "below":  # a bench, a bicycle, a car bonnet
        occluded[int(rows * rng.uniform(0.7, 0.92)) :] = True
    elif kind == "side":  # a pole, a passer-by
        width = int(cols * rng.uniform(0.1, 0.3))
        left = int(rng.integers(0, cols - width))
        occluded[:, left : left + width] = True
    image[occluded] = _pick(rng, _CLOTHES)
    image = image + rng.normal(0, 0.02, image.shape)

    h, w = rng.integers(1, 4), rng.integers(1, 4)
    top, edge = rng.integers(0, rows - h), rng.integers(0, cols // 8)
    left = edge if rng.random() < 0.5 else cols - w - edge  # near the left or right edge: rarely hidden
    image[top : top + h, left : left + w] = np.nan
    return image, occluded


def render_image(spec: ImageSpec, config: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """The points of one planned file. Distractors and junk are one-off people."""
    rng = np.random.default_rng([config.seed, SPLITS.index(spec.split), spec.pid + 1, spec.index])
    identity = make_identity(rng) if spec.pid in (JUNK, DISTRACTOR) else identity_of(config.seed, spec.pid)
    return render_person(identity, camera_of(config.seed, spec.camera), rng, config.points, junk=spec.pid == JUNK)


# ----------------------------------------------------------------------------------------------
# Writing a data set


def _write(out_dir: Path, config: SynthConfig, spec: ImageSpec) -> None:
    write_obj(out_dir / spec.path, *render_image(spec, config))


def generate_dataset(
    out_dir: str | os.PathLike, config: SynthConfig, workers: int | None = None, progress: bool = True
) -> dict[str, int]:
    """Write every planned file that does not exist yet; return file counts per split and of this run.

    Files are written atomically, so an interrupted run leaves only complete files and a re-run
    finishes the job. A folder generated with another config is refused, not mixed.
    """
    config.validate()
    out = Path(out_dir)
    _check_manifest(out, config)
    specs = plan_images(config)
    todo = [s for s in specs if not (out / s.path).exists()]
    write = functools.partial(_write, out, config)
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    with tqdm(total=len(todo), unit="file", desc="synth", disable=not progress, file=sys.stderr) as bar:
        if workers == 1:
            for spec in todo:
                write(spec)
                bar.update()
        else:
            with multiprocessing.Pool(workers) as pool:
                for _ in pool.imap_unordered(write, todo, chunksize=max(1, min(16, len(todo) // (4 * workers)))):
                    bar.update()
    counts = Counter(s.split for s in specs)
    return {**{split: counts[split] for split in SPLITS}, "written": len(todo), "skipped": len(specs) - len(todo)}


def _check_manifest(out: Path, config: SynthConfig) -> None:
    """Record the config beside the data; refuse to resume into a folder made with another one."""
    want = {"format": FORMAT_VERSION, **dataclasses.asdict(config)}
    path = out / MANIFEST
    if path.exists():
        have = json.loads(path.read_text())
        if have != want:
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            raise ConfigError(
                f"{out}: holds a synthetic data set made with other settings "
                f"(setting: (there, requested) = {diff}); choose another output folder or delete it"
            )
        return
    with atomic_write(path, "w") as f:
        json.dump(want, f, indent=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ognet-synth", description="Write a synthetic person re-id data set in the 3DMarket+bg layout."
    )
    parser.add_argument("--out", required=True, help="output folder (gets train_all/, query/, gallery/)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="small",
        help="sizes: tiny (tests), small (the demo, default), market (Market-1501)",
    )
    for field in dataclasses.fields(SynthConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, help=f"override the preset's {field.name}")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel processes (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    sizes = {f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)}
    config = dataclasses.replace(PRESETS[args.preset], **{k: v for k, v in sizes.items() if v is not None})
    try:
        config.validate()
    except ConfigError as e:
        parser.error(str(e))
    start = time.perf_counter()
    counts = generate_dataset(args.out, config, workers=args.workers, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    print(
        f"synth: train_all {counts['train_all']}, query {counts['query']}, gallery {counts['gallery']} files "
        f"({config.train_ids} train ids, {config.test_ids} test ids, {config.distractors} distractors, "
        f"{config.junk} junk) in {args.out}; wrote {counts['written']}, skipped {counts['skipped']}, "
        f"{seconds:.1f} s ({counts['written'] / seconds:.1f} files/s)"
    )


if __name__ == "__main__":  # python -m ognet.data.synth
    main()
