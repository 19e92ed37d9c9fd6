"""Person re-identification evaluation: the Market-1501 protocol (CMC and mAP), vectorised over queries.

The protocol is the one the python ReID toolkits (torchreid, fast-reid, reid-strong-baseline) compute:

* every query ranks the whole gallery by ascending distance;
* gallery entries with the query's identity *and* camera are removed from that query's list (junk);
* gallery entries with identity ``-1`` are junk for every query (removed); identity ``0`` distractors are
  ordinary non-matches;
* a query with no true match left is skipped: it counts in neither CMC nor mAP, and the averages are over
  the valid queries only;
* CMC of one query is its clipped cumulative hit curve; AP is non-interpolated (the mean of the precision at
  the rank of every true match).

Ties (equal distances) are broken by gallery order, as a *stable* sort would rank them, so the result does
not depend on the sorting algorithm.

Implementation: no per-query Python loop. A block of queries is processed with array ops: the distance
rows are sorted (values only), and the rank of each true match in its query's junk-free list is counted by
a batched binary search (entries at a smaller distance) minus the same-camera junk before it, with an exact
gallery-order count only where a sorted row shows a tied distance. The metrics need only those ranks
(CMC: the rank of the first match; AP: mean of k / rank_k), so no ranked list is ever materialised. Blocks
run on ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

_METRIC_CHUNK = 256  # query rows per block in reid_map_cmc
_TIE_BLOCK = 64  # (query, true match) pairs with tied distances resolved per block
_MAX_WORKERS = 8  # threads ranking blocks concurrently (each holds about three copies of a block)
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _as_array(x: Any, name: str) -> np.ndarray:
    """Any array-like (numpy, torch on any device, list) as a numpy array, without copying when possible."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}") from err


