"""Market-1501 ranking metrics (CMC, mAP, mINP), vectorised, chunked and exact.

Protocol, as in the original `evaluate_gpu.py` (reference section 6):

- similarity is the dot product of the given features; nothing is renormalised, so it is the
  cosine similarity only for the L2-normalised features the pipeline produces;
- for a query, *good* gallery items have the same pid and a different camera; *junk* items have
  the same pid and the same camera, or pid -1. Junk is removed from the ranking (a gallery item
  with pid -1 is junk even for a query with pid -1, which then has no good match; the original
  crashes there). Pid 0 (distractors) is an ordinary pid;
- ranks are 0-based positions in the junk-filtered ranking; CMC_q[r] = 1 from the first good
  item on; AP is the Market devkit's trapezoid (`ap="trapezoid"`) or the non-interpolated mean
  of the precisions at each good item of torchreid/fast-reid (`ap="noninterp"`); INP (fast-reid)
  is ngood / (rank of the last good item + 1);
- a query without good match contributes 0 to CMC, AP and INP and still counts in the
  denominators, which are always the number of queries.

Ties. The original sorts with an unstable numpy argsort; here equal scores are ranked by
ascending gallery index (a stable descending sort), so results are deterministic.

Speed. Sorting every query's G scores dominates on CPU. Only the ranks of the few gallery items
that share the query's pid are needed, so each chunk of queries is histogrammed instead of
sorted (see `_ranks_in_rows`); the result is the same as a full stable sort.

Distribution. `rank_queries` gives per-query results for any slice of the queries; each value
depends only on its own query's scores, which do not depend on the slicing (see `_MIN_ROWS`), so
slices ranked on different ranks and concatenated in query order are bit-identical to one call
(tested on CPU; another BLAS could round a product differently by its shape), and
`reduce_results` sums them exactly (`math.fsum`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch

from ognet.errors import ConfigError, DataError

APMode = Literal["trapezoid", "noninterp"]
AP_MODES: tuple[str, ...] = get_args(APMode)
DEFAULT_MAX_BYTES = 1 << 30
# Working set per (query, gallery item) of a chunk: the score and its scaled copy (2 x itemsize),
# the int64 bin (8), the bool candidate mask (1), the per-row int32 histogram (4 bytes per bin,
# at most 1 per item) and slack (2).
_BYTES_PER_ENTRY_EXTRA = 12
# Histogram bins per query row: one per 4 gallery items, at most 16384 (5 items per bin at MSMT
# size). Fewer bins leave more candidates to sort, more make the histogram slower (measured).
_ITEMS_PER_BIN = 4
_MAX_BINS = 16384
# The CPU BLAS (MKL) multiplies fewer than about 12 query rows with other kernels, whose scores
# differ in the last bit; near-equal scores could then rank differently depending on how the
# queries were sliced. Chunks are padded to at least this many rows (measured: with 12 rows or
# more, every row offset and thread count gives bit-identical scores).
_MIN_ROWS = 16


@dataclass(frozen=True)
class PerQueryResult:
    """Per-query results of a slice of queries, in query order, on the CPU.

    `first_good` is the 0-based rank of the first good item in the junk-filtered ranking, -1 for
    a query without good match (whose `ap` and `inp` are 0).
    """

    ap: torch.Tensor  # float64
    inp: torch.Tensor  # float64
    first_good: torch.Tensor  # int64

    @property
    def valid(self) -> torch.Tensor:
        return self.first_good >= 0

    def __len__(self) -> int:
        return len(self.first_good)

    @staticmethod
    def cat(parts: Sequence[PerQueryResult]) -> PerQueryResult:
        return PerQueryResult(
            ap=torch.cat([p.ap for p in parts]),
            inp=torch.cat([p.inp for p in parts]),
            first_good=torch.cat([p.first_good for p in parts]),
        )


def evaluate_ranking(
    query_features: Any,
    query_pids: Any,
    query_camids: Any,
    gallery_features: Any,
    gallery_pids: Any,
    gallery_camids: Any,
    *,
    ap: str = "trapezoid",
    max_rank: int = 50,
    chunk_size: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, Any]:
    """Rank every query against the gallery and return rank1/5/10, mAP, mINP (fractions), the CMC
    curve up to `max_rank`, num_queries and num_valid_queries. Inputs: numpy arrays or tensors."""
    result = rank_queries(
        query_features,
        query_pids,
        query_camids,
        gallery_features,
        gallery_pids,
        gallery_camids,
        ap=ap,
        chunk_size=chunk_size,
        max_bytes=max_bytes,
    )
    return reduce_results([result], max_rank=max_rank)


def rank_queries(
    query_features: Any,
    query_pids: Any,
    query_camids: Any,
    gallery_features: Any,
    gallery_pids: Any,
    gallery_camids: Any,
    *,
    ap: str = "trapezoid",
    chunk_size: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> PerQueryResult:
    """Per-query AP, INP and first good rank of these queries against the whole gallery.

    Features are used in their own precision (at least float32) on the query features' device;
    results come back on the CPU. Queries are ranked `chunk_size` at a time (at least 16 rows are
    multiplied, see `_MIN_ROWS`); by default the chunk is the largest whose working set,
    chunk x G x (2 x itemsize + 12) bytes (20 for float32), fits in `max_bytes`. On top of that
    come the features (and a copy of the gallery without its pid -1 items) and, only where many
    scores in a row are exactly equal (e.g. a collapsed model), up to ~100 bytes per such entry
    for the sort in `_ranks_in_rows`.
    """
    if ap not in AP_MODES:
        raise ConfigError(f"ap must be one of {AP_MODES}, got {ap!r}")
    qf, qp, qc = _check_set("query", query_features, query_pids, query_camids)
    gf, gp, gc = _check_set("gallery", gallery_features, gallery_pids, gallery_camids)
    if qf.shape[1] != gf.shape[1]:
        raise DataError(f"query features have dimension {qf.shape[1]} but gallery features {gf.shape[1]}")
    dtype = torch.promote_types(torch.promote_types(qf.dtype, gf.dtype), torch.float32)
    device = qf.device
    qf, qp, qc = qf.to(dtype), qp.to(device), qc.to(device)
    gf, gp, gc = gf.to(device, dtype), gp.to(device), gc.to(device)
    _check_no_overflow(qf, gf)

    gallery = _GalleryByPid(gf, gp, gc)
    if chunk_size is None:
        per_query = max(1, len(gallery.pids)) * (2 * dtype.itemsize + _BYTES_PER_ENTRY_EXTRA)
        chunk_size = max(1, max_bytes // per_query)
    elif chunk_size < 1:
        raise ConfigError(f"chunk_size must be at least 1, got {chunk_size}")
    chunk_size = min(chunk_size, len(qp))
    buffers = _Buffers(max(chunk_size, _MIN_ROWS), len(gallery.pids), dtype, device)
    parts = []
    for start in range(0, len(qp), chunk_size):
        chunk = slice(start, start + chunk_size)
        parts.append(_rank_chunk(qf[chunk], qp[chunk], qc[chunk], gallery, ap, buffers))
    return PerQueryResult.cat(parts)


def reduce_results(results: Sequence[PerQueryResult], *, max_rank: int = 50) -> dict[str, Any]:
    """Metrics of per-query results given in query order (e.g. one slice per rank).

    Counts are integers and sums are correctly rounded (`math.fsum`), so the numbers do not
    depend on how the queries were sliced.
    """
    if max_rank < 1:
        raise ConfigError(f"max_rank must be at least 1, got {max_rank}")
    num_queries = sum(len(r) for r in results)
    if num_queries == 0:
        raise DataError("no query results to reduce")
    merged = PerQueryResult.cat(results)
    hits = merged.first_good[merged.valid]
    cmc = [float(c) / num_queries for c in _hit_counts(hits, max(max_rank, 10)).tolist()]
    return {
        "rank1": cmc[0],
        "rank5": cmc[4],
        "rank10": cmc[9],
        "mAP": math.fsum(merged.ap.tolist()) / num_queries,
        "mINP": math.fsum(merged.inp.tolist()) / num_queries,
        "cmc": cmc[:max_rank],
        "num_queries": num_queries,
        "num_valid_queries": int(merged.valid.sum()),
    }


def format_result_line(metrics: dict[str, Any]) -> str:
    """The original's result line (fractions with 6 decimals)."""
    m = metrics
    return f"Rank@1:{m['rank1']:f} Rank@5:{m['rank5']:f} Rank@10:{m['rank10']:f} mAP:{m['mAP']:f}"


