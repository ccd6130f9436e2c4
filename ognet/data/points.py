"""Point-file readers and the `.obj` writer.

Every reader returns a `PointCloud` of float32 xyz (N, 3) and float32 rgb (N, 3) in [0, 1], in file
order, and every malformation is a `DataError` that names the file.

`.obj` files are parsed here rather than by open3d: the 3DMarket+bg files of the original carry
one face line only (a file-size hack), and open3d 0.20 (checked) keeps only the vertices that faces use,
so it returns 3 points out of 8192. open3d 0.9, which the original used, kept every vertex in file
order; this parser returns exactly that. open3d reads `.ply` and `.pcd`.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ognet.errors import DataError
from ognet.io import atomic_write

POINT_SUFFIXES = (".obj", ".ply", ".pcd", ".npy", ".npz")
MAX_FILE_BYTES = 512 * 2**20  # a person is ~0.5 MB of text; anything this large is not a person


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
            xyz, rgb = _read_open3d(path)
        else:
            xyz, rgb = _read_numpy(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read point file ({e.strerror or e})") from e
    return validate_points(xyz, rgb, path)


def validate_points(xyz: np.ndarray, rgb: np.ndarray | None, source: str | os.PathLike) -> PointCloud:
    """Check shapes and values; return float32 arrays. `source` names the file in errors."""
    if rgb is None or len(rgb) == 0 and len(xyz) > 0:
        raise DataError(f"{source}: points have no colours")
    xyz = np.asarray(xyz)
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
        raise DataError(f"{source}: point {int(np.argmax(bad))} has a NaN or infinite coordinate "
                        f"({int(bad.sum())} such points)")
    bad = ~((rgb >= 0) & (rgb <= 1)).all(axis=1)  # also catches NaN colours
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{source}: point {i} has colour {rgb[i].tolist()} outside [0, 1] "
                        f"({int(bad.sum())} such points)")
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


def _read_open3d(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    import open3d as o3d  # imported lazily: it costs ~1 s and only .ply/.pcd need it

    cloud = o3d.io.read_point_cloud(str(path), format="auto", print_progress=False)
    xyz = np.asarray(cloud.points)
    if len(xyz) == 0:
        raise DataError(f"{path}: no points (or not a readable {path.suffix} file)")
    return xyz, (np.asarray(cloud.colors) if cloud.has_colors() else None)


def _read_numpy(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    # .npz members load lazily, so their errors (pickled members, bad zip data) come from the
    # member accesses too; all of them are inside the try. Empty files give EOFError.
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                keys = set(loaded.files)
                if {"xyz", "rgb"} <= keys:
                    return loaded["xyz"], loaded["rgb"]
                if "points" in keys:
                    return _split_columns(loaded["points"], path)
                raise DataError(f"{path}: expected arrays 'xyz' and 'rgb' (or 'points' (N, 6)), found {sorted(keys)}")
    except DataError:
        raise
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # pickled, truncated or foreign files
        raise DataError(f"{path}: not a plain numeric array file ({type(e).__name__}: {e})") from e
    return _split_columns(loaded, path)


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
