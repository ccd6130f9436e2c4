"""Bounded fuzz tests of the point-file readers and the shard reader (issue 7).

Every input here is random or a mutation of a valid one, and the readers may answer only with the
errors they document:

- `read_points` (.obj, .ply, .npy, .npz): a `DataError` whose message names the file; a cloud it
  returns is float32 (N, 3) xyz, finite, and rgb in [0, 1];
- `read_tar_members` + `decode_sample`, `ShardReader`, `stream_split`: a `ShardError` naming the
  shard (and sample); a sample the reader returns from bytes that were not changed is the one
  that was written;
- `read_npy`: a `ValueError` (its docstring's contract; `decode_sample` turns it into a ShardError);
- `load_index` / `ShardIndex.from_json`: a `ShardError` naming the index file.

`.pcd` files are not fuzzed in this process: open3d 0.20 (checked) crashes the process
(segmentation fault) on some of them, for example a binary_compressed file whose POINTS line was
edited. `read_points` checks .ply/.pcd headers before open3d sees them (see
`points._check_open3d_header`); the cases that crashed or took all memory are pinned in
test_points.py.

Memory is bounded too: while these tests run, the process may not grow its address space by more
than `HEADROOM` bytes, so a header that declares a huge array fails as a MemoryError (a failed test)
instead of waking the OOM killer.

Bounded in time: CI runs a fixed set of examples (`derandomize=True`, no example database), about
10 s of CPU in all (20 s of wall time on two shared, busy cores). For a longer local search with fresh random inputs, set the number of examples per
test, for example `OGNET_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_fuzz.py`;
hypothesis then prints a `@reproduce_failure`/seed line for anything it finds.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import resource
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ognet.data.points import read_points
from ognet.data.shards import (
    INDEX_NAME,
    Sample,
    ShardIndex,
    ShardReader,
    decode_sample,
    encode_sample,
    load_index,
    read_npy,
    read_tar_members,
    sample_key,
    shard_name,
    stream_split,
    write_shard,
)
from ognet.errors import DataError, ShardError

LONG_RUN = int(os.environ.get("OGNET_FUZZ_EXAMPLES", "0"))
HEADROOM = 3 * 2**30
pytestmark = [  # warnings that garbage input earns by design
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),  # 1e300 as float32
    pytest.mark.filterwarnings("ignore:Reading `.npy` or `.npz` file required additional header parsing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning"),  # zip archives built here
]


def fuzz(examples: int):
    """Hypothesis settings: `examples` fixed inputs in CI, `OGNET_FUZZ_EXAMPLES` random ones locally."""
    return settings(
        max_examples=LONG_RUN or examples,
        derandomize=not LONG_RUN,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module", autouse=True)
def bounded_memory():
    """Refuse allocations beyond HEADROOM while fuzzing: a MemoryError, not the OOM killer."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = size + HEADROOM if hard == resource.RLIM_INFINITY else min(size + HEADROOM, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One folder for the files of every example (each example overwrites its file)."""
    return tmp_path_factory.mktemp("fuzz")


# ------------------------------------------------------------------------------------------------
# Mutations


