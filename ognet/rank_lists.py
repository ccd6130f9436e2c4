"""Rank-list pictures of an evaluation: which queries get one, where each gallery item stands,
and what each tile says.

A picture is the query, then the gallery in descending similarity until the `top`-th item the
ranking counts, with the junk the ranking leaves out (same identity and camera, or pid -1) shown
faded where its score would have put it, unranked. Items are ordered as the metrics rank them
(ties: the lower gallery index first); ranks are 1-based here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

from ognet.data.shards import ShardReader
from ognet.io import atomic_write
from ognet.metrics import PerQueryResult
from ognet.pictures import Tile, TileKind, pid_text, render_rank_list

if TYPE_CHECKING:  # type hints only: ognet.evaluate imports this module, ognet.config (via monitor) too
    from ognet.evaluate import Evaluation
    from ognet.monitor import Monitor

RankListSelect = Literal["first", "worst_ap"]
TOP = 10  # counted gallery items per picture; at most as many junk items are shown among them


def choose_queries(readable: np.ndarray, per_query: PerQueryResult, count: int, select: RankListSelect) -> list[int]:
    """The queries to picture. `first`: the first `count` readable ones. `worst_ap`: the `count`
    readable ones of lowest AP, lowest first (ties: lower query index); a query without a good
    match in the gallery (AP 0 by convention: nothing in its ranking could be right) is not
    chosen. `per_query` holds the results of the readable queries, in query order."""
    if select == "first":
        return readable[:count].tolist()
    ap, valid = per_query.ap.numpy(), per_query.valid.numpy()
    candidates = np.flatnonzero(valid)
    order = candidates[np.argsort(ap[candidates], kind="stable")]
    return readable[order[:count]].tolist()


@dataclass(frozen=True)
class RankedItem:
    index: int  # gallery sample
    score: float
    rank: int | None  # 1-based rank among the counted items; None for junk


def ranked_gallery(scores: np.ndarray, junk: np.ndarray, left_out: np.ndarray, top: int = TOP) -> list[RankedItem]:
    """The gallery by descending score (ties: lower index first) up to the `top`-th counted item,
    the junk among them marked (rank None); at most `top` junk items are kept. Left-out
    (unreadable) samples are absent."""
    items: list[RankedItem] = []
    counted = shown_junk = 0
    for i in np.argsort(-scores, kind="stable"):
        if counted == top:
            break
        if left_out[i] or (junk[i] and shown_junk == top):
            continue
        counted += not junk[i]
        shown_junk += bool(junk[i])
        items.append(RankedItem(int(i), float(scores[i]), None if junk[i] else counted))
    return items


def rank_list_picture(q: int, e: Evaluation, result: tuple[float, int], top: int = TOP) -> np.ndarray:
    """The rank-list picture of query `q`; `result` is its (AP, 0-based rank of the first good
    item or -1), printed on the query's tile."""
    qi, gi = e.query.index, e.gallery.index
    scores = (e.gallery_features @ e.query_features[q]).cpu().numpy()
    same_id = gi.pids == qi.pids[q]
    junk = (gi.pids == -1) | (same_id & (gi.camids == qi.camids[q]))
    items = ranked_gallery(scores, junk, e.gallery_left_out, top)
    tiles = [_query_tile(q, e.query, result)] + [
        _gallery_tile(item, e.gallery, bool(same_id[item.index])) for item in items
    ]
    return render_rank_list(tiles)


def _query_tile(q: int, query: ShardReader, result: tuple[float, int]) -> Tile:
    sample, index, (ap, first_good) = query[q], query.index, result
    lines = (
        f"query {q}  AP {ap:.2f}",
        f"id {pid_text(int(index.pids[q]))} cam {index.camids[q]}",
        f"first match #{first_good + 1}" if first_good >= 0 else "no match in gallery",
    )
    return Tile(sample.xyz, sample.rgb, "query", lines)


def _gallery_tile(item: RankedItem, gallery: ShardReader, same_id: bool) -> Tile:
    sample, pid, camid = gallery[item.index], int(gallery.index.pids[item.index]), gallery.index.camids[item.index]
    if item.rank is None:
        kind: TileKind = "junk"
        lines = (f"junk  sim {item.score:.3f}", "pid -1" if pid == -1 else "same camera")
    else:
        kind = "match" if same_id else "other"
        lines = (f"#{item.rank}  sim {item.score:.3f}", f"gallery {item.index}")
    return Tile(sample.xyz, sample.rgb, kind, (lines[0], f"id {pid_text(pid)} cam {camid}", lines[1]))


def write_rank_lists(
    e: Evaluation, count: int, select: RankListSelect, monitor: Monitor, out: Path, step: int, tag: str
) -> None:
    """Rank-list pictures of `count` queries (`choose_queries`), to TensorBoard and as PNG files.
    `first`: tag `<tag>/rank_list_<query>`; `worst_ap`: `<tag>/rank_list_worst_<k>`, k = 0 the
    worst, so a tag keeps its meaning from one evaluation to the next."""
    readable = np.flatnonzero(~e.query_left_out)
    queries = choose_queries(readable, e.per_query, count, select)
    position = {int(q): k for k, q in enumerate(readable)}
    for k, q in enumerate(queries):
        r = position[q]
        result = (float(e.per_query.ap[r]), int(e.per_query.first_good[r]))
        picture = rank_list_picture(q, e, result)
        name = f"worst_{k}" if select == "worst_ap" else str(q)
        monitor.image(f"{tag}/rank_list_{name}", picture, step)
        with atomic_write(out / f"rank-list-{tag}-{name.replace('_', '-')}.png", "wb") as f:
            Image.fromarray(picture).save(f, format="PNG")
    if queries:
        monitor.log(
            f"rank lists ({select}: a query, then its top {TOP}; green = same identity, faded amber = junk the "
            f"ranking leaves out): {out}/rank-list-{tag}-*.png"
        )