def _as_labels(x: Any, name: str, length: int, length_of: str) -> np.ndarray:
    """A 1-D int64 label vector of the given length (ValueError naming ``name`` otherwise)."""
    a = _as_array(x, name)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.shape[0] != length:
        raise ValueError(f"{name} has {a.shape[0]} entries but {length_of} is {length}")
    if a.dtype.kind not in "biuf" or (a.dtype.kind == "f" and not np.array_equal(a, np.round(a))):
        raise ValueError(f"{name} must hold integer labels, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


@dataclass(frozen=True)
class _Gallery:
    """Gallery labels with the global junk (identity -1) dropped, and its entries grouped by identity."""

    keep: np.ndarray | None  # indices of the columns kept from the caller's gallery (None: all)
    pids: np.ndarray  # (G,) identities of the kept entries
    camids: np.ndarray  # (G,) cameras of the kept entries
    by_pid: np.ndarray  # kept column indices sorted by identity, ascending column within an identity
    uniq: np.ndarray  # distinct identities
    starts: np.ndarray  # first position of each identity in by_pid
    counts: np.ndarray  # entries per identity

    @classmethod
    def build(cls, g_pids: np.ndarray, g_camids: np.ndarray) -> _Gallery:
        keep = np.flatnonzero(g_pids != -1)
        if keep.size == g_pids.size:
            keep = None
        else:
            g_pids, g_camids = g_pids[keep], g_camids[keep]
        by_pid = np.argsort(g_pids, kind="stable")
        uniq, starts, counts = np.unique(g_pids[by_pid], return_index=True, return_counts=True)
        return cls(keep, g_pids, g_camids, by_pid, uniq, starts, counts)


def _row_searchsorted(rows: np.ndarray, values: np.ndarray, side: str) -> np.ndarray:
    """``np.searchsorted`` of every row of ``values`` (C, R) in the same row of ``rows`` (C, G, sorted).

    A binary search run on all (row, value) pairs at once: ceil(log2(G + 1)) steps of (C, R) array ops.
    """
    num_rows, width = rows.shape
    lo = np.zeros(values.shape, dtype=np.int64)
    hi = np.full(values.shape, width, dtype=np.int64)
    row = np.arange(num_rows)[:, None]
    for _ in range(int(width).bit_length()):
        mid = (lo + hi) >> 1
        probe = rows[row, np.minimum(mid, width - 1)]
        right = probe < values if side == "left" else probe <= values
        open_ = lo < hi
        lo = np.where(open_ & right, mid + 1, lo)
        hi = np.where(open_ & ~right, mid, hi)
    return lo


def _chunk_stats(
    dist: np.ndarray, q_pids: np.ndarray, q_camids: np.ndarray, gallery: _Gallery, first_row: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AP, rank of the first true match and validity for a block of queries.

    The rank of a true match j in its query's junk-free list is 1 + the number of kept entries before it in
    (distance, gallery index) order = (entries at a smaller distance, counted by ``searchsorted`` in the
    sorted row) - (same-camera junk at a smaller distance) + (kept entries at an equal distance and a smaller
    index, counted exactly only where the sorted row shows a tie).

    Args:
        dist: (C, G) distances of C queries to the kept gallery columns.
        q_pids, q_camids: (C,) query labels.
        gallery: the kept gallery, grouped by identity.
        first_row: index of the block's first query (for error messages).

    Returns:
        ``(ap, first_rank, valid)``: (C,) float64 AP (0 where invalid), (C,) int64 1-based rank of the first
        true match after junk removal (0 where invalid), (C,) bool validity.
    """
    num_q, num_g = dist.shape
    ap = np.zeros(num_q, dtype=np.float64)
    first_rank = np.zeros(num_q, dtype=np.int64)
    valid = np.zeros(num_q, dtype=bool)
    if num_g == 0:
        return ap, first_rank, valid
    ordered = np.sort(dist, axis=1)  # NaN sorts last and -inf first: checking both ends checks every value
    bad = ~(np.isfinite(ordered[:, 0]) & np.isfinite(ordered[:, -1]))
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"distmat has NaN/inf distances in {rows.size} query row(s), first at row {first_row + rows[0]}"
        )

    # Gallery entries of each query's identity, padded to (C, S) in ascending column order.
    at = np.minimum(np.searchsorted(gallery.uniq, q_pids), max(gallery.uniq.size - 1, 0))
    present = gallery.uniq[at] == q_pids
    count = np.where(present, gallery.counts[at], 0)
    width = int(count.max())
    if width == 0:
        return ap, first_rank, valid
    slot = np.arange(width)
    in_row = slot[None, :] < count[:, None]
    cols = gallery.by_pid[np.where(in_row, gallery.starts[at][:, None] + slot[None, :], 0)]
    same_d = np.take_along_axis(dist, cols, axis=1)
    same_cam = gallery.camids[cols] == q_camids[:, None]
    relevant = in_row & ~same_cam
    junk = in_row & same_cam
    n_rel = relevant.sum(axis=1)
    valid = n_rel > 0
    num_rel = int(n_rel.max())
    if num_rel == 0:
        return ap, first_rank, valid

    # True matches in (distance, column) order (stable sort of column-ordered entries), padded with +inf.
    key = np.where(relevant, same_d, np.inf)
    perm = np.argsort(key, axis=1, kind="stable")[:, :num_rel]
    t = np.take_along_axis(key, perm, axis=1)
    t_cols = np.take_along_axis(cols, perm, axis=1)
    junk_d = np.sort(np.where(junk, same_d, np.inf), axis=1)

    smaller = _row_searchsorted(ordered, t, "left")
    equal = _row_searchsorted(ordered, t, "right") - smaller
    junk_smaller = _row_searchsorted(junk_d, t, "left")
    k = np.arange(1, num_rel + 1)
    in_rel = k[None, :] <= n_rel[:, None]
    ties_before = np.zeros_like(smaller)
    tie_rows, tie_k = np.nonzero(in_rel & (equal > 1))
    for start in range(0, tie_rows.size, _TIE_BLOCK):  # equal distances: count kept entries of lower column
        r, j = tie_rows[start : start + _TIE_BLOCK], tie_k[start : start + _TIE_BLOCK]
        hit = dist[r] == t[r, j][:, None]
        hit &= np.arange(num_g)[None, :] < t_cols[r, j][:, None]
        same_pid = gallery.pids[None, :] == q_pids[r][:, None]
        hit &= ~same_pid | (gallery.camids[None, :] != q_camids[r][:, None])
        ties_before[r, j] = hit.sum(axis=1)

    ranks = smaller - junk_smaller + ties_before + 1  # 1-based rank of the k-th true match
    precision = np.where(in_rel, k[None, :] / np.maximum(ranks, 1), 0.0)
    ap = np.where(valid, precision.sum(axis=1) / np.maximum(n_rel, 1), 0.0)
    first_rank = np.where(valid, ranks[:, 0], 0)
    return ap, first_rank, valid


def _rank_blocks(
    blocks: Iterable[tuple[int, np.ndarray]], q_pids: np.ndarray, q_camids: np.ndarray, gallery: _Gallery
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``_chunk_stats`` on ``(first_row, distance block)`` pairs and concatenate the results in order.

    Blocks are processed on up to ``torch.get_num_threads()`` threads (at most ``_MAX_WORKERS``; numpy's sort
    and array ops release the GIL), with at most that many blocks in flight so memory stays bounded.
    """
    workers = max(1, min(torch.get_num_threads(), _MAX_WORKERS))
    results = []

    def run(start: int, block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stop = start + block.shape[0]
        return _chunk_stats(block, q_pids[start:stop], q_camids[start:stop], gallery, start)

    if workers == 1:
        results = [run(start, block) for start, block in blocks]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque[Future] = deque()
            for start, block in blocks:
                if len(pending) >= workers:
                    results.append(pending.popleft().result())
                pending.append(pool.submit(run, start, block))
            results.extend(future.result() for future in pending)
    ap, first_rank, valid = (np.concatenate(parts) for parts in zip(*results, strict=True))
    return ap, first_rank, valid


def _summarise(
    ap: np.ndarray, first_rank: np.ndarray, valid: np.ndarray, max_rank: int, num_gallery: int
) -> tuple[np.ndarray, float]:
    """Mean CMC curve and mAP over the valid queries."""
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            "no query has a valid match in the gallery (every query's identity is absent from the gallery or "
            "only present in the query's own camera); check the identity and camera labels"
        )
    length = min(max_rank, num_gallery)
    first = first_rank[valid]
    cmc = (first[:, None] <= np.arange(1, length + 1)[None, :]).mean(axis=0, dtype=np.float64)
    return cmc, float(ap[valid].mean())


def _check_max_rank(max_rank: int) -> None:
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")


def reid_map_cmc(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 50,
) -> tuple[np.ndarray, float]:
    """CMC curve and mAP of a query-gallery distance matrix under the Market-1501 protocol.

    Ties are ranked by gallery index (stable sort). A valid query always finds its first match within its
    junk-free list, so its CMC stays 1 beyond that list's length.

    Args:
        distmat: (num_query, num_gallery) distances, smaller = more similar (numpy array or torch tensor).
        q_pids: (num_query,) query identity labels.
        g_pids: (num_gallery,) gallery identity labels; ``-1`` marks junk, ``0`` distractors.
        q_camids: (num_query,) query camera labels.
        g_camids: (num_gallery,) gallery camera labels.
        max_rank: length of the CMC curve (clipped to the gallery size).

    Returns:
        ``(cmc, mAP)``: float64 array of length ``min(max_rank, num_gallery)`` and a float, both in [0, 1].

    Raises:
        ValueError: on mismatched shapes, NaN/inf distances, or when no query has a valid match.
    """
    _check_max_rank(max_rank)
    dist = _as_array(distmat, "distmat")
    if dist.ndim != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {dist.shape}")
    num_q, num_g = dist.shape
    if num_q == 0 or num_g == 0:
        raise ValueError(f"distmat needs at least one query and one gallery entry, got shape {dist.shape}")
    if dist.dtype.kind not in "iuf":
        raise ValueError(f"distmat must hold real distances, got dtype {dist.dtype}")
    if dist.dtype != np.float64:  # float16/32 -> float32; integers -> float64 (exact)
        dist = dist.astype(np.float32 if dist.dtype.kind == "f" else np.float64, copy=False)
    qp = _as_labels(q_pids, "q_pids", num_q, "the number of distmat rows (queries)")
    gp = _as_labels(g_pids, "g_pids", num_g, "the number of distmat columns (gallery)")
    qc = _as_labels(q_camids, "q_camids", num_q, "the number of distmat rows (queries)")
    gc = _as_labels(g_camids, "g_camids", num_g, "the number of distmat columns (gallery)")
    gallery = _Gallery.build(gp, gc)
    if gallery.keep is not None:  # junk columns are skipped below, but NaN/inf there is still bad input
        junk_cols = np.flatnonzero(gp == -1)
        bad = int(np.count_nonzero(~np.isfinite(dist[:, junk_cols])))
        if bad:
            raise ValueError(f"distmat has {bad} NaN/inf distance(s) in the columns of identity -1 (junk)")

    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, num_q, _METRIC_CHUNK):
            block = dist[start : start + _METRIC_CHUNK]
            yield start, block if gallery.keep is None else np.take(block, gallery.keep, axis=1)

    ap, first_rank, valid = _rank_blocks(blocks(), qp, qc, gallery)
    return _summarise(ap, first_rank, valid, max_rank, num_g)


def _as_features(x: Any, name: str) -> torch.Tensor:
    """A 2-D finite float tensor (float64 kept, everything else float32), on its own device."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(_as_array(x, name))
    if t.is_complex() or not (t.is_floating_point() or t.dtype in _INT_DTYPES):
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (num_samples, dim), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    bad_rows = int((~torch.isfinite(t)).any(dim=1).sum())
    if bad_rows:
        raise ValueError(f"{name} has {bad_rows} row(s) with NaN/inf values")
    return t


def _distance_blocks(
    query: torch.Tensor, gallery: torch.Tensor, metric: str, chunk_size: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_row, block)``: the query-gallery distances, ``chunk_size`` query rows at a time."""
    if metric == "cosine":
        query = F.normalize(query, dim=1)
        gallery = F.normalize(gallery, dim=1)
    g_sq = gallery.pow(2).sum(dim=1)
    for start in range(0, query.shape[0], chunk_size):
        q = query[start : start + chunk_size]
        if metric == "cosine":
            block = 1.0 - q @ gallery.T
        else:  # squared euclidean: |q|^2 + |g|^2 - 2 q.g
            block = torch.addmm(q.pow(2).sum(dim=1, keepdim=True) + g_sq[None, :], q, gallery.T, alpha=-2.0)
        yield start, block.cpu().numpy()


def reid_evaluate(
    query_features: Any,
    gallery_features: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    *,
    metric: str = "euclidean",
    max_rank: int = 50,
    chunk_size: int = 512,
) -> dict[str, Any]:
    """Market-1501 evaluation from features, with distances computed in blocks of queries.

    Distances are computed on the features' device (float64 features stay float64, others become float32)
    ``chunk_size`` queries at a time, and each block goes straight (on the CPU) into the ranking of
    :func:`reid_map_cmc`, so the full distance matrix never exists at once. Gallery entries of identity -1
    are dropped before any distance is computed. Memory: a few ``chunk_size x num_gallery`` blocks.

    Args:
        query_features: (num_query, dim) query features (numpy array or torch tensor).
        gallery_features: (num_gallery, dim) gallery features.
        q_pids: (num_query,) query identity labels.
        g_pids: (num_gallery,) gallery identity labels; ``-1`` marks junk, ``0`` distractors.
        q_camids: (num_query,) query camera labels.
        g_camids: (num_gallery,) gallery camera labels.
        metric: ``"euclidean"`` (squared Euclidean on the features as given) or ``"cosine"``
            (1 - cosine similarity).
        max_rank: length of the CMC curve (clipped to the gallery size).
        chunk_size: number of queries per distance block.

    Returns:
        ``{"mAP", "cmc", "rank1", "rank5", "rank10", "num_valid_queries"}``; rank-k is ``cmc[k-1]`` (the last
        CMC value when the gallery is smaller than k).
    """
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    _check_max_rank(max_rank)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    query = _as_features(query_features, "query_features")
    gallery = _as_features(gallery_features, "gallery_features")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query_features have dimension {query.shape[1]} but gallery_features have {gallery.shape[1]}"
        )
    if query.device != gallery.device:
        raise ValueError(f"query_features are on {query.device} but gallery_features on {gallery.device}")
    dtype = torch.float64 if torch.float64 in (query.dtype, gallery.dtype) else torch.float32
    query, gallery = query.to(dtype), gallery.to(dtype)
    num_q, num_g = query.shape[0], gallery.shape[0]
    qp = _as_labels(q_pids, "q_pids", num_q, "the number of query_features rows")
    gp = _as_labels(g_pids, "g_pids", num_g, "the number of gallery_features rows")
    qc = _as_labels(q_camids, "q_camids", num_q, "the number of query_features rows")
    gc = _as_labels(g_camids, "g_camids", num_g, "the number of gallery_features rows")
    index = _Gallery.build(gp, gc)
    if index.keep is not None:  # identity -1 is junk for every query: never compute its distances
        gallery = gallery[torch.from_numpy(index.keep).to(gallery.device)]
    with torch.no_grad():
        ap, first_rank, valid = _rank_blocks(
            _distance_blocks(query, gallery, metric, int(chunk_size)), qp, qc, index
        )
    cmc, mean_ap = _summarise(ap, first_rank, valid, max_rank, num_g)
    return {
        "mAP": mean_ap,
        "cmc": cmc,
        "rank1": float(cmc[min(1, len(cmc)) - 1]),
        "rank5": float(cmc[min(5, len(cmc)) - 1]),
        "rank10": float(cmc[min(10, len(cmc)) - 1]),
        "num_valid_queries": int(valid.sum()),
    }