def _hit_counts(first_good: torch.Tensor, length: int) -> torch.Tensor:
    """Number of queries whose first good item is at rank <= r, for r < length."""
    return torch.bincount(first_good.clamp(max=length), minlength=length + 1)[:length].cumsum(0)


def _check_set(name: str, features: Any, pids: Any, camids: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    features = _as_tensor(features, f"{name} features")
    pids, camids = _as_tensor(pids, f"{name} pids"), _as_tensor(camids, f"{name} camids")
    if features.ndim != 2:
        raise DataError(f"{name} features must be 2-D (items, dim), got shape {tuple(features.shape)}")
    if features.numel() == 0:
        raise DataError(f"the {name} set is empty (features of shape {tuple(features.shape)})")
    if features.dtype == torch.bool or features.is_complex():
        raise DataError(f"{name} features must be real numbers, got {features.dtype}")
    for label, values in (("pids", pids), ("camids", camids)):
        if values.ndim != 1 or len(values) != len(features):
            raise DataError(
                f"{name} {label} must be 1-D with one entry per feature row ({len(features)}), "
                f"got shape {tuple(values.shape)}"
            )
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise DataError(f"{name} {label} must be integers, got {values.dtype}")
    # amin/amax propagate NaN and inf, and are cheaper than isfinite on a large gallery.
    if features.is_floating_point() and not all(math.isfinite(float(x)) for x in (features.amin(), features.amax())):
        row = int((~torch.isfinite(features).all(dim=1)).nonzero()[0])
        raise DataError(f"{name} features contain NaN or inf (first at row {row})")
    return features, pids.long(), camids.long()


def _as_tensor(values: Any, what: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values
    try:
        return torch.as_tensor(np.ascontiguousarray(values))
    except (TypeError, ValueError, RuntimeError) as error:
        raise DataError(f"{what} are not an array of numbers: {error}") from None


def _check_no_overflow(qf: torch.Tensor, gf: torch.Tensor) -> None:
    """Keep scores far inside the float range, where the ranking below is exact."""
    bound = qf.shape[1] * _max_abs(qf) * _max_abs(gf)  # |q . g| <= dim max|q_i| max|g_i|
    if not bound < torch.finfo(qf.dtype).max / 8:
        raise DataError(f"feature values are too large: scores could reach {bound:.3g}, beyond {qf.dtype} range")


def _max_abs(x: torch.Tensor) -> float:
    return max(-float(x.amin()), float(x.amax()))


class _GalleryByPid:
    """The gallery without its pid -1 items (junk for every query; index order is kept), and its
    item indices grouped by pid, to find each query's same-pid items without a query x gallery
    comparison."""

    def __init__(self, features: torch.Tensor, pids: torch.Tensor, camids: torch.Tensor):
        kept = pids != -1
        if not bool(kept.all()):
            features, pids, camids = features[kept], pids[kept], camids[kept]
        self.features, self.pids, self.camids = features, pids, camids
        self.by_pid = torch.argsort(pids, stable=True)
        self.sorted_pids = pids[self.by_pid]

    def same_pid(self, query_pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(query row, gallery index) of every pair with equal pids."""
        first = torch.searchsorted(self.sorted_pids, query_pids)
        count = torch.searchsorted(self.sorted_pids, query_pids, right=True) - first
        rows = torch.repeat_interleave(torch.arange(len(query_pids), device=first.device), count)
        offset_in_pid = torch.arange(len(rows), device=first.device) - (count.cumsum(0) - count)[rows]
        return rows, self.by_pid[first[rows] + offset_in_pid]


class _Buffers:
    """Chunk-sized work tensors reused by every chunk.

    Freshly allocated multi-megabyte tensors are page-faulted in again for every chunk, which
    cost as much as the arithmetic done in them (measured on CPU).
    """

    def __init__(self, rows: int, width: int, dtype: torch.dtype, device: torch.device):
        self.scores = torch.empty(rows, width, dtype=dtype, device=device)
        self.scaled = torch.empty(rows, width, dtype=dtype, device=device)
        self.bins = torch.empty(rows, width, dtype=torch.long, device=device)

    def take(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.scores[:rows], self.scaled[:rows], self.bins[:rows]


def _rank_chunk(
    qf: torch.Tensor,
    qp: torch.Tensor,
    qc: torch.Tensor,
    gallery: _GalleryByPid,
    ap_mode: str,
    buffers: _Buffers,
) -> PerQueryResult:
    """Per-query results of one chunk of queries; only items sharing the query's pid matter."""
    rows, cols = gallery.same_pid(qp)
    ranks = rows
    if len(rows):
        padded = max(len(qf), _MIN_ROWS)
        scores, scaled, bins = buffers.take(padded)
        if padded > len(qf):
            qf = torch.cat([qf, qf.new_zeros(padded - len(qf), qf.shape[1])])
        torch.mm(qf, gallery.features.T, out=scores)
        scores, scaled, bins = (t[: len(qp)] for t in (scores, scaled, bins))
        ranks = _ranks_in_rows(scores, rows * scores.shape[1] + cols, scaled, bins)
    junk = qc[rows] == gallery.camids[cols]
    return _per_query(len(qp), len(gallery.pids), rows.cpu(), ranks.cpu(), junk.cpu(), ap_mode)


def _ranks_in_rows(
    scores: torch.Tensor, entries: torch.Tensor, scaled: torch.Tensor, bins: torch.Tensor
) -> torch.Tensor:
    """0-based position of each entry (a flat index into `scores`) in its row sorted by score
    descending, ties by column ascending, without sorting the rows.

    Each row is cut into equal-width score bins by a monotone map, so an entry in a higher bin
    always has a higher score. An entry's position is then the number of entries in higher bins
    (from a per-row histogram) plus the number of entries of its own bin that precede it, found
    by sorting only the entries that share a bin with a requested one: a few per requested entry,
    or whole rows in the worst case (many exactly equal scores), where it is a plain sort.
    `scaled` and `bins` are work tensors of the shape of `scores`.
    """
    num_rows, width = scores.shape
    num_bins = max(1, min(width // _ITEMS_PER_BIN, _MAX_BINS))
    lo = scores.amin(dim=1, keepdim=True)
    scale = (num_bins - 1) / (scores.amax(dim=1, keepdim=True) - lo)
    # Rows of equal scores (0/0) or of too narrow a range (inf) go to a single bin.
    scale = torch.nan_to_num(scale, nan=0.0, posinf=0.0)
    torch.sub(scores, lo, out=scaled).mul_(scale).clamp_(0, num_bins - 1)
    bins.copy_(scaled)  # truncation: bins rise with the score
    ones = torch.ones((), dtype=torch.int32, device=bins.device).expand(num_rows, width)
    hist = torch.zeros(num_rows, num_bins, dtype=torch.int32, device=bins.device)
    hist.scatter_add_(1, bins, ones)
    above = hist.cumsum_(dim=1).neg_().add_(width).view(-1)  # entries in higher bins of the row

    wanted = torch.zeros(num_rows, num_bins, dtype=torch.bool, device=bins.device)
    rows = entries // width
    wanted[rows, bins.view(-1)[entries]] = True
    candidates = wanted.gather(1, bins).view(-1).nonzero().squeeze(1)  # in (row, column) order
    cand_bin = bins.view(-1)[candidates] + candidates // width * num_bins  # numbered by row, bin
    scores = scores.view(-1)
    # Order candidates by (bin, score descending, column): stable sorts, last key first.
    order = torch.argsort(_descending_key(scores[candidates]), stable=True)
    order = order[torch.argsort(cand_bin[order], stable=True)]
    sorted_bin = cand_bin[order]
    first_of_bin = torch.searchsorted(sorted_bin, sorted_bin)
    cand_rank = torch.empty_like(first_of_bin)
    cand_rank[order] = above[sorted_bin] + torch.arange(len(order), device=scores.device) - first_of_bin
    return cand_rank[torch.searchsorted(candidates, entries)]


def _descending_key(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort ascending as the scores sort descending (integer sorts are faster);
    equal scores, -0.0 and +0.0 included, get equal keys."""
    bits_dtype = torch.int32 if scores.dtype == torch.float32 else torch.int64
    bits = (scores + 0.0).view(bits_dtype).long()  # + 0.0 turns -0.0 into +0.0
    # Flip the magnitude bits of negative numbers so that integer order is float order.
    ascending = bits ^ ((bits >> 63) & torch.iinfo(bits_dtype).max)
    return ~ascending


def _per_query(
    num_queries: int,
    gallery_size: int,
    rows: torch.Tensor,
    ranks: torch.Tensor,
    junk: torch.Tensor,
    ap_mode: str,
) -> PerQueryResult:
    """AP, INP and first good rank from the unfiltered ranks of each query's same-pid items."""
    order = torch.argsort(rows * gallery_size + ranks)  # by query, then rank
    rows, ranks, junk = rows[order], ranks[order], junk[order]
    junk_before = junk.long().cumsum(0) - junk.long()
    junk_before -= junk_before[torch.searchsorted(rows, rows)]  # within the query
    good = ~junk
    rows, ranks = rows[good], (ranks - junk_before)[good]  # ranks in the junk-filtered ranking
    k = torch.arange(1, len(rows) + 1) - torch.searchsorted(rows, rows)  # 1-based among goods
    ngood = torch.bincount(rows, minlength=num_queries)

    first_good = torch.full((num_queries,), -1, dtype=torch.long)
    first_good[rows[k == 1]] = ranks[k == 1]
    last = k == ngood[rows]
    inp = torch.zeros(num_queries, dtype=torch.float64)
    inp[rows[last]] = ngood[rows[last]].double() / (ranks[last] + 1).double()

    kf, rf, nf = k.double(), ranks.double(), ngood[rows].double()
    precision = kf / (rf + 1)
    if ap_mode == "trapezoid":  # devkit: mean of the precisions before and at each good item
        before = torch.where(ranks == 0, 1.0, (kf - 1) / rf.clamp(min=1))
        terms = (1.0 / nf) * (before + precision) / 2
    else:
        terms = precision
    # Sum each query's terms in rank order (a sequential scan), independently of other queries.
    by_query = torch.zeros(num_queries, max(1, int(ngood.max())), dtype=torch.float64)
    by_query[rows, k - 1] = terms
    sums = by_query.cumsum(dim=1).gather(1, (ngood - 1).clamp(min=0)[:, None]).squeeze(1)
    ap = sums if ap_mode == "trapezoid" else sums / ngood.clamp(min=1)
    return PerQueryResult(ap=ap, inp=inp, first_good=first_good)
