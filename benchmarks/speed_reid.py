"""Measurement 2 of ``benchmarks.speed``: Market-1501-sized ReID evaluation.

From 2048-d features: ``reid_evaluate`` vs a torchreid-style per-query NumPy loop and a lean per-query loop,
plus ``reid_map_cmc`` on a precomputed distance matrix. Time, ratio, peak memory, max |difference| of mAP
and CMC.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.common import cuda_sync, interleaved_times, make_meter, md_table, median, mib


def market_like_features(
    *,
    num_query: int = 3368,
    num_gallery: int = 15913,
    num_ids: int = 750,
    num_distractors: int = 2793,
    num_cameras: int = 6,
    dim: int = 2048,
    latent_dim: int = 32,
    noise: float = 0.5,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random float32 features with Market-1501's identity/camera structure.

    Identities 1..num_ids each have at most one query per camera (Market: 3,368 queries of 750 identities)
    and several gallery images on their cameras - including the query's own camera (same-camera junk) -
    plus ``num_distractors`` distractors of identity 0 on random cameras. A feature is a random linear image
    (``dim`` wide) of a low-dimensional identity code + camera shift + noise, so ranks are neither trivial
    nor random (mAP ~0.7 at Market size), plus a little isotropic noise.
    """
    if num_query > num_ids * num_cameras or num_cameras < 2:
        raise ValueError(f"{num_query} queries need num_ids x num_cameras >= that (one query per camera)")
    matched = num_gallery - num_distractors
    if matched < num_ids or num_distractors < 0:
        raise ValueError(f"num_gallery={num_gallery} must exceed num_distractors + num_ids")
    rng = np.random.default_rng(seed)
    q_per = np.full(num_ids, num_query // num_ids)
    q_per[rng.permutation(num_ids)[: num_query % num_ids]] += 1
    g_per = np.full(num_ids, matched // num_ids)
    g_per[rng.permutation(num_ids)[: matched % num_ids]] += 1
    q_pids, q_cams, g_pids, g_cams = [], [], [], []
    for i in range(num_ids):
        cams = rng.choice(num_cameras, rng.integers(max(int(q_per[i]), 2), num_cameras + 1), replace=False)
        q_pids += [i + 1] * int(q_per[i])
        q_cams += cams[: q_per[i]].tolist()
        g_pids += [i + 1] * int(g_per[i])
        g_cams += rng.choice(cams, int(g_per[i])).tolist()
    g_pids += [0] * num_distractors
    g_cams += rng.integers(0, num_cameras, num_distractors).tolist()
    order = rng.permutation(num_gallery)
    g_pids_a, g_cams_a = np.asarray(g_pids)[order], np.asarray(g_cams)[order]
    q_pids_a, q_cams_a = np.asarray(q_pids), np.asarray(q_cams)

    proj = rng.standard_normal((latent_dim, dim), dtype=np.float32) / math.sqrt(latent_dim)
    centres = rng.standard_normal((num_ids + 1, latent_dim), dtype=np.float32)
    cam_shift = 0.5 * rng.standard_normal((num_cameras, latent_dim), dtype=np.float32)

    def features(pids: np.ndarray, cams: np.ndarray) -> np.ndarray:
        code = (
            centres[pids] + cam_shift[cams] + noise * rng.standard_normal((len(pids), latent_dim), np.float32)
        )
        distractor = pids == 0  # every distractor is its own person
        code[distractor] = rng.standard_normal((int(distractor.sum()), latent_dim), np.float32)
        return code @ proj + 0.1 * rng.standard_normal((len(pids), dim), np.float32)

    return {
        "q_feats": features(q_pids_a, q_cams_a),
        "g_feats": features(g_pids_a, g_cams_a),
        "q_pids": q_pids_a,
        "g_pids": g_pids_a,
        "q_camids": q_cams_a,
        "g_camids": g_cams_a,
    }


def full_distance_matrix(query: torch.Tensor, gallery: torch.Tensor) -> np.ndarray:
    """All query-gallery squared Euclidean distances at once, |q|² + |g|² - 2 q·g (the toolkits' formula)."""
    with torch.no_grad():
        sq = query.pow(2).sum(1, keepdim=True) + gallery.pow(2).sum(1)[None, :]
        return torch.addmm(sq, query, gallery.T, alpha=-2.0).cpu().numpy()


def _check_shapes(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids, g_camids) -> None:
    num_q, num_g = distmat.shape
    if len(q_pids) != num_q or len(q_camids) != num_q or len(g_pids) != num_g or len(g_camids) != num_g:
        raise ValueError(f"label lengths do not match distmat of shape {distmat.shape}")


def _mean_cmc(curves: list[np.ndarray], max_rank: int) -> np.ndarray:
    if not curves:
        raise ValueError("no query has a valid match in the gallery")
    # A valid query's curve is 1 past its (junk-free) list's end, as reid_map_cmc defines it.
    padded = [np.pad(c[:max_rank], (0, max(0, max_rank - len(c))), constant_values=1) for c in curves]
    return np.mean(np.asarray(padded, dtype=np.float64), axis=0)


def reid_per_query_reference(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
) -> tuple[np.ndarray, float]:
    """The Market-1501 protocol as the python ReID toolkits write it (torchreid-style baseline).

    One query at a time: sort its distance row (stable, ties by gallery index), drop same-identity
    same-camera entries and identity -1, take the 0/1 hit vector, CMC = clipped cumulative hits, AP =
    sum over ranks of precision@k x hit@k / number of hits with the precision of every rank built in a
    Python loop (as torchreid's python evaluator does). Returns ``(cmc, mAP)`` like ``reid_map_cmc``.
    """
    _check_shapes(distmat, q_pids, g_pids, q_camids, g_camids)
    max_rank = min(max_rank, distmat.shape[1])
    curves, aps = [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        pids, cams = g_pids[order], g_camids[order]
        junk = ((pids == q_pids[i]) & (cams == q_camids[i])) | (pids == -1)
        hits = (pids[~junk] == q_pids[i]).astype(np.int32)
        if not hits.any():
            continue
        cumulative = hits.cumsum()
        curves.append(np.minimum(cumulative, 1))
        precision = np.asarray([found / (rank + 1.0) for rank, found in enumerate(cumulative)])
        aps.append(float((precision * hits).sum() / hits.sum()))
    return _mean_cmc(curves, max_rank), float(np.mean(aps))


def reid_per_query_lean(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
) -> tuple[np.ndarray, float]:
    """The same protocol, still one query at a time, but with vector ops only (no per-rank Python loop).

    Per query: stable argsort of the row, junk mask, positions of the true matches in the junk-free list;
    CMC from the first position, AP = mean of k / rank_k. Returns ``(cmc, mAP)``.
    """
    _check_shapes(distmat, q_pids, g_pids, q_camids, g_camids)
    max_rank = min(max_rank, distmat.shape[1])
    first, aps = [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        pids = g_pids[order]
        same = pids == q_pids[i]
        keep = ~((same & (g_camids[order] == q_camids[i])) | (pids == -1))
        ranks = np.flatnonzero(same[keep]) + 1
        if ranks.size == 0:
            continue
        first.append(ranks[0])
        aps.append(float(np.mean(np.arange(1, ranks.size + 1) / ranks)))
    if not first:
        raise ValueError("no query has a valid match in the gallery")
    cmc = (np.asarray(first)[:, None] <= np.arange(1, max_rank + 1)[None, :]).mean(axis=0, dtype=np.float64)
    return cmc, float(np.mean(aps))


def _as_cmc_map(result: Any) -> tuple[np.ndarray, float]:
    if isinstance(result, dict):
        return np.asarray(result["cmc"]), float(result["mAP"])
    cmc, mean_ap = result
    return np.asarray(cmc), float(mean_ap)


def bench_reid(cfg: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """Measurement 2: Market-sized ReID evaluation, ours vs per-query NumPy loops (time, memory, equality)."""
    from rgsd_lightning.evaluation import reid_map_cmc
    from rgsd_lightning.evaluation.reid import reid_evaluate

    device = torch.device(device)

    sizes = {
        k: cfg[k] for k in ("num_query", "num_gallery", "num_ids", "num_distractors", "num_cameras", "dim")
    }
    data = market_like_features(**sizes)
    labels = (data["q_pids"], data["g_pids"], data["q_camids"], data["g_camids"])
    qf = torch.from_numpy(data["q_feats"]).to(device)
    gf = torch.from_numpy(data["g_feats"]).to(device)
    distmat = full_distance_matrix(qf, gf)  # for the metric-only row

    variants: dict[str, Callable[[], Any]] = {
        "ours_reid_evaluate": lambda: reid_evaluate(qf, gf, *labels),
        "ours_reid_map_cmc_on_distmat": lambda: reid_map_cmc(distmat, *labels),
        "torchreid_style_per_query": lambda: reid_per_query_reference(full_distance_matrix(qf, gf), *labels),
        "lean_per_query": lambda: reid_per_query_lean(full_distance_matrix(qf, gf), *labels),
        "full_distance_matrix_only": lambda: full_distance_matrix(qf, gf),
    }
    meter = make_meter(device)  # CPU: RSS high-water delta; CUDA: max_memory_allocated above the start
    times, results = interleaved_times(variants, cfg["repeats"], warmup=0, sync=cuda_sync, meter=meter)
    meter.stop()
    memory = {name: int(median(peaks)) for name, peaks in results["peak_bytes"].items()}
    med = {name: median(t) for name, t in times.items()}

    ref_cmc, ref_map = _as_cmc_map(results["torchreid_style_per_query"])
    equality = {}
    for name in ("ours_reid_evaluate", "ours_reid_map_cmc_on_distmat", "lean_per_query"):
        cmc, mean_ap = _as_cmc_map(results[name])
        equality[name] = {
            "max_abs_diff_mAP": abs(mean_ap - ref_map),
            "max_abs_diff_cmc": float(np.abs(cmc - ref_cmc).max())
            if cmc.shape == ref_cmc.shape
            else math.inf,
        }
    d = med["full_distance_matrix_only"]
    return {
        "sizes": sizes,
        "mAP": ref_map,
        "rank1": float(ref_cmc[0]),
        "median_s": med,
        "times_s": times,
        "ratio_torchreid_style_over_ours": med["torchreid_style_per_query"] / med["ours_reid_evaluate"],
        "ratio_lean_over_ours": med["lean_per_query"] / med["ours_reid_evaluate"],
        "metric_only_ratio_torchreid_style": (med["torchreid_style_per_query"] - d)
        / med["ours_reid_map_cmc_on_distmat"],
        "metric_only_ratio_lean": (med["lean_per_query"] - d) / med["ours_reid_map_cmc_on_distmat"],
        "peak_memory_bytes": memory,
        "peak_memory_bytes_per_call": results["peak_bytes"],
        "memory_method": meter.method,
        "equality_vs_torchreid_style": equality,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


def md_reid(result: dict[str, Any]) -> str:
    """Markdown of measurement 2."""
    s, med, mem, eq = (
        result["sizes"],
        result["median_s"],
        result["peak_memory_bytes"],
        result["equality_vs_torchreid_style"],
    )
    base = med["torchreid_style_per_query"]
    descr = {
        "ours_reid_evaluate": "(a) ours: `reid_evaluate` (features -> blocked distances -> metric)",
        "ours_reid_map_cmc_on_distmat": "(a') ours: `reid_map_cmc` on a precomputed distance matrix",
        "torchreid_style_per_query": "(b) torchreid-style: full distmat + per-query argsort/masks/Python AP",
        "lean_per_query": "(c) lean per-query: full distmat + per-query argsort + vector ops",
        "full_distance_matrix_only": "full distance matrix alone (part of b and c)",
    }
    rows = []
    for name, text in descr.items():
        e = eq.get(name)
        diff = "reference" if name == "torchreid_style_per_query" else "-"
        if e is not None:
            diff = f"{e['max_abs_diff_mAP']:.1e} / {e['max_abs_diff_cmc']:.1e}"
        rows.append([text, f"{med[name]:.3f}", f"{base / med[name]:.1f}x", mib(mem[name]), diff])
    return (
        "## 2. ReID evaluation at Market-1501 size\n\n"
        f"{s['num_query']} queries x {s['num_gallery']} gallery ({s['num_distractors']} distractors of "
        f"identity 0), {s['num_ids']} identities, {s['num_cameras']} cameras, {s['dim']}-d float32 random "
        f"features with identity/camera structure (mAP {result['mAP']:.3f}, rank-1 {result['rank1']:.3f}); "
        f"squared Euclidean; device {result['device']}, {result['threads']} torch threads (ours ranks blocks "
        "on that many threads; the per-query loops are single-threaded NumPy as users run them). Median of "
        f"interleaved runs. Peak memory: {result['memory_method']}, median over the timed calls.\n\n"
        + md_table(
            ["variant", "time s", "speed-up vs (b)", "peak MiB", "max abs diff mAP / CMC vs (b)"], rows
        )
        + "\nSpeed-up of ours, features -> metric: "
        f"**{result['ratio_torchreid_style_over_ours']:.1f}x** vs (b) (target >= 20x), "
        f"{result['ratio_lean_over_ours']:.1f}x vs (c). Metric only (distance-matrix time subtracted from "
        f"b and c; a' on the same matrix): {result['metric_only_ratio_torchreid_style']:.1f}x vs (b), "
        f"{result['metric_only_ratio_lean']:.1f}x vs (c). Below 1 means slower.\n"
    )
