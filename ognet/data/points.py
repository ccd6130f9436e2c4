"""Point-file readers and the `.obj` writer.

Every reader returns a `PointCloud` of float32 xyz (N, 3) and float32 rgb (N, 3) in [0, 1], in file
order, and every malformation is a `DataError` that names the file.

`.obj` files are parsed here rather than by open3d: the 3DMarket+bg files of the original carry
one face line only (a file-size hack), and open3d 0.20 (checked) keeps only the vertices that faces use,
so it returns 3 points out of 8192. open3d 0.9, which the original used, kept every vertex in file
order; this parser returns exactly that. open3d reads `.ply` and `.pcd`, once their header has
been checked here against the file's size (`_check_open3d_header` says why). `.npy`/`.npz` go through
the shard reader's `read_npy`, which allocates nothing beyond the bytes a file holds.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ognet.data.shards import read_npy
from ognet.errors import DataError
from ognet.io import atomic_write

POINT_SUFFIXES = (".obj", ".ply", ".pcd", ".npy", ".npz")
MAX_FILE_BYTES = 512 * 2**20  # a person is ~0.5 MB of text; anything this large is not a person
HEADER_BYTES = 2**16  # .ply/.pcd headers are a few hundred bytes
_PLY_TYPE_BYTES = {
    b"char": 1,
    b"uchar": 1,
    b"int8": 1,
    b"uint8": 1,
    b"short": 2,
    b"ushort": 2,
    b"int16": 2,
    b"uint16": 2,
    b"int": 4,
    b"uint": 4,
    b"int32": 4,
    b"uint32": 4,
    b"float": 4,
    b"float32": 4,
    b"double": 8,
    b"float64": 8,
}


class PointCloud(NamedTuple):
    xyz: np.ndarray  # (N, 3) float32
    rgb: np.ndarray  # (N, 3) float32 in [0, 1]


def read_points(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> PointCloud:
    """Read a coloured point cloud from `.obj`, `.ply`, `.pcd`, `.npy` (N, 6) or `.npz` (xyz, rgb)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in POINT_SUFFIXES:
        raise DataError(f"{path}: unsupported point file type {suffix!r} (expected one of {POINT_SUFFIXES})")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read point file ({e.strerror or e})") from e
    if size > max_bytes:
        raise DataError(f"{path}: file is {size} bytes, more than the limit of {max_bytes} bytes")
    try:
        if suffix == ".obj":
            xyz, rgb = _parse_obj(path.read_bytes(), path)
        elif suffix in (".ply", ".pcd"):
            xyz, rgb = _read_open3d(path, size)
        else:
            xyz, rgb = _read_numpy(path, max_bytes)
    except OSError as e:
        raise DataError(f"{path}: cannot read point file ({e.strerror or e})") from e
    return validate_points(xyz, rgb, path)


def validate_points(xyz: np.ndarray, rgb: np.ndarray | None, source: str | os.PathLike) -> PointCloud:
    """Check shapes and values; return float32 arrays. `source` names the file in errors."""
    xyz = np.asarray(xyz)
    if rgb is None or np.size(rgb) == 0 and xyz.size > 0:  # np.size: a 0-d array has no len()
        raise DataError(f"{source}: points have no colours")
    rgb = np.asarray(rgb)
    for name, values in (("coordinates", xyz), ("colours", rgb)):
        if values.dtype.kind not in "iuf":  # strings, complex numbers, booleans, records
            raise DataError(f"{source}: {name} have dtype {values.dtype}, expected real numbers")
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise DataError(f"{source}: coordinates must have shape (N, 3), got {xyz.shape}")
    if len(xyz) == 0:
        raise DataError(f"{source}: no points")
    if rgb.shape != xyz.shape:
        raise DataError(f"{source}: colours have shape {rgb.shape} but coordinates {xyz.shape}")
    xyz = xyz.astype(np.float32, copy=False)
    rgb = rgb.astype(np.float32, copy=False)
    bad = ~np.isfinite(xyz).all(axis=1)
    if bad.any():
        raise DataError(
            f"{source}: point {int(np.argmax(bad))} has a NaN or infinite coordinate ({int(bad.sum())} such points)"
        )
    bad = ~((rgb >= 0) & (rgb <= 1)).all(axis=1)  # also catches NaN colours
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(
            f"{source}: point {i} has colour {rgb[i].tolist()} outside [0, 1] ({int(bad.sum())} such points)"
        )
    return PointCloud(np.ascontiguousarray(xyz), np.ascontiguousarray(rgb))


