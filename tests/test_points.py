"""Point-file readers: .obj in file order, .ply/.pcd via open3d, .npy/.npz, and every bad input."""

from __future__ import annotations

import io
import pickle
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import require

from ognet.data.points import POINT_SUFFIXES, read_points, validate_points, write_obj
from ognet.errors import DataError

N = 300


def cloud(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xyz = (rng.normal(size=(n, 3)) + [0.2, -1.0, 3.0]).astype(np.float32)
    rgb = rng.random((n, 3)).astype(np.float32)
    rgb[::17] = 1.0  # some white (blank) points, as in the original data
    return xyz, rgb


def obj_text(xyz: np.ndarray, rgb: np.ndarray) -> str:
    return "".join(
        f"v {x!r} {y!r} {z!r} {r!r} {g!r} {b!r}\n" for (x, y, z), (r, g, b) in zip(xyz.tolist(), rgb.tolist())
    )


# ------------------------------------------------------------------------------------------------
# .obj


def test_obj_is_read_in_file_order_ignoring_faces_comments_and_other_lines(tmp_path):
    text = (
        "# written by hmr\nmtllib none.mtl\n"
        "v 0.5 -1.25 2 1 0 0.5\n"
        "vn 0 0 1\nvt 0.1 0.2\n"
        "v -3 4e-3 1e2 0.25 0.75 1\r\n"  # CRLF lines are fine too
        "\n"
        "v 7 8 9 0 0 0\n"
        "f 1 2 3\n"
    )
    (tmp_path / "a.jpg.obj").write_text(text)
    c = read_points(tmp_path / "a.jpg.obj")
    assert c.xyz.dtype == np.float32 and c.rgb.dtype == np.float32
    np.testing.assert_array_equal(c.xyz, np.float32([[0.5, -1.25, 2], [-3, 4e-3, 100], [7, 8, 9]]))
    np.testing.assert_array_equal(c.rgb, np.float32([[1, 0, 0.5], [0.25, 0.75, 1], [0, 0, 0]]))


def test_original_bg_format_one_face_line_keeps_every_vertex(tmp_path):
    """3DMarket+bg files: 8192 `v` lines and a single `f 1 2 3` line (the original's file-size hack)."""
    xyz, rgb = cloud(8192)
    path = tmp_path / "0002_c1s1_000451_03.jpg.obj"
    path.write_text(obj_text(xyz, rgb) + "f 1 2 3\n")
    c = read_points(path)
    assert c.xyz.shape == c.rgb.shape == (8192, 3)
    np.testing.assert_array_equal(c.xyz, xyz)  # repr() of a float32 round-trips exactly
    np.testing.assert_array_equal(c.rgb, rgb)


def test_write_obj_round_trip_and_format(tmp_path):
    xyz, rgb = cloud()
    path = tmp_path / "sub" / "p.jpg.obj"
    write_obj(path, xyz, rgb)
    lines = path.read_text().splitlines()
    assert len(lines) == N + 1 and lines[-1] == "f 1 2 3"
    assert all(line.startswith("v ") and len(line.split()) == 7 for line in lines[:-1])
    c = read_points(path)
    # 6 decimals: half a unit of the last decimal, plus float32 rounding of the value read back
    np.testing.assert_allclose(c.xyz, xyz, rtol=0, atol=5e-7 + 4e-7 * np.abs(xyz).max())
    np.testing.assert_allclose(c.rgb, rgb, rtol=0, atol=5e-7 + 6e-8)
    assert [p.name for p in path.parent.iterdir()] == ["p.jpg.obj"]  # no temporary file left


def test_write_obj_refuses_bad_points_and_leaves_no_file(tmp_path):
    xyz, rgb = cloud()
    rgb[5] = 2.0
    with pytest.raises(DataError, match="point 5 has colour"):
        write_obj(tmp_path / "bad.obj", xyz, rgb)
    assert list(tmp_path.iterdir()) == []


def test_open3d_drops_vertices_that_no_face_uses(tmp_path):
    """Why we parse .obj ourselves: open3d >= 0.10 keeps only vertices referenced by faces, so the
    original's one-face files come back as 3 points. If this ever fails, open3d changed."""
    o3d = require("open3d", "the open3d extra reads .ply/.pcd (tests/run.sh installs it with dev)")
    xyz, rgb = cloud()
    path = tmp_path / "p.jpg.obj"
    write_obj(path, xyz, rgb)
    mesh = o3d.io.read_triangle_mesh(str(path))
    assert len(mesh.vertices) == 3
    np.testing.assert_allclose(np.asarray(mesh.vertices), xyz[:3], atol=1e-6)
    assert len(read_points(path).xyz) == N


# ------------------------------------------------------------------------------------------------
# .ply / .pcd (open3d), .npy, .npz


@pytest.mark.parametrize("suffix", [".ply", ".pcd"])
@pytest.mark.parametrize("ascii", [False, True])
def test_ply_and_pcd_written_by_open3d(tmp_path, suffix, ascii):
    o3d = require("open3d", "the open3d extra reads .ply/.pcd (tests/run.sh installs it with dev)")
    xyz, rgb = cloud()
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz.astype(np.float64)))
    pc.colors = o3d.utility.Vector3dVector(rgb.astype(np.float64))
    path = tmp_path / f"p{suffix}"
    assert o3d.io.write_point_cloud(str(path), pc, write_ascii=ascii)
    c = read_points(path)
    assert c.xyz.dtype == np.float32 and c.xyz.shape == (N, 3)
    np.testing.assert_allclose(c.xyz, xyz, rtol=0, atol=1e-5 if ascii else 0)
    # open3d stores colours as 8 bits: k/255, error <= 0.5/255
    np.testing.assert_allclose(c.rgb, rgb, rtol=0, atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(c.rgb * 255, np.rint(c.rgb * 255), atol=1e-4)


def test_npy_n_by_6(tmp_path):
    xyz, rgb = cloud()
    np.save(tmp_path / "p.npy", np.hstack([xyz, rgb]).astype(np.float64))
    c = read_points(tmp_path / "p.npy")
    assert c.xyz.dtype == np.float32
    np.testing.assert_array_equal(c.xyz, xyz)
    np.testing.assert_array_equal(c.rgb, rgb)


def test_npz_xyz_rgb_and_points(tmp_path):
    xyz, rgb = cloud()
    np.savez(tmp_path / "a.npz", xyz=xyz, rgb=rgb)
    np.savez_compressed(tmp_path / "b.npz", points=np.hstack([xyz, rgb]))
    for name in ("a.npz", "b.npz"):
        c = read_points(tmp_path / name)
        np.testing.assert_array_equal(c.xyz, xyz)
        np.testing.assert_array_equal(c.rgb, rgb)


def test_integer_colours_0_or_1_are_accepted_as_numbers(tmp_path):
    np.save(tmp_path / "p.npy", np.array([[1, 2, 3, 0, 1, 0]], dtype=np.int64))
    c = read_points(tmp_path / "p.npy")
    np.testing.assert_array_equal(c.rgb, np.float32([[0, 1, 0]]))


# ------------------------------------------------------------------------------------------------
# Bad input: a DataError that names the file and says what is wrong


def write_text(text: str, name: str = "p.jpg.obj"):
    def make(d: Path) -> Path:
        (d / name).write_text(text)
        return d / name

    return make


def write_npy(array: np.ndarray, name: str = "p.npy", **kwargs):
    def make(d: Path) -> Path:
        np.save(d / name, array, **kwargs)
        return d / name

    return make


def write_npz(name: str = "p.npz", **arrays):
    def make(d: Path) -> Path:
        np.savez(d / name, **arrays)
        return d / name

    return make


def write_bytes(data: bytes, name: str):
    def make(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name

    return make


def directory(name: str):
    def make(d: Path) -> Path:
        (d / name).mkdir()
        return d / name

    return make


def truncated_npy(d: Path) -> Path:
    np.save(d / "p.npy", np.zeros((100, 6)))
    data = (d / "p.npy").read_bytes()
    (d / "p.npy").write_bytes(data[:300])
    return d / "p.npy"


GOOD_V = "v 0 0 0 0.5 0.5 0.5\n"
BAD_INPUTS = {
    # name: (make the file in a folder, expected message fragment)
    "missing file": (lambda d: d / "absent.jpg.obj", "cannot read point file"),
    "unreadable (a directory)": (directory("dir.jpg.obj"), "cannot read point file"),
    "unsupported suffix": (write_text("v 0 0 0 1 1 1\n", "p.jpg"), "unsupported point file type"),
    "empty obj": (write_text(""), "no points"),
    "obj with faces only": (write_text("# comment\nf 1 2 3\n"), "no points"),
    "obj without colours": (write_text("v 1 2 3\nv 4 5 6\n"), "no colours"),
    "obj ragged vertex": (write_text(GOOD_V + "v 1 2 3 0.5 0.5\n" + GOOD_V), "vertex 1 has 5 values"),
    "obj unparsable number": (write_text(GOOD_V + "v 1 2 x 0.5 0.5 0.5\n"), "unparsable vertex line"),
    "obj NaN coordinate": (write_text(GOOD_V * 3 + "v 1 nan 3 0.5 0.5 0.5\n"), "point 3 has a NaN or infinite"),
    "obj infinite coordinate": (write_text("v inf 0 0 0.5 0.5 0.5\n" + GOOD_V), "point 0 has a NaN or infinite"),
    "obj colour above 1": (
        write_text(GOOD_V + "v 0 0 0 0.5 255 0.5\n"),
        "point 1 has colour [0.5, 255.0, 0.5] outside [0, 1]",
    ),
    "obj colour below 0": (write_text("v 0 0 0 -0.1 0.5 0.5\n"), "outside [0, 1]"),
    "obj NaN colour": (write_text("v 0 0 0 nan 0.5 0.5\n"), "outside [0, 1]"),
    "npy without colours": (write_npy(np.zeros((4, 3))), "no colours"),
    "npy wrong width": (write_npy(np.zeros((4, 4))), "expected an (N, 6) array"),
    "npy one-dimensional": (write_npy(np.zeros(6)), "expected an (N, 6) array"),
    "npy no points": (write_npy(np.zeros((0, 6))), "no points"),
    "npy NaN coordinate": (write_npy(np.array([[0, 0, 0, 0, 0, 0], [0, 0, np.nan, 0, 0, 0]])), "point 1 has a NaN"),
    "npy colour above 1": (write_npy(np.array([[0, 0, 0, 0, 0, 1.5]])), "outside [0, 1]"),
    "npy strings": (write_npy(np.array([["1"] * 6])), "expected real numbers"),
    "npy complex": (write_npy(np.zeros((2, 6), dtype=complex)), "expected real numbers"),
    "npy pickled object array": (
        write_npy(np.array([[0] * 6], dtype=object), allow_pickle=True),
        "not a plain numeric array",
    ),
    "npy a pickle": (write_bytes(pickle.dumps(np.zeros((2, 6))), "p.npy"), "not a plain numeric array"),
    "npy empty file": (write_bytes(b"", "p.npy"), "not a plain numeric array"),
    "npy truncated": (truncated_npy, "not a plain numeric array"),
    "npz not a zip": (write_bytes(b"PK\x03\x04 not really a zip", "p.npz"), "not a plain numeric array"),
    "npz pickled member": (
        write_npz(xyz=np.zeros((2, 3), dtype=object), rgb=np.zeros((2, 3))),
        "not a plain numeric array",
    ),
    "npz wrong keys": (write_npz(coords=np.zeros((2, 3))), "expected arrays 'xyz' and 'rgb'"),
    "npz xyz only": (write_npz(xyz=np.zeros((2, 3))), "expected arrays 'xyz' and 'rgb'"),
    "npz shape mismatch": (write_npz(xyz=np.zeros((3, 3)), rgb=np.zeros((2, 3))), "colours have shape (2, 3)"),
    "ply garbage": (write_text("this is not a ply file\n", "p.ply"), "no points"),
    "pcd empty": (write_bytes(b"", "p.pcd"), "no points"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error_naming_the_file(tmp_path, case):
    make, message = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(DataError) as info:
        read_points(path)
    text = str(info.value)
    assert text.startswith(str(path)), text
    assert message in text, text


@pytest.mark.parametrize("suffix", [".ply", ".pcd"])
def test_ply_and_pcd_without_colours(tmp_path, suffix):
    o3d = require("open3d", "the open3d extra reads .ply/.pcd (tests/run.sh installs it with dev)")
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.zeros((5, 3))))
    path = tmp_path / f"p{suffix}"
    assert o3d.io.write_point_cloud(str(path), pc)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: points have no colours"):
        read_points(path)


def test_file_over_the_size_limit(tmp_path):
    path = tmp_path / "big.npy"
    np.save(path, np.zeros((1000, 6)))
    with pytest.raises(
        DataError, match=f"^{re.escape(str(path))}: file is .* bytes, more than the limit of 1000 bytes"
    ):
        read_points(path, max_bytes=1000)


def test_validate_points_names_the_source():
    xyz, rgb = cloud(4)
    with pytest.raises(DataError, match="^shard-3, sample 7: points have no colours"):
        validate_points(xyz, None, "shard-3, sample 7")
    with pytest.raises(DataError, match=r"coordinates must have shape \(N, 3\)"):
        validate_points(xyz[:, :2], rgb[:, :2], "x")
    out = validate_points(xyz.astype(np.float64), rgb, "x")
    assert out.xyz.dtype == np.float32 and out.xyz.flags.c_contiguous


def test_every_supported_suffix_is_listed():
    assert set(POINT_SUFFIXES) == {".obj", ".ply", ".pcd", ".npy", ".npz"}


# ------------------------------------------------------------------------------------------------
# Found by tests/test_fuzz.py: each raised something other than a DataError, or took all memory


def npy_header_only(shape: tuple[int, ...]) -> bytes:
    """An .npy header declaring float64 `shape`, followed by 64 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buf.getvalue() + bytes(64)


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def with_zip_flag(data: bytes, bit: int) -> bytes:
    """Set a general-purpose flag bit in the local and the central header of a one-member zip."""
    data = bytearray(data)
    for magic, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.index(magic) + offset] |= bit
    return bytes(data)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


FUZZ_FINDS = {
    # name (what it raised before): (file name, content, expected message fragment)
    "npz 0-d colours (TypeError)": (
        "p.npz",
        zip_bytes({"xyz.npy": npy_bytes(np.zeros((2, 3))), "rgb.npy": npy_bytes(np.float32(1))}),
        "colours have shape () but coordinates (2, 3)",
    ),
    "npz member not an array (AttributeError)": ("p.npz", zip_bytes({"points": b"hello"}), "not an .npy payload"),
    "npy declaring 44 TiB (MemoryError)": ("p.npy", npy_header_only((10**12, 6)), "more than the 64 bytes of data"),
    "npz member declaring 44 TiB (MemoryError)": (
        "p.npz",
        zip_bytes({"points.npy": npy_header_only((10**12, 6))}),
        "more than the 64 bytes of data",
    ),
    "npz bzip2 member (decompressed without bound)": (
        "p.npz",
        zip_bytes({"points.npy": npy_bytes(np.zeros((2, 6)))}, zipfile.ZIP_BZIP2),
        "compressed with method 12",
    ),
    "npz with zip strong encryption (NotImplementedError)": (
        "p.npz",
        with_zip_flag(zip_bytes({"points.npy": npy_bytes(np.zeros((2, 6)))}), 0x40),
        "NotImplementedError",
    ),
}


@pytest.mark.parametrize("case", list(FUZZ_FINDS))
def test_fuzz_finds_are_clear_errors(tmp_path, case):
    name, data, message = FUZZ_FINDS[case]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / name))}: .*{re.escape(message)}"):
        read_points(tmp_path / name)


OPEN3D_HEADER_EDITS = [
    # (suffix, ascii, compressed, header text, edited text, expected message): before, open3d ...
    (
        ".ply",
        False,
        False,
        b"element vertex 12\n",
        b"element vertex 1000000000\n",
        "header declares 1000000000 points",
    ),  # OOM kill
    (
        ".ply",
        True,
        False,
        b"element vertex 12\n",
        b"element vertex 100000000\n",
        "header declares 100000000 points",
    ),  # 4.7 GB
    (".ply", False, False, b"element vertex 12\n", b"element vertex 13\n", "header declares 13 points"),  # a zero point
    (".pcd", True, False, b"POINTS 12\n", b"POINTS 100000000\n", "header declares 100000000 points"),  # 4.7 GB
    (".pcd", False, True, b"POINTS 12\n", b"POINTS 1000000\n", "binary_compressed block of"),  # segmentation fault
    (
        ".pcd",
        False,
        False,
        b"SIZE 4 4 4 4\n",
        b"SIZE 4 4 4 -4\n",
        "not a readable .pcd file",
    ),  # reads before its buffer
    (".pcd", True, False, b"WIDTH 12\n", b"", "not a readable .pcd file"),  # HEIGHT times an unset WIDTH
]


@pytest.mark.parametrize("suffix,ascii,compressed,old,new,message", OPEN3D_HEADER_EDITS)
def test_open3d_headers_are_checked_against_the_file(tmp_path, suffix, ascii, compressed, old, new, message):
    o3d = require("open3d", "the open3d extra reads .ply/.pcd (tests/run.sh installs it with dev)")
    xyz, rgb = cloud(12)
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz.astype(np.float64)))
    pc.colors = o3d.utility.Vector3dVector(rgb.astype(np.float64))
    path = tmp_path / f"p{suffix}"
    assert o3d.io.write_point_cloud(str(path), pc, write_ascii=ascii, compressed=compressed)
    assert len(read_points(path).xyz) == 12  # unedited, every kind reads (binary_compressed too)
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, 1))
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: .*{re.escape(message)}"):
        read_points(path)


def test_without_open3d_a_ply_is_a_clear_error_naming_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "cloud.ply"
    path.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n0\n")
    monkeypatch.setitem(sys.modules, "open3d", None)  # what an install without the extra sees
    with pytest.raises(DataError, match=r"cloud.ply: reading .ply files needs open3d.*pip install 'ognet\[open3d\]'"):
        read_points(path)
