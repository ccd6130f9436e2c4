"""What tests read back from pictures and TensorBoard events: rank-list tiles cut apart, their
frames, the tiles a ranking should show (from the protocol's definitions alone), HParams metrics."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2 as hparams_data

from ognet.data.shards import ShardIndex
from ognet.pictures import BORDER, LABEL_HEIGHT, TILE_HEIGHT, TILE_WIDTH

FRAMED_W, FRAMED_H = TILE_WIDTH + 2 * BORDER, TILE_HEIGHT + 2 * BORDER


def decode_png(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def tiles_of(picture: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(framed picture, label band) of every tile of a rank-list picture."""
    assert picture.shape[0] == FRAMED_H + LABEL_HEIGHT and picture.shape[1] % FRAMED_W == 0, picture.shape
    return [
        (picture[:FRAMED_H, x : x + FRAMED_W], picture[FRAMED_H:, x : x + FRAMED_W])
        for x in range(0, picture.shape[1], FRAMED_W)
    ]


def inner(framed: np.ndarray) -> np.ndarray:
    """The cloud's picture inside a tile's frame."""
    return framed[BORDER:-BORDER, BORDER:-BORDER]


def frame_pixels(framed: np.ndarray) -> np.ndarray:
    b = BORDER
    sides = (framed[:b], framed[-b:], framed[:, :b], framed[:, -b:])
    return np.concatenate([side.reshape(-1, 3) for side in sides])


def expected_tiles(
    scores: np.ndarray, q: int, query: ShardIndex, gallery: ShardIndex, left_out: np.ndarray, top: int = 10
) -> list[tuple[int, str]]:
    """(gallery index, kind) of the tiles after query q's: the gallery by descending score (ties:
    lower index) until the top-th counted item, junk (same pid and camera, or pid -1) in its place
    (at most `top` of it), left-out items absent."""
    out, counted, junk_shown = [], 0, 0
    for g in np.argsort(-scores, kind="stable"):
        same = gallery.pids[g] == query.pids[q]
        junk = gallery.pids[g] == -1 or (same and gallery.camids[g] == query.camids[q])
        if counted == top or left_out[g] or (junk and junk_shown == top):
            continue
        counted += not junk
        junk_shown += junk
        out.append((int(g), "junk" if junk else ("match" if same else "other")))
    return out


def hparams_metrics(log_dir) -> list[str]:
    """The metric tags of the HParams tab in a run's event files."""
    events = EventAccumulator(str(log_dir)).Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    return [info.name.tag for info in hparams_data.HParamsPluginData.FromString(content).experiment.metric_infos]