def reid_evaluate_sources(
    query_features: Any,
    gallery_features: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    sources: Mapping[str, Sequence[int]],
    *,
    metric: str = "euclidean",
    max_rank: int = 50,
) -> dict[str, float]:
    """``<source>/mAP`` and ``<source>/rank1`` per source, a source being a group of cameras.

    Per source, the queries taken by its cameras are ranked against the gallery images of its cameras only,
    under the same protocol as :func:`reid_evaluate` (a combined dataset such as VIPeR + PRID + GRID in one
    Market-1501 layout, each dataset its own camera pair). A source whose queries have no valid match is
    left out (nothing to rank).

    Args:
        query_features, gallery_features, q_pids, g_pids, q_camids, g_camids: as :func:`reid_evaluate`;
            camera ids 0-based as in the records.
        sources: source name -> camera numbers, 1-based as in the file names (``_c1``).
        metric: distance, as :func:`reid_evaluate`.
        max_rank: CMC length.
    """
    qf = _as_features(query_features, "query_features")
    gf = _as_features(gallery_features, "gallery_features")
    qp, gp = _as_array(q_pids, "q_pids"), _as_array(g_pids, "g_pids")
    qc, gc = _as_array(q_camids, "q_camids"), _as_array(g_camids, "g_camids")
    out: dict[str, float] = {}
    for name, cameras in sources.items():
        zero_based = [int(c) - 1 for c in cameras]
        qm, gm = np.isin(qc, zero_based), np.isin(gc, zero_based)
        if not qm.any() or not gm.any():
            raise ValueError(f"source {name!r}: no query or gallery image from cameras {list(cameras)}")
        has_match = (qp[qm][:, None] == gp[gm][None, :]) & (qc[qm][:, None] != gc[gm][None, :])
        if not has_match.any():
            continue
        res = reid_evaluate(
            qf[torch.from_numpy(qm).to(qf.device)],
            gf[torch.from_numpy(gm).to(gf.device)],
            qp[qm],
            gp[gm],
            qc[qm],
            gc[gm],
            metric=metric,
            max_rank=max_rank,
        )
        out[f"{name}/mAP"] = float(res["mAP"])
        out[f"{name}/rank1"] = float(res["rank1"])
    return out