def _parse_obj(data: bytes, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Vertices `v x y z [r g b]` in file order; every other line (faces, comments) is ignored."""
    lines = [line for line in data.splitlines() if line.startswith(b"v ")]
    if not lines:
        raise DataError(f"{path}: no points (no 'v' lines)")
    tokens = b" ".join(line[2:] for line in lines).split()
    n = len(lines)
    if len(tokens) == 3 * n:
        raise DataError(f"{path}: points have no colours (expected 'v x y z r g b' lines)")
    if len(tokens) != 6 * n:
        counts = [len(line.split()) - 1 for line in lines]
        i = next(i for i, c in enumerate(counts) if c != 6)
        raise DataError(f"{path}: vertex {i} has {counts[i]} values, expected 6 (x y z r g b)")
    try:
        values = np.array(tokens).astype(np.float64).reshape(n, 6)
    except ValueError as e:
        raise DataError(f"{path}: unparsable vertex line ({e})") from e
    return values[:, :3], values[:, 3:]


def _read_open3d(path: Path, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        import open3d as o3d  # imported lazily: it costs ~1 s, only .ply/.pcd need it, and it is an extra
    except ImportError as e:
        raise DataError(
            f"{path}: reading {path.suffix} files needs open3d, which is not installed: pip install 'ognet[open3d]' "
            f"(and apt-get install libusb-1.0-0); .obj, .npy and .npz need nothing ({e})"
        ) from e
    with open(path, "rb") as f:
        _check_open3d_header(f.read(HEADER_BYTES), size, path)
    cloud = o3d.io.read_point_cloud(str(path), format="auto", print_progress=False)
    xyz = np.asarray(cloud.points)
    if len(xyz) == 0:
        raise DataError(f"{path}: no points (or not a readable {path.suffix} file)")
    return xyz, (np.asarray(cloud.colors) if cloud.has_colors() else None)


def _check_open3d_header(head: bytes, size: int, path: Path) -> None:
    """Refuse a .ply/.pcd whose header declares more points than the rest of the file can hold.

    open3d 0.20 (checked) sizes its arrays from the header's count before reading a point, and
    returns the points the data lacks as zeros: a 1 kB file declaring 10^9 points takes all memory.
    Its PCD reader also trusts SIZE, COUNT and the binary_compressed block sizes, and reads past its
    buffers (a segmentation fault) where they disagree. So the header is read here first, strictly:
    whatever this reader is unsure of is refused, never passed on to open3d.
    """
    ply = path.suffix.lower() == ".ply"
    ends = [[b"end_header"]] if ply else [[b"DATA", b"ascii"], [b"DATA", b"binary"], [b"DATA", b"binary_compressed"]]
    lines, pos = [], 0
    while not lines or lines[-1] not in ends:
        end = head.find(b"\n", pos)
        line = head[pos:end]
        if end < 0 or len(line) > 1000 or not re.fullmatch(rb"[\x20-\x7e\t\r]*", line):
            raise DataError(f"{path}: no points (not a readable {path.suffix} file: header line {len(lines) + 1})")
        lines.append(line.split())
        pos = end + 1
    if ply:
        points, needed = _ply_needs(lines, path)
    else:
        points, needed = _pcd_needs(lines, head[pos : pos + 8], size - pos, path)
    if needed > size - pos:
        raise DataError(f"{path}: header declares {points} points, more than the {size - pos} bytes after it hold")


def _ply_needs(lines: list[list[bytes]], path: Path) -> tuple[int, int]:
    """(vertices, fewest data bytes) of a PLY header: one element or property per line, as written."""
    bad = DataError(f"{path}: no points (not a readable .ply file: unexpected header)")
    formats = [words[1] for words in lines if words[:1] == [b"format"] and len(words) == 3]
    if (
        lines[0] != [b"ply"]
        or len(formats) != 1
        or formats[0] not in (b"ascii", b"binary_little_endian", b"binary_big_endian")
    ):
        raise bad
    ascii, elements = formats[0] == b"ascii", []  # [name, count, fewest bytes of one]
    for words in lines:
        if words[:1] == [b"element"]:
            if len(words) != 3 or not words[2].isdigit():
                raise bad
            elements.append([words[1], int(words[2]), 0])
        elif words[:1] == [b"property"]:
            kind = words[2] if len(words) == 5 and words[1] == b"list" else words[1] if len(words) == 3 else None
            if not elements or kind not in _PLY_TYPE_BYTES:  # a list takes its length's bytes at least
                raise bad
            elements[-1][2] += 2 if ascii else _PLY_TYPE_BYTES[kind]  # ascii: a digit and a space at least
    vertices = sum(count for name, count, _ in elements if name == b"vertex")
    needed = sum(count * item for _, count, item in elements)
    return vertices, needed - 1 if ascii else needed  # the last number needs no space after it


def _pcd_needs(lines: list[list[bytes]], block: bytes, data_bytes: int, path: Path) -> tuple[int, int]:
    """(points, fewest data bytes) of a PCD header, read as open3d reads it, numbers strictly."""
    bad = DataError(f"{path}: no points (not a readable .pcd file: unexpected header)")
    fields, sizes, counts, width, points = 0, [], [], None, None
    for words in lines[:-1]:
        key = words[0] if words else b"#"
        numbers = [int(w) if re.fullmatch(rb"[0-9]{1,9}", w) else -1 for w in words[1:]]
        if key.startswith(b"#") or key in (b"VERSION", b"VIEWPOINT", b"TYPE"):  # open3d checks TYPE's length itself
            continue
        if key in (b"FIELDS", b"COLUMNS") and numbers:
            fields, sizes, counts = len(numbers), [4] * len(numbers), [1] * len(numbers)
        elif key == b"SIZE" and fields and len(numbers) == fields and set(numbers) <= {1, 2, 4, 8}:
            sizes = numbers
        elif key == b"COUNT" and fields and len(numbers) == fields and min(numbers) > 0:
            counts = numbers
        elif key in (b"WIDTH", b"POINTS") and len(numbers) == 1 and numbers[0] >= 0:
            width, points = (numbers[0], points) if key == b"WIDTH" else (width, numbers[0])
        elif key == b"HEIGHT" and len(numbers) == 1 and numbers[0] >= 0 and width is not None:
            points = width * numbers[0]  # open3d: HEIGHT sets the count, a later POINTS line overrides it
        else:
            raise bad
    point_bytes = sum(a * b for a, b in zip(sizes, counts))
    if points is None or not fields or points * point_bytes >= 2**31:  # open3d counts in C ints
        raise bad
    data = lines[-1][1]
    if data == b"ascii":
        return points, points * 2 * sum(counts) - 1
    if data == b"binary":
        return points, points * point_bytes
    compressed, uncompressed = struct.unpack("<II", block) if len(block) == 8 else (-1, -1)
    if uncompressed != points * point_bytes or not 0 <= compressed <= data_bytes - 8:
        raise DataError(
            f"{path}: binary_compressed block of {compressed} bytes ({uncompressed} uncompressed) "
            f"does not fit the header's {points} points of {point_bytes} bytes"
        )
    return points, points  # compressed, a point still takes a byte at least


def _read_numpy(path: Path, max_bytes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """`.npy` (N, 6) or `.npz` members through the shard reader's `read_npy`: no pickles, and no
    allocation beyond the file's bytes (`np.load` allocates whatever shape a header declares)."""
    try:
        if path.suffix.lower() == ".npy":
            return _split_columns(read_npy(path.read_bytes()), path)
        with zipfile.ZipFile(path) as z:
            members = {info.filename.removesuffix(".npy"): info for info in z.infolist()}
            if {"xyz", "rgb"} <= members.keys():
                return _npz_member(z, members["xyz"], path, max_bytes), _npz_member(z, members["rgb"], path, max_bytes)
            if "points" in members:
                return _split_columns(_npz_member(z, members["points"], path, max_bytes), path)
            raise DataError(f"{path}: expected arrays 'xyz' and 'rgb' (or 'points' (N, 6)), found {sorted(members)}")
    except DataError:
        raise
    # pickled, truncated or foreign files; NotImplementedError: zip features numpy never writes
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as e:
        raise DataError(f"{path}: not a plain numeric array file ({type(e).__name__}: {e})") from e


def _npz_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, max_bytes: int) -> np.ndarray:
    """One member, decompressed no further than its declared size: a small .npz can hold a zip bomb.

    numpy writes stored or deflated members; bzip2 and lzma would decompress without a bound.
    """
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 0x1:
        raise DataError(f"{path}: member {info.filename!r} is encrypted or compressed with method {info.compress_type}")
    if info.file_size > max_bytes:
        raise DataError(
            f"{path}: member {info.filename!r} is {info.file_size} bytes, more than the limit of {max_bytes} bytes"
        )
    with z.open(info) as f:
        return read_npy(f.read(info.file_size))


def _split_columns(points: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if points.ndim != 2 or points.shape[1] not in (3, 6):
        raise DataError(f"{path}: expected an (N, 6) array of x y z r g b, got shape {points.shape}")
    if points.shape[1] == 3:
        return points, None
    return points[:, :3], points[:, 3:]


def write_obj(path: str | os.PathLike, xyz: np.ndarray, rgb: np.ndarray, decimals: int = 6) -> None:
    """Write `v x y z r g b` lines and one face line, as the original's 3DMarket+bg files are.

    Atomic: the file appears only when complete.
    """
    cloud = validate_points(xyz, rgb, path)
    line = "v " + " ".join([f"%.{decimals}f"] * 6) + "\n"  # one %-format over the whole array: 2x savetxt
    text = (line * len(cloud.xyz)) % tuple(np.hstack([cloud.xyz, cloud.rgb]).ravel().tolist())
    if len(cloud.xyz) >= 3:
        text += "f 1 2 3\n"
    with atomic_write(path, "w") as f:
        f.write(text)