@st.composite
def mutated(draw, base: bytes, max_edits: int = 4) -> bytes:
    """`base` after a few bit flips, byte sets, truncations, insertions, deletions or repeats."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, max_edits))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "repeat"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif kind == "repeat":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))] * draw(st.integers(1, 8))
    return bytes(data)


def expect_clean(path: Path):
    """`read_points(path)` returns a valid cloud or raises a DataError naming `path`; anything else fails."""
    try:
        cloud = read_points(path)
    except DataError as e:
        assert str(e).startswith(f"{path}: "), str(e)
        event("DataError")
        return None
    event("read")
    assert cloud.xyz.dtype == np.float32 and cloud.rgb.dtype == np.float32
    assert cloud.xyz.ndim == 2 and cloud.xyz.shape[1] == 3 and cloud.rgb.shape == cloud.xyz.shape
    assert len(cloud.xyz) > 0 and np.isfinite(cloud.xyz).all()
    assert ((cloud.rgb >= 0) & (cloud.rgb <= 1)).all()
    return cloud


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------------
# .obj text


NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(0, 1).map(repr),
    st.integers(-(10**40), 10**40).map(str),
    st.sampled_from(
        [
            "nan",
            "-inf",
            "inf",
            "1e999",
            "-1e999",
            "1e300",
            "-0",
            "1e-400",
            "0x1p3",
            "1_0",
            "+.5e-3",
            ".",
            "-",
            "1e",
            "--1",
            "1,5",
            "\u0663",
            "\x00",
            "1\x00",
            "NaN(1)",
            "infinity",
            "0" * 400,
        ]
    ),
    st.text(max_size=4),
)
GOOD_V = st.tuples(
    st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3), st.lists(st.floats(0, 1), min_size=3, max_size=3)
).map(lambda v: "v " + " ".join(map(repr, v[0] + v[1])))
OBJ_LINE = st.one_of(
    GOOD_V,
    GOOD_V,
    GOOD_V,
    st.lists(NUMBER, max_size=8).map(lambda xs: "v " + " ".join(xs)),
    st.lists(NUMBER, min_size=3, max_size=3).map(lambda xs: "v " + " ".join(xs)),
    st.lists(NUMBER, min_size=6, max_size=6).map(lambda xs: "v  " + "\t".join(xs) + " "),
    st.sampled_from(
        [
            "f 1 2 3",
            "f 1/1 2/2 3/3",
            "# comment v 1 2 3 4 5 6",
            "",
            "   ",
            "vn 0 0 1",
            "vt 0.5 0.5",
            "v",
            "v ",
            "V 1 2 3 0 0 0",
            "mtllib x.mtl",
            "o person",
            "g",
            "\tv 1 2 3 0 0 0",
        ]
    ),
    st.text(max_size=20),
)


@st.composite
def obj_files(draw) -> bytes:
    lines = draw(st.lists(OBJ_LINE, max_size=12))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    data = newline.join(lines).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        data += newline.encode()
    if data and draw(st.integers(0, 3)) == 0:  # bytes that are not UTF-8
        pos = draw(st.integers(0, len(data)))
        data = (
            data[:pos] + draw(st.binary(min_size=1, max_size=4).filter(lambda b: b"\n" not in b)) + b"\xff" + data[pos:]
        )
    return data


@fuzz(200)
@given(data=obj_files())
def test_obj_text(work, data):
    expect_clean(write(work / "p.jpg.obj", data))


@fuzz(100)
@given(data=st.binary(max_size=300))
def test_obj_random_bytes(work, data):
    expect_clean(write(work / "r.obj", data))


# ------------------------------------------------------------------------------------------------
# .npy and .npz


def npy(array: np.ndarray, version=(1, 0)) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=version, allow_pickle=True)
    return buf.getvalue()


def npy_with_header(header: str, body: bytes, version: int = 1) -> bytes:
    """An .npy payload with any header text, its length field consistent (or not, for version 3+)."""
    text = header.encode("latin1", "replace")
    length = struct.pack("<H", len(text)) if version == 1 else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes([version % 256, 0]) + length + text + body


DESCR = st.one_of(
    st.sampled_from(
        [
            "<f4",
            "<f8",
            ">f4",
            "<f2",
            "|u1",
            "<i8",
            "|b1",
            "<c16",
            "|O",
            "O",
            "|V0",
            "|S0",
            "<U0",
            "|S3",
            "<U2",
            "<M8[s]",
            "|V12",
            "f4",
            "float32",
            "<f16",
            "xyz",
            "",
            "<f4 ",
            "<i4",
        ]
    ),
    st.just([("x", "<f4"), ("y", "<f4"), ("z", "<f4")]),
    st.just([("a", "|O")]),
    st.just(("<f4", (2**40,))),
    st.just(("<f4", (-1,))),
    st.just([("", "|V4"), ("x", "<f4")]),
    st.just(["x"]),
    st.just(3),
)
DIM = st.one_of(st.integers(0, 12), st.sampled_from([-1, -2, 2**31, 2**40, 2**63, 2**64 + 1, 10**30]))
HEADER_DICT = st.fixed_dictionaries(
    {
        "descr": DESCR,
        "fortran_order": st.one_of(st.booleans(), st.sampled_from([0, 1, None, "False"])),
        "shape": st.one_of(
            st.lists(DIM, max_size=4).map(tuple), st.just((1,) * 70), st.just([4, 6]), st.just(6), st.just((2.0, 6))
        ),
    },
    optional={"extra": st.just(1)},
)


@st.composite
def npy_payloads(draw) -> bytes:
    """Valid payloads of various arrays, payloads with generated headers, and mutations of both."""
    kind = draw(st.sampled_from(["valid", "header", "raw-header"]))
    if kind == "valid":
        n = draw(st.integers(0, 5))
        cols = draw(st.sampled_from([6, 6, 3, 4]))
        dtype = draw(st.sampled_from([np.float32, np.float64, np.uint8, np.int64, np.float16]))
        array = np.asarray(draw(st.lists(st.floats(0, 1), min_size=n * cols, max_size=n * cols)), dtype).reshape(
            n, cols
        )
        if draw(st.booleans()):
            array = np.asfortranarray(array)
        data = npy(array, draw(st.sampled_from([(1, 0), (2, 0)])))
    else:
        header = draw(HEADER_DICT)
        text = (
            repr(header)
            if kind == "header"
            else draw(
                st.sampled_from(
                    [
                        repr(header),
                        "{",
                        "[]",
                        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 6), }" + "(" * 300,
                        "{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 6L), }",
                        "{[1]: 2}",
                        "{'a': {[]: 1}}",
                        "-" * 5000 + "1",
                        "1" * 5000,
                        "{'descr': '<f4', 'fortran_order': False, 'shape': (" + "9" * 5000 + ",)}",
                        "\x00",
                        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 6), 'descr': 'O'}",
                    ]
                )
            )
        )
        body = draw(st.one_of(st.binary(max_size=64), st.just(bytes(48)), st.just(bytes(4 * 12))))
        data = npy_with_header(text + "\n", body, draw(st.sampled_from([1, 1, 2, 3, 0, 255])))
    if draw(st.integers(0, 2)) == 0:
        data = draw(mutated(data))
    return data


@fuzz(200)
@given(data=npy_payloads())
def test_read_npy(data):
    try:
        array = read_npy(data)
    except ValueError:  # documented: not an .npy payload, pickled, unsupported or inconsistent header
        event("ValueError")
        return
    event("read")
    assert isinstance(array, np.ndarray) and array.flags.writeable and not array.dtype.hasobject
    assert array.nbytes <= len(data)  # nothing beyond what the payload holds


@fuzz(200)
@given(data=st.one_of(npy_payloads(), st.binary(max_size=200)))
def test_npy_file(work, data):
    expect_clean(write(work / "p.npy", data))


NPZ_NAMES = st.sampled_from(
    [
        "xyz.npy",
        "rgb.npy",
        "points.npy",
        "xyz",
        "rgb",
        "points",
        "other.npy",
        "points.npy.npy",
        "../xyz.npy",
        "/abs.npy",
        "dir/",
        "",
    ]
)
COMPRESSIONS = st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])


@st.composite
def npz_files(draw) -> bytes:
    """Zip archives of npy (or not) members with the names `read_points` looks for, maybe mutated."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=draw(COMPRESSIONS)) as z:
        members = draw(st.lists(st.tuples(NPZ_NAMES, st.one_of(npy_payloads(), st.binary(max_size=40))), max_size=4))
        n = draw(st.integers(1, 4))
        if draw(st.booleans()):  # a valid pair often enough to reach the success branch
            z.writestr("xyz.npy", npy(np.zeros((n, 3), np.float32)))
            z.writestr("rgb.npy", npy(np.full((n, 3), 0.5)))
        for name, payload in members:
            with contextlib.suppress(ValueError):  # zipfile refuses some names itself
                z.writestr(name or "x", payload)
    data = buf.getvalue()
    if draw(st.integers(0, 2)) == 0:
        data = draw(mutated(data))
    return data


