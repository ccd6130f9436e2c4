"""Pictures of point clouds that a person can read: a cloud drawn as the photo it was lifted from,
framed on the person, and rank lists of such tiles with a label band under each.

A `+bg` cloud (the original's data, and ognet-synth's) holds the visible body points first and
then one point per remaining pixel of the photo, row-major, on one plane of constant depth.
Colour cannot tell the two apart (both are pixel colours; only glare is blank white), their
order and geometry can: `body_count` finds that background suffix, and its rows and columns say
which way is up and right in the photo.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ognet.data.transforms import is_blank

TILE_HEIGHT, TILE_WIDTH = 192, 96  # a cloud's picture, the 2:1 of a re-id crop
BORDER = 4  # the coloured frame around a rank-list tile
FONT_SIZE, LINE_HEIGHT, LABEL_LINES = 11, 13, 3
LABEL_HEIGHT = LABEL_LINES * LINE_HEIGHT + 4  # the band under a rank-list tile
TEXT_COLOUR = (0, 0, 0)
TileKind = Literal["query", "match", "other", "junk"]
FRAME_COLOURS: dict[str, tuple[int, int, int]] = {
    "query": (128, 128, 128),
    "match": (0, 170, 0),  # same identity, another camera: a correct match
    "other": (210, 0, 0),
    "junk": (240, 170, 0),  # left out of the ranking (same identity and camera, or pid -1)
}
# Background depth equality, relative to the cloud's extent: the plane's points share one float32
# value, body points lie off it (noise, curvature), far more than rounding.
PLANE_TOLERANCE = 1e-6
MIN_BACKGROUND = 16  # fewer row-major points at the last point's depth: no background
MARGIN = 0.04  # around the person, as a fraction of its box's height (in the picture's aspect)
MAX_SPLAT = 16  # pixels a point covers at most, per side (cost: N x 256 entries to sort)
SPLAT = 2.5  # spacings a point covers: the body samples sit anywhere in their pixels, gaps reach 2.4 spacings


def body_count(xyz: np.ndarray) -> int:
    """How many leading points are the person: all points before the background suffix.

    The background is the longest suffix whose points lie at the last point's depth (within
    PLANE_TOLERANCE) and whose rows run one way (y monotone, as row-major pixels); the rows alone
    still find it in a flattened cloud (the original's D2 option). A cloud where that suffix has
    fewer than MIN_BACKGROUND points, or is the whole cloud, has no background: all of it is the
    person (the original's 6890-vertex clouds without background).
    """
    n = len(xyz)
    z = xyz[:, 2].astype(np.float64)
    tolerance = PLANE_TOLERANCE * max(float(np.ptp(xyz, axis=0).max(initial=0.0)), 1e-12)
    off_plane = np.flatnonzero(np.abs(z - z[-1]) > tolerance)
    start = int(off_plane[-1]) + 1 if len(off_plane) else 0
    dy = np.diff(xyz[start:, 1])
    down, up = np.flatnonzero(dy > 0), np.flatnonzero(dy < 0)  # breaks of a top-down / bottom-up order
    start += min(int(down[-1]) + 1 if len(down) else 0, int(up[-1]) + 1 if len(up) else 0)
    return start if start > 0 and n - start >= MIN_BACKGROUND else n


def photo_axes(xyz: np.ndarray, body: int) -> tuple[int, int]:
    """(right, up): the signs that turn x and y into the photo's right and up. The background's
    first row is the photo's top and its columns run left to right; without background, x is
    right and y up (ognet-synth's and the mesh viewer's convention)."""
    background = xyz[body:]
    if len(background) < 2:
        return 1, 1
    up = 1 if background[0, 1] >= background[-1, 1] else -1
    same_row = background[1:, 1] == background[:-1, 1]
    right = -1 if np.diff(background[:, 0])[same_row].sum() < 0 else 1
    return right, up


def point_spacing(xyz: np.ndarray) -> float:
    """Typical distance between neighbouring points seen from the front: the side of the square
    each point would cover if the points tiled their (x, y) box (a `+bg` cloud: one pixel)."""
    extent = np.ptp(xyz[:, :2], axis=0) if len(xyz) else np.zeros(2)
    return float(np.sqrt(extent[0] * extent[1] / max(len(xyz), 1)))


def render_cloud(xyz: np.ndarray, rgb: np.ndarray, height: int = TILE_HEIGHT, width: int = TILE_WIDTH) -> np.ndarray:
    """The photo a cloud was lifted from, as an (H, W, 3) uint8 picture framed on the person: the
    box of the body points (`body_count`) plus a margin fills the picture's height or width, and
    the background points around it fill the rest. Each point covers a square SPLAT spacings
    wide, so the picture has no holes at any zoom; background is painted first, then blank points
    (hidden vertices), then the body from far to near (larger z nearer)."""
    body = body_count(xyz)
    right, up = photo_axes(xyz, body)
    u, v = right * xyz[:, 0].astype(np.float64), up * xyz[:, 1].astype(np.float64)
    square = SPLAT * point_spacing(xyz)  # side of a point's square, in cloud units
    left, top, scale = _person_window(u[:body], v[:body], square / 2, height / width, height)
    splat = int(np.clip(np.ceil(square * scale), 1, MAX_SPLAT))
    corner = 0.5 - splat / 2  # squares centred on their points
    cols, rows = (
        np.floor((u - left) * scale + corner).astype(np.int64),
        np.floor((top - v) * scale + corner).astype(np.int64),
    )
    layer = np.where(np.arange(len(xyz)) < body, 2, 0) - is_blank(rgb)  # background 0 (-1), blank body 1, body 2
    priority = np.lexsort((xyz[:, 2], layer))  # points in painting order
    colours = np.clip(rgb * 255, 0, 255).astype(np.uint8)
    return _paint(rows[priority], cols[priority], colours[priority], splat, height, width)


def _person_window(
    u: np.ndarray, v: np.ndarray, overhang: float, aspect: float, height: int
) -> tuple[float, float, float]:
    """(left, top, pixels per unit) of the box around the person plus a margin on every side (and
    the `overhang` of the edge points' squares), widened to `aspect` (H / W)."""
    box_w, box_h = float(np.ptp(u)), float(np.ptp(v))
    margin = MARGIN * (max(box_h, box_w * aspect) or 1.0) + overhang  # a single point: any scale frames it
    box_h = max(box_h + 2 * margin, (box_w + 2 * margin) * aspect)
    box_w = box_h / aspect
    return (float(u.min() + u.max()) - box_w) / 2, (float(v.min() + v.max()) + box_h) / 2, height / box_h


def _paint(rows: np.ndarray, cols: np.ndarray, colours: np.ndarray, splat: int, height: int, width: int) -> np.ndarray:
    """Each pixel takes the colour of the last point (in the given order) whose splat x splat
    square, from (row, col) down and right, covers it. One sort of N x splat^2 entries, no
    per-point loop."""
    dy, dx = np.divmod(np.arange(splat * splat), splat)
    r = (rows[None, :] + dy[:, None]).ravel()
    c = (cols[None, :] + dx[:, None]).ravel()
    point = np.broadcast_to(np.arange(len(rows)), (splat * splat, len(rows))).ravel()
    inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
    pixel, point = r[inside] * width + c[inside], point[inside]
    order = np.lexsort((point, pixel))  # by pixel, then painting order
    last = np.r_[pixel[order][1:] != pixel[order][:-1], True]
    image = np.full((height * width, 3), 255, np.uint8)
    image[pixel[order][last]] = colours[point[order][last]]
    return image.reshape(height, width, 3)


@dataclass(frozen=True)
class Tile:
    """One cloud of a rank list, how it is framed, and the lines of its label (at most LABEL_LINES)."""

    xyz: np.ndarray
    rgb: np.ndarray
    kind: TileKind
    lines: tuple[str, ...]


def render_rank_list(tiles: Sequence[Tile]) -> np.ndarray:
    """Tiles side by side, each a cloud framed in its kind's colour (FRAME_COLOURS) above a white
    band with its label in TEXT_COLOUR. Junk is also faded: the ranking does not count it."""
    return np.concatenate([_tile_picture(tile) for tile in tiles], axis=1)


def _tile_picture(tile: Tile) -> np.ndarray:
    picture = render_cloud(tile.xyz, tile.rgb)
    if tile.kind == "junk":
        picture = (picture // 2 + 128).astype(np.uint8)  # halfway to white
    framed = np.empty((TILE_HEIGHT + 2 * BORDER, TILE_WIDTH + 2 * BORDER, 3), np.uint8)
    framed[:] = FRAME_COLOURS[tile.kind]
    framed[BORDER:-BORDER, BORDER:-BORDER] = picture
    return np.concatenate([framed, label_band(tile.lines, framed.shape[1])])


def label_band(lines: Sequence[str], width: int) -> np.ndarray:
    """A white (LABEL_HEIGHT, width, 3) band with one line of text per row, not anti-aliased (crisp
    at this size, and every text pixel is exactly TEXT_COLOUR)."""
    if len(lines) > LABEL_LINES:
        raise ValueError(f"a label has at most {LABEL_LINES} lines, got {list(lines)}")
    band = Image.new("RGB", (width, LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(band)
    draw.fontmode = "1"
    for i, line in enumerate(lines):
        draw.text((3, 2 + i * LINE_HEIGHT), line, fill=TEXT_COLOUR, font=_font())
    return np.asarray(band)


@functools.cache
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font, no file needed: Aileron at FONT_SIZE with FreeType, else a bitmap font."""
    return ImageFont.load_default(size=FONT_SIZE)


def pid_text(pid: int) -> str:
    """Market's spelling of an identity: 0002, 0000 (distractor), -1 (junk)."""
    return f"{pid:04d}" if pid >= 0 else str(pid)