class ReIDMetric(Metric):
    """Market-1501 mAP and CMC as a torchmetrics ``Metric`` (query and gallery samples in any order).

    Features are stored as float32 on the device they come from; under DDP the states of all ranks are
    concatenated (uneven per-rank sizes are fine). Every sample must be fed exactly once over all ranks: a
    distributed sampler that pads with repeated samples adds duplicate queries and gallery entries.

    Args:
        metric: ``"euclidean"`` (squared Euclidean) or ``"cosine"`` (1 - cosine similarity).
        max_rank: length of the CMC curve used for the rank-k values.
        sources: per-source results too (``<name>/mAP``, ``<name>/rank1``): name -> camera numbers, 1-based
            as in the file names (:func:`reid_evaluate_sources`).
        kwargs: passed to ``torchmetrics.Metric`` (e.g. ``process_group``).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self,
        metric: str = "euclidean",
        max_rank: int = 50,
        sources: Mapping[str, Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.sources = {str(k): [int(c) for c in v] for k, v in (sources or {}).items()}
        if metric not in ("euclidean", "cosine"):
            raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
        _check_max_rank(max_rank)
        self.metric = metric
        self.max_rank = int(max_rank)
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("pids", default=[], dist_reduce_fx="cat")
        self.add_state("camids", default=[], dist_reduce_fx="cat")
        self.add_state("is_query", default=[], dist_reduce_fx="cat")

    def update(
        self, features: torch.Tensor, pids: torch.Tensor, camids: torch.Tensor, is_query: torch.Tensor
    ) -> None:
        """Store a batch: (B, D) features, (B,) identity and camera labels, (B,) query flags."""
        features = torch.as_tensor(features).detach()
        if features.dim() != 2:
            raise ValueError(f"features must be 2-D (batch, dim), got shape {tuple(features.shape)}")
        batch = features.shape[0]
        device = features.device
        labels = {}
        for name, value in (("pids", pids), ("camids", camids), ("is_query", is_query)):
            t = torch.as_tensor(value, device=device)
            if t.dim() != 1 or t.shape[0] != batch:
                raise ValueError(f"{name} must have shape ({batch},) like features, got {tuple(t.shape)}")
            labels[name] = t.long()
        self.features.append(features.to(torch.float32))
        self.pids.append(labels["pids"])
        self.camids.append(labels["camids"])
        self.is_query.append((labels["is_query"] != 0).long())  # int: gloo cannot gather bool

    def compute(self) -> dict[str, torch.Tensor]:
        """mAP and rank-1/5/10 of every stored query against every stored gallery sample."""
        if isinstance(self.features, list) and not self.features:
            raise ValueError("ReIDMetric.compute() called before any update()")
        features = dim_zero_cat(self.features)
        pids = dim_zero_cat(self.pids).cpu()
        camids = dim_zero_cat(self.camids).cpu()
        is_query = dim_zero_cat(self.is_query).cpu().bool()
        if not bool(is_query.any()) or bool(is_query.all()):
            raise ValueError(
                f"ReIDMetric needs both query and gallery samples, got {int(is_query.sum())} queries and "
                f"{int((~is_query).sum())} gallery samples"
            )
        q_mask, g_mask = is_query.to(features.device), ~is_query.to(features.device)
        result = reid_evaluate(
            features[q_mask],
            features[g_mask],
            pids[is_query],
            pids[~is_query],
            camids[is_query],
            camids[~is_query],
            metric=self.metric,
            max_rank=self.max_rank,
        )
        values = {key: result[key] for key in ("mAP", "rank1", "rank5", "rank10")}
        if self.sources:
            values.update(
                reid_evaluate_sources(
                    features[q_mask],
                    features[g_mask],
                    pids[is_query],
                    pids[~is_query],
                    camids[is_query],
                    camids[~is_query],
                    self.sources,
                    metric=self.metric,
                    max_rank=self.max_rank,
                )
            )
        return {key: torch.tensor(v, dtype=torch.float32, device=self.device) for key, v in values.items()}