@fuzz(150)
@given(data=st.one_of(npz_files(), st.binary(max_size=200)))
def test_npz_file(work, data):
    expect_clean(write(work / "p.npz", data))


# ------------------------------------------------------------------------------------------------
# .ply (open3d); .pcd is not fuzzed in-process, see the module docstring


@pytest.fixture(scope="module")
def ply_bases(work) -> list[bytes]:
    import open3d as o3d  # a dependency; imported here as read_points does, it costs ~1 s

    rng = np.random.default_rng(0)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(rng.random((12, 3))))
    cloud.colors = o3d.utility.Vector3dVector(rng.random((12, 3)))
    bases = []
    for ascii in (True, False):
        path = work / f"base-{ascii}.ply"
        assert o3d.io.write_point_cloud(str(path), cloud, write_ascii=ascii)
        bases.append(path.read_bytes())
    return bases


HEADER_NUMBER = st.sampled_from(
    [
        b"0",
        b"1",
        b"11",
        b"13",
        b"-1",
        b"+12",
        b"1e3",
        b"0x10",
        b"1000000",
        b"1000000000",
        b"4294967308",
        b"9223372036854775807",
        b"99999999999999999999",
        b"",
        b"12 12",
    ]
)


@st.composite
def ply_files(draw, bases: list[bytes]) -> bytes:
    data = draw(st.sampled_from(bases))
    if draw(st.booleans()):  # edit the header's vertex count or a property type
        data = data.replace(b"element vertex 12", b"element vertex " + draw(HEADER_NUMBER), 1)
        if draw(st.booleans()):
            data = data.replace(
                b"property double x",
                b"property "
                + draw(
                    st.sampled_from(
                        [b"list uchar double", b"list uint double", b"char", b"int", b"float", b"bogus", b""]
                    )
                )
                + b" x",
                1,
            )
    if draw(st.booleans()):
        data = draw(mutated(data))
    return data


