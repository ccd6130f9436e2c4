"""Data set layouts: split folders, file naming schemes, labels.

The tree is the original's 3D tree (`3DMarket+bg/`, `3DDuke+bg/`, ...), read on its own; the
original also needed the 2D image tree beside it, we do not:

    <root>/<split>/<pid folder>/<image name><point suffix>     e.g. train_all/0002/0002_c1s1_000451_03.jpg.obj

Training labels are the index of the pid folder in the sorted folder list of the training split
(torchvision's ImageFolder, which the original used). Test pids and cameras come from the file
name, as the original's test scripts parse them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ognet.data.points import POINT_SUFFIXES
from ognet.errors import DataError

SPLITS = ("train_all", "train", "val", "query", "gallery")
TRAIN_SPLITS = ("train_all", "train")
NAMING_SCHEMES = ("market", "duke", "msmt", "cuhk")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

# Market-1501 `PPPP_cCsS_FFFFFF_BB` (PPPP may be -1 = junk, 0000 = distractor); DukeMTMC-reID
# `PPPP_cC_fFFFFFFF`; CUHK03-NP `PPPP_cC_N`: pid before the first '_', camera = the digits after
# the first 'c' (the original takes the single digit right after it; cameras here are < 10).
_CAMERA_AFTER_C = re.compile(r"^(-1|\d+)_c(\d+)")
# MSMT17 `PPPP_NNN_CC_<date><time>_...`: camera = first two characters of the third field.
_MSMT = re.compile(r"^(-1|\d+)_\d+_(\d\d)")


@dataclass(frozen=True)
class Sample:
    """One point file of a split. `path` is relative to the data set root."""

    path: str
    pid: int
    camid: int


def strip_suffixes(name: str) -> str:
    """`0002_c1s1_000451_03.jpg.obj` -> `0002_c1s1_000451_03`."""
    stem = name
    for suffixes in (POINT_SUFFIXES, _IMAGE_SUFFIXES):
        lower = stem.lower()
        for s in suffixes:
            if lower.endswith(s):
                stem = stem[: -len(s)]
                break
    return stem


def parse_name(name: str, scheme: str) -> tuple[int, int]:
    """(pid, camid) from a file name under one of `NAMING_SCHEMES`."""
    stem = strip_suffixes(os.path.basename(name))
    if scheme not in NAMING_SCHEMES:
        raise DataError(f"unknown naming scheme {scheme!r}; expected one of {NAMING_SCHEMES}")
    m = (_MSMT if scheme == "msmt" else _CAMERA_AFTER_C).match(stem)
    if not m:
        example = {
            "market": "0002_c1s1_000451_03",
            "duke": "0005_c2_f0046985",
            "cuhk": "0001_c1_1",
            "msmt": "0000_000_01_0303morning_0015_0",
        }[scheme]
        raise DataError(f"{name}: cannot parse pid and camera for the {scheme} naming (expected e.g. {example})")
    return int(m.group(1)), int(m.group(2))


def detect_scheme(names: list[str]) -> str:
    """Guess the naming scheme from a few file names: MSMT17 has no `_c<digit>` camera field."""
    for name in names[:50]:
        stem = strip_suffixes(os.path.basename(name))
        if _CAMERA_AFTER_C.match(stem):
            return "market"  # market, duke and cuhk parse identically
        if _MSMT.match(stem):
            return "msmt"
    raise DataError(f"cannot recognise the file naming of {names[:3]}; set the naming scheme explicitly")


def scan_split(root: str | os.PathLike, split: str, scheme: str | None = None) -> list[Sample]:
    """Every point file of `<root>/<split>/<pid>/`, in sorted folder then sorted file order.

    Training splits take the pid from the folder (the original's ImageFolder label); test splits
    take it from the file name, where `-1` marks junk and `0000` distractors.
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: split folder does not exist")
    files: list[tuple[str, str]] = []
    for folder in sorted(d.name for d in os.scandir(split_dir) if d.is_dir()):
        names = sorted(
            e.name for e in os.scandir(split_dir / folder) if e.is_file() and e.name.lower().endswith(POINT_SUFFIXES)
        )
        files.extend((folder, name) for name in names)
    if not files:
        raise DataError(f"{split_dir}: empty split (no {'/'.join(POINT_SUFFIXES)} files in <pid>/ sub-folders)")
    scheme = scheme or detect_scheme([name for _, name in files])
    samples = []
    for folder, name in files:
        pid, camid = parse_name(f"{split}/{folder}/{name}", scheme)
        if split in TRAIN_SPLITS or split == "val":
            try:
                pid = int(folder)
            except ValueError:
                raise DataError(f"{split_dir / folder}: identity folder name is not an integer pid") from None
        samples.append(Sample(f"{split}/{folder}/{name}", pid, camid))
    return samples


def label_map(train_samples: list[Sample]) -> dict[int, int]:
    """pid -> label: the index of the pid in the sorted pid list of the training split."""
    return {pid: label for label, pid in enumerate(sorted({s.pid for s in train_samples}))}
