"""Data set layouts: the four naming schemes, scheme detection, split scanning and labels."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ognet.data.layouts import Sample, detect_scheme, label_map, parse_name, scan_split, strip_suffixes
from ognet.errors import DataError

# (file name, scheme, pid, camid) for every scheme, with the suffixes a point file can carry
GOOD_NAMES = [
    ("0002_c1s1_000451_03.jpg.obj", "market", 2, 1),
    ("1501_c6s4_001902_01.jpg.ply", "market", 1501, 6),
    ("-1_c3s2_012345_00.jpg.obj", "market", -1, 3),  # junk
    ("0000_c5s3_054321_07.jpg.npy", "market", 0, 5),  # distractor
    ("0005_c2_f0046985.jpg.obj", "duke", 5, 2),
    ("7140_c8_f0160000.jpg.pcd", "duke", 7140, 8),
    ("0000_000_01_0303morning_0015_0.jpg.obj", "msmt", 0, 1),
    ("1040_025_15_0113noon_0964_3.jpg.npz", "msmt", 1040, 15),
    ("0001_c1_1.png.obj", "cuhk", 1, 1),
    ("1467_c2_10.png.obj", "cuhk", 1467, 2),
    ("0002_c1s1_000451_03", "market", 2, 1),  # no suffix at all
    ("0002_c1s1_000451_03.JPG.OBJ", "market", 2, 1),  # suffixes in capitals
]


@pytest.mark.parametrize("name,scheme,pid,camid", GOOD_NAMES)
def test_parse_name(name, scheme, pid, camid):
    assert parse_name(name, scheme) == (pid, camid)
    assert parse_name(f"query/{pid}/{name}", scheme) == (pid, camid)  # folders do not matter


def test_strip_suffixes():
    assert strip_suffixes("0002_c1s1_000451_03.jpg.obj") == "0002_c1s1_000451_03"
    assert strip_suffixes("0001_c1_1.png.npz") == "0001_c1_1"
    assert strip_suffixes("x.obj") == "x"
    assert strip_suffixes("x.jpg") == "x"


BAD_NAMES = [
    ("readme.txt.obj", "market"),
    ("c1s1_000451_03.jpg.obj", "market"),  # no pid
    ("0002_s1_000451.jpg.obj", "market"),  # no camera
    ("0002-c1s1.jpg.obj", "duke"),
    ("abcd_c1_1.png.obj", "cuhk"),
    ("0002_c1s1_000451_03.jpg.obj", "msmt"),  # a Market name is not an MSMT name
    ("0000_000_x1_0303morning.jpg.obj", "msmt"),
    ("0000_000_01_0303morning_0015_0.jpg.obj", "market"),  # an MSMT name has no `_c` camera field
]


@pytest.mark.parametrize("name,scheme", BAD_NAMES)
def test_unparsable_name_is_an_error_naming_the_file_and_scheme(name, scheme):
    with pytest.raises(DataError) as info:
        parse_name(f"gallery/0002/{name}", scheme)
    text = str(info.value)
    assert text.startswith(f"gallery/0002/{name}: cannot parse pid and camera for the {scheme} naming"), text


def test_unknown_scheme():
    with pytest.raises(DataError, match="unknown naming scheme 'viper'"):
        parse_name("0002_c1s1_000451_03.jpg.obj", "viper")


def test_detect_scheme():
    market = [n for n, s, *_ in GOOD_NAMES if s == "market"]
    assert detect_scheme(market) == "market"
    # Duke and CUHK names parse exactly as Market names do
    assert detect_scheme(["0005_c2_f0046985.jpg.obj"]) == "market"
    assert detect_scheme(["0001_c1_1.png.obj"]) == "market"
    assert detect_scheme(["0000_000_01_0303morning_0015_0.jpg.obj", "1040_025_15_0113noon_0964_3.jpg.obj"]) == "msmt"
    assert detect_scheme(["notes.obj", "0000_000_01_0303morning_0015_0.jpg.obj"]) == "msmt"  # the first that parses
    with pytest.raises(DataError, match="cannot recognise the file naming of .*set the naming scheme explicitly"):
        detect_scheme(["a.obj", "b.obj"])


# ------------------------------------------------------------------------------------------------
# Scanning split folders. scan_split reads names only, so the files can be empty.


def make_tree(root: Path, files: dict[str, list[str]]) -> Path:
    for folder, names in files.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / folder / name).touch()
    return root


MARKET = {
    "train_all/0002": ["0002_c2s1_000301_01.jpg.obj", "0002_c1s1_000451_03.jpg.obj"],
    "train_all/0007": ["0007_c1s6_028546_01.jpg.obj"],
    "train_all/0010": ["0010_c3s1_000901_02.jpg.obj", "0010_c1s1_000101_01.jpg.obj", "0010_c1s1_000101_01.jpg"],
    "train_all/0100": ["0100_c5s1_005001_01.jpg.obj"],
    "query/0003": ["0003_c1s1_000101_01.jpg.obj"],
    "gallery/-1": ["-1_c1s1_000001_00.jpg.obj", "-1_c6s2_000002_00.jpg.obj"],
    "gallery/0000": ["0000_c4s2_000003_00.jpg.obj"],
    "gallery/0003": ["0003_c2s1_000201_01.jpg.obj", "0003_c3s1_000301_01.jpg.obj"],
}


def test_scan_split_order_pids_and_cameras(tmp_path):
    root = make_tree(tmp_path, MARKET)
    (root / "train_all" / "stray_c1s1.jpg.obj").touch()  # files outside pid folders are not samples
    (root / "train_all" / "0002" / ".0002_c1s1_x.jpg.obj.partial").touch()  # an unfinished atomic write
    train = scan_split(root, "train_all")
    assert train == [
        Sample("train_all/0002/0002_c1s1_000451_03.jpg.obj", 2, 1),
        Sample("train_all/0002/0002_c2s1_000301_01.jpg.obj", 2, 2),
        Sample("train_all/0007/0007_c1s6_028546_01.jpg.obj", 7, 1),
        Sample("train_all/0010/0010_c1s1_000101_01.jpg.obj", 10, 1),  # the .jpg beside it is not a point file
        Sample("train_all/0010/0010_c3s1_000901_02.jpg.obj", 10, 3),
        Sample("train_all/0100/0100_c5s1_005001_01.jpg.obj", 100, 5),
    ]
    gallery = scan_split(root, "gallery")
    assert [(s.pid, s.camid) for s in gallery] == [(-1, 1), (-1, 6), (0, 4), (3, 2), (3, 3)]
    assert scan_split(root, "query") == [Sample("query/0003/0003_c1s1_000101_01.jpg.obj", 3, 1)]


def test_labels_are_the_index_of_the_pid_in_the_sorted_training_pids(tmp_path):
    root = make_tree(tmp_path, MARKET)
    labels = label_map(scan_split(root, "train_all"))
    assert labels == {2: 0, 7: 1, 10: 2, 100: 3}
    # the same as torchvision ImageFolder's class index of the (zero-padded) folder
    folders = sorted(p.name for p in (root / "train_all").iterdir() if p.is_dir())
    assert {int(f): i for i, f in enumerate(folders)} == labels


def test_training_pid_comes_from_the_folder_test_pid_from_the_name(tmp_path):
    """The original labels training images by folder (ImageFolder) and test images by file name."""
    root = make_tree(
        tmp_path,
        {
            "train_all/0005": ["0009_c1s1_000101_01.jpg.obj"],
            "val/0006": ["0008_c2s1_000101_01.jpg.obj"],
            "query/0005": ["0009_c1s1_000101_01.jpg.obj"],
        },
    )
    assert scan_split(root, "train_all") == [Sample("train_all/0005/0009_c1s1_000101_01.jpg.obj", 5, 1)]
    assert scan_split(root, "val")[0].pid == 6
    assert scan_split(root, "query")[0].pid == 9


@pytest.mark.parametrize(
    "scheme,files,expected",
    [
        ("duke", {"train_all/0005": ["0005_c2_f0046985.jpg.obj", "0005_c8_f0000001.jpg.obj"]}, [(5, 2), (5, 8)]),
        (
            "msmt",
            {
                "train_all/0000": ["0000_000_01_0303morning_0015_0.jpg.obj"],
                "train_all/1040": ["1040_025_15_0113noon_0964_3.jpg.obj"],
            },
            [(0, 1), (1040, 15)],
        ),
        ("cuhk", {"train_all/0001": ["0001_c1_1.png.obj", "0001_c2_6.png.obj"]}, [(1, 1), (1, 2)]),
    ],
)
def test_other_schemes_detected_and_explicit(tmp_path, scheme, files, expected):
    root = make_tree(tmp_path, files)
    assert [(s.pid, s.camid) for s in scan_split(root, "train_all")] == expected
    assert [(s.pid, s.camid) for s in scan_split(root, "train_all", scheme)] == expected


def test_bad_file_name_in_a_split_names_the_file(tmp_path):
    root = make_tree(tmp_path, {"query/0003": ["0003_c1s1_000101_01.jpg.obj", "0003_oops.jpg.obj"]})
    with pytest.raises(DataError, match="^query/0003/0003_oops.jpg.obj: cannot parse pid and camera for the market"):
        scan_split(root, "query")
    with pytest.raises(DataError, match="^query/0003/0003_c1s1_000101_01.jpg.obj: cannot parse .* msmt"):
        scan_split(root, "query", "msmt")  # an explicit scheme is not second-guessed


def test_non_integer_training_folder(tmp_path):
    root = make_tree(tmp_path, {"train_all/person2": ["0002_c1s1_000451_03.jpg.obj"]})
    with pytest.raises(
        DataError,
        match=f"^{re.escape(str(tmp_path / 'train_all' / 'person2'))}: identity folder name is not an integer",
    ):
        scan_split(root, "train_all")


def test_missing_and_empty_split(tmp_path):
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'query'))}: split folder does not exist"):
        scan_split(tmp_path, "query")
    (tmp_path / "query").mkdir()
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'query'))}: empty split"):
        scan_split(tmp_path, "query")
    make_tree(tmp_path, {"query/0001": ["0001_c1s1_000101_01.jpg", "notes.txt"]})  # no point files
    (tmp_path / "query" / "0001_c1s1_000101_01.jpg.obj").touch()  # not in a pid folder
    with pytest.raises(DataError, match="empty split"):
        scan_split(tmp_path, "query")