@fuzz(200)
@given(data=st.data())
def test_ply_file(work, ply_bases, data):
    raw = data.draw(ply_files(ply_bases))
    path = write(work / "p.ply", raw)
    cloud = expect_clean(path)
    if cloud is not None:
        assert len(cloud.xyz) <= len(raw)  # no points made up from a header's count alone


# ------------------------------------------------------------------------------------------------
# Shard data: tar members of one sample, decode_sample, read_npy


WHERE = "shard-000000.tar, sample 0"


def one_sample(index: int = 0, n: int = 8, colors: str = "float32") -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(index)
    meta = {"pid": 7, "camid": 2, "label": 0, "path": f"7/img{index}.jpg.obj"}
    return encode_sample(
        index, rng.normal(size=(n, 3)).astype(np.float32), rng.random((n, 3)).astype(np.float32), meta, colors
    )


@pytest.fixture(scope="module")
def sample_tar(work) -> bytes:
    """The bytes `ShardReader` hands to `read_tar_members` for one sample, from a real shard."""
    path = work / shard_name(0)
    _, [[offset, length, _]] = write_shard(path, [one_sample()])
    return path.read_bytes()[offset : offset + length]


def with_checksum(header: bytearray) -> bytearray:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return header


@st.composite
def header_edits(draw, data: bytes) -> bytes:
    """Edit one field of one member header, then (usually) fix the header checksum so the edit is seen."""
    starts = [0]
    while starts[-1] + 512 <= len(data):
        size = int(data[starts[-1] + 124 : starts[-1] + 136].strip(b"\0 ") or b"0", 8)
        starts.append(starts[-1] + 512 + -(-size // 512) * 512)
    out = bytearray(data)
    pos = draw(st.sampled_from(starts[:-1]))
    header = out[pos : pos + 512]
    field = draw(st.sampled_from(["name", "type", "size", "prefix", "mode", "magic", "checksum", "linkname"]))
    if field == "name":
        name = draw(
            st.sampled_from(
                [
                    b"../00000000.json",
                    b"/etc/passwd",
                    b"a/00000000.json",
                    b".hidden",
                    b"..",
                    b".",
                    b"",
                    b"00000000\xff.json",
                    b"00000000.json",
                    b"00000001.json",
                    b"00000000",
                    b"00000000.xyz.npy",
                    b"00000000.rgb.npy",
                    b"x" * 100,
                    b"a\\b",
                ]
            )
        )
        header[:100] = name[:100].ljust(100, b"\0")
    elif field == "type":
        header[156:157] = draw(
            st.sampled_from([b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"x", b"g", b"L", b"K", b"\0", b"0", b"\xff"])
        )
    elif field == "size":
        header[124:136] = draw(
            st.sampled_from(
                [
                    b"%011o\0" % (2**33 - 1),
                    b"77777777777\0",
                    b"-0000000001\0",
                    b"-1\0",
                    b"\x80" + bytes(10) + b"\x01",
                    b"\xff" * 12,
                    b"00000000000\0",
                    b"0000000001\0\0",
                    b"9\0",
                    b"1_0\0",
                    b"+00000000010",
                    b"   \0",
                    b"%011o\0" % (256 * 2**20),
                    b"%011o\0" % (256 * 2**20 + 1),
                    b"0o10\0",
                    b" 1 2\0",
                ]
            )
        )[:12].ljust(12, b"\0")
    elif field == "prefix":
        header[345:500] = draw(st.sampled_from([b"dir", b"..", b"\xff"])).ljust(155, b"\0")
    elif field == "mode":
        header[100:108] = draw(st.sampled_from([b"9999999\0", b"\xff" * 8, b"0004755\0"]))
    elif field == "magic":
        header[257:265] = draw(st.sampled_from([b"ustar  \0", b"\0" * 8, b"garbage!"]))
    elif field == "linkname":
        header[157:257] = b"/etc/passwd".ljust(100, b"\0")
    if field == "checksum":
        header[148:156] = draw(
            st.sampled_from([b"0000000\0", b"\xff" * 8, b"-1\0\0\0\0\0\0", b"77777777", b"        "])
        )
    elif draw(st.integers(0, 5)):
        header = with_checksum(header)
    out[pos : pos + 512] = header
    return bytes(out)


def check_tar_sample(data: bytes) -> None:
    """`read_tar_members` + `decode_sample` on `data`: a Sample, or a ShardError naming WHERE."""
    try:
        members = dict(read_tar_members(data, WHERE))
        sample = decode_sample(members, sample_key(0), WHERE)
    except ShardError as e:
        assert str(e).startswith(WHERE + ":"), str(e)
        event("ShardError")
        return
    event("decoded")
    assert isinstance(sample, Sample) and sample.xyz.dtype == np.float32 and sample.rgb.dtype == np.float32
    assert sample.xyz.ndim == 2 and sample.xyz.shape[1] == 3 and sample.rgb.shape == sample.xyz.shape


def test_the_unchanged_sample_decodes(sample_tar):
    members = dict(read_tar_members(sample_tar, WHERE))
    assert decode_sample(members, sample_key(0), WHERE).xyz.shape == (8, 3)


@fuzz(200)
@given(data=st.data())
def test_tar_members_mutated(sample_tar, data):
    raw = data.draw(st.one_of(mutated(sample_tar), header_edits(sample_tar), st.binary(max_size=1600)))
    check_tar_sample(raw)


@fuzz(200)
@given(data=st.data())
def test_tar_members_header_edits(sample_tar, data):
    raw = data.draw(header_edits(sample_tar))
    check_tar_sample(data.draw(st.one_of(st.just(raw), mutated(raw))))


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8,
)
META_KEYS = ("index", "pid", "camid", "label", "path")


@st.composite
def meta_members(draw) -> bytes:
    """The json member: valid metadata with some values replaced, or any JSON, or nesting, or bytes."""
    kind = draw(st.sampled_from(["edit", "edit", "any", "deep", "bytes"]))
    if kind == "edit":
        meta = {"index": 0, "pid": 7, "camid": 2, "label": 0, "path": "7/img0.jpg.obj"}
        for key in draw(st.lists(st.sampled_from(META_KEYS), max_size=3)):
            if draw(st.booleans()):
                meta[key] = draw(JSON)
            else:
                meta.pop(key, None)
        return json.dumps(meta).encode()
    if kind == "any":
        return json.dumps(draw(JSON)).encode()
    if kind == "deep":
        depth = draw(st.integers(1, 100_000))
        return b"[" * depth + b"]" * depth
    return draw(st.binary(max_size=40))


@fuzz(200)
@given(data=st.data())
def test_decode_sample(data):
    members = dict(one_sample(colors=data.draw(st.sampled_from(["float32", "uint8"]))))
    key = sample_key(0)
    field = data.draw(st.sampled_from(["json", "xyz.npy", "rgb.npy", "name"]))
    if field == "json":
        members[f"{key}.json"] = data.draw(meta_members())
    elif field == "name":
        name = data.draw(st.sampled_from(list(members)))
        members[data.draw(st.sampled_from([f"{key}", f"{key}.", "00000001.json", f"{key}.other", "x.json"]))] = (
            members.pop(name)
        )
    else:
        members[f"{key}.{field}"] = data.draw(st.one_of(npy_payloads(), st.binary(max_size=40)))
    try:
        sample = decode_sample(members, key, WHERE)
    except ShardError as e:
        assert str(e).startswith(WHERE + ":"), str(e)
        event("ShardError")
        return
    event("decoded")
    assert sample.xyz.dtype == np.float32 and sample.xyz.ndim == 2 and sample.rgb.shape == sample.xyz.shape
    assert all(isinstance(v, int) for v in (sample.index, sample.pid, sample.camid, sample.label))


# ------------------------------------------------------------------------------------------------
# A real split: index.json, ShardReader, stream_split


SHARD_SIZES = (3, 2)  # samples per shard


@pytest.fixture(scope="module")
def split(work) -> tuple[Path, dict[str, bytes], list[Sample]]:
    """A packed split of two shards of 8-point samples: its folder, its files and what they hold."""
    folder = work / "split"
    folder.mkdir()
    entries, locations, shard_ids, want = [], [], [], []
    for shard, count in enumerate(SHARD_SIZES):
        samples = [one_sample(len(want) + k) for k in range(count)]
        for members in samples:
            want.append(decode_sample(dict(members), sample_key(len(want)), "x"))
        entry, locs = write_shard(folder / shard_name(shard), samples)
        entries.append(entry)
        locations += locs
        shard_ids += [shard] * count
    ShardIndex(
        split="query",
        shards=entries,
        pids=np.array([s.pid for s in want]),
        camids=np.array([s.camid for s in want]),
        labels=np.array([s.label for s in want]),
        paths=[s.path for s in want],
        shard_ids=np.array(shard_ids),
        locations=np.array(locations),
        label_map={7: 0},
    ).save(folder)
    return folder, {p.name: p.read_bytes() for p in folder.iterdir()}, want


def same_sample(a: Sample, b: Sample) -> bool:
    return (
        (a.index, a.pid, a.camid, a.label, a.path) == (b.index, b.pid, b.camid, b.label, b.path)
        and np.array_equal(a.xyz, b.xyz)
        and np.array_equal(a.rgb, b.rgb)
    )


def test_the_split_reads_back(split):
    folder, _, want = split
    reader = ShardReader(folder, cache_dir=folder / "cache")
    assert all(same_sample(reader[i], want[i]) for i in range(len(want)))
    assert all(same_sample(a, b) for a, b in zip(stream_split(folder, cache_dir=folder / "cache"), want, strict=True))


def json_paths(doc, prefix=()) -> list[tuple]:
    """Every key path into a JSON document, the document itself included."""
    paths = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            paths += json_paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            paths += json_paths(v, prefix + (i,))
    return paths


@st.composite
def index_documents(draw, base: dict) -> bytes:
    doc = copy.deepcopy(base)
    paths = json_paths(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            if not path:
                doc = draw(JSON)
            elif draw(st.integers(0, 3)) == 0 and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = draw(
                    st.one_of(
                        JSON,
                        st.sampled_from(
                            [-1, 2**62, 10**13, 2**63, 10**30, 1e300, float("nan"), "1", [], {}, [[0, 0, 0]]]
                        ),
                    )
                )
        except (KeyError, IndexError, TypeError):  # an earlier edit removed or replaced this path
            pass
    return json.dumps(doc).encode()


@fuzz(200)
@given(data=st.data())
def test_index_json(work, split, data):
    _, files, want = split
    base = json.loads(files[INDEX_NAME])
    raw = data.draw(st.one_of(index_documents(base), mutated(files[INDEX_NAME]), st.binary(max_size=60)))
    target = work / "index-fuzz"
    target.mkdir(exist_ok=True)
    for name, content in files.items():
        (target / name).write_bytes(raw if name == INDEX_NAME else content)
    source = str(target / INDEX_NAME)
    try:
        index = load_index(target)
    except ShardError as e:
        assert str(e).startswith(source + ":"), str(e)
        event("ShardError")
        return
    event("loaded")
    assert isinstance(index, ShardIndex)
    # an index that loads must lead the reader to its samples, or to a ShardError about them
    reader = ShardReader(target, cache_dir=target / "cache")
    try:
        for i in range(len(reader)):
            try:
                sample = reader[i]
            except ShardError as e:
                assert str(target) in str(e), str(e)
                continue
            assert any(same_sample(sample, w) for w in want)
    finally:
        reader.close()


@st.composite
def shard_damage(draw, files: dict[str, bytes]) -> dict[str, bytes]:
    """Shard files with a few bytes replaced at random offsets, sometimes truncated or extended."""
    out = dict(files)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from([shard_name(i) for i in range(len(SHARD_SIZES))]))
        data = bytearray(out[name])
        kind = draw(st.sampled_from(["bytes", "bytes", "bytes", "truncate", "extend"]))
        if kind in ("bytes", "truncate") and not data:  # truncated to nothing already
            continue
        if kind == "bytes":
            pos = draw(st.integers(0, len(data) - 1))
            patch = draw(st.binary(min_size=1, max_size=8))
            data[pos : pos + len(patch)] = patch
            del data[len(out[name]) :]  # keep the size: the index's byte count still matches
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data) - 1)) :]
        else:
            data += draw(st.binary(min_size=1, max_size=600))
        out[name] = bytes(data)
    return out


def write_damaged_split(target: Path, files: dict[str, bytes], data) -> tuple[Path, dict[str, bytes], ShardIndex]:
    """A damaged copy of the split's files in `target`: (target, the damaged files, its index)."""
    damaged = data.draw(shard_damage(files))
    target.mkdir(exist_ok=True)
    for name, content in damaged.items():
        (target / name).write_bytes(content)
    return target, damaged, load_index(target)


def changed(before: bytes, after: bytes, offset: int, length: int) -> bool:
    return before[offset : offset + length] != after[offset : offset + length]


@fuzz(150)
@given(data=st.data())
def test_shard_reader_on_damaged_shards(work, split, data):
    _, files, want = split
    target, damaged, index = write_damaged_split(work / "reader-fuzz", files, data)
    reader = ShardReader(target, cache_dir=target / "cache")
    try:
        for i in range(len(reader)):
            name = index.shards[index.shard_ids[i]]["name"]
            offset, length, _ = index.locations[i].tolist()
            try:
                sample = reader[i]
            except ShardError as e:
                assert str(e).startswith(f"{target / name}, sample {i}:"), str(e)
                assert changed(files[name], damaged[name], offset, length)
                event("ShardError")
                continue
            event("read")
            assert same_sample(sample, want[i])
    finally:
        reader.close()


@fuzz(100)
@given(data=st.data())
def test_stream_split_on_damaged_shards(work, split, data):
    """No checksums on this path (verify_split checks them): damaged samples may read as other values,
    but the only error is a ShardError naming a shard, and undamaged samples read unchanged."""
    _, files, want = split
    target, damaged, index = write_damaged_split(work / "stream-fuzz", files, data)
    try:
        for k, sample in enumerate(stream_split(target, cache_dir=target / "cache")):
            assert isinstance(sample, Sample) and k < len(want)
            name = index.shards[index.shard_ids[k]]["name"]
            if not changed(files[name], damaged[name], *index.locations[k, :2].tolist()):
                assert same_sample(sample, want[k])
    except ShardError as e:
        assert re.search(re.escape(str(target / "shard-")) + r"\d{6}\.tar", str(e)), str(e)
        event("ShardError")
