"""ReID evaluation: Market-1501 protocol (CMC/mAP) against a per-query reference, features, Metric, DDP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import free_port

from rgsd_lightning.evaluation import (
    ReIDMetric,
    VerificationMetric,
    reid_evaluate,
    reid_map_cmc,
    verification_accuracy,
)
from rgsd_lightning.evaluation import reid as reid_module


# ------------------------------------------------------------------------------------------ reference
def reference_map_cmc(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """Textbook per-query protocol: stable sort, drop junk, skip queries without a true match."""
    num_q, num_g = distmat.shape
    length = min(max_rank, num_g)
    all_cmc, all_ap = [], []
    for i in range(num_q):
        order = np.argsort(distmat[i], kind="stable")
        pids, cams = g_pids[order], g_camids[order]
        junk = (pids == -1) | ((pids == q_pids[i]) & (cams == q_camids[i]))
        good = pids[~junk] == q_pids[i]
        if not good.any():
            continue
        hit_ranks = np.flatnonzero(good) + 1  # 1-based positions of the true matches in the kept list
        precisions = [(k + 1) / rank for k, rank in enumerate(hit_ranks)]
        all_ap.append(sum(precisions) / len(precisions))
        all_cmc.append([1.0 if r >= hit_ranks[0] else 0.0 for r in range(1, length + 1)])
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap))


def market_like(seed, num_q=60, num_g=400, num_ids=25, dim=16, noise=2.5):
    """Identity-structured features with 6 cameras, pid-0 distractors, pid -1 junk and two special queries."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids + 1, dim)) * 2.0
    g_pids = rng.integers(1, num_ids + 1, num_g)
    g_pids[rng.random(num_g) < 0.1] = 0  # distractors
    g_pids[rng.random(num_g) < 0.05] = -1  # junk
    g_cams = rng.integers(0, 6, num_g)
    q_pids = rng.integers(1, num_ids, num_q)
    q_cams = rng.integers(0, 6, num_q)
    # query 0: identity absent from the gallery; query 1: its only gallery matches share its camera
    g_pids[g_pids == num_ids] = 1
    q_pids[0] = num_ids
    g_cams[g_pids == 2] = 3
    q_cams[q_pids == 2] = 0
    q_pids[1], q_cams[1] = 2, 3
    g_feat = centres[np.maximum(g_pids, 0)] + noise * rng.normal(size=(num_g, dim))
    q_feat = centres[q_pids] + noise * rng.normal(size=(num_q, dim))
    return q_feat, g_feat, q_pids, g_pids, q_cams, g_cams


def count_valid(q_pids, g_pids, q_camids, g_camids):
    """Queries with at least one gallery entry of their identity from another camera (and not junk)."""
    match = (q_pids[:, None] == g_pids[None, :]) & (q_camids[:, None] != g_camids[None, :]) & (g_pids != -1)
    return int(match.any(axis=1).sum())


def sq_euclidean(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


# ------------------------------------------------------------------------------------------ reid_map_cmc
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_per_query_reference_on_structured_random_data(seed):
    q, g, qp, gp, qc, gc = market_like(seed)
    dist = sq_euclidean(q, g)
    cmc, mean_ap = reid_map_cmc(dist, qp, gp, qc, gc)
    ref_cmc, ref_ap = reference_map_cmc(dist, qp, gp, qc, gc)
    assert cmc.dtype == np.float64 and cmc.shape == (50,)
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
    assert mean_ap == pytest.approx(ref_ap, abs=1e-6)
    assert 0.0 < mean_ap < 1.0 and 0.0 < cmc[0] < 1.0  # neither trivial nor degenerate


def test_skipped_queries_do_not_count():
    q, g, qp, gp, qc, gc = market_like(3)
    dist = sq_euclidean(q, g)
    cmc, mean_ap = reid_map_cmc(dist, qp, gp, qc, gc)
    # queries 0 and 1 have no valid match: dropping them changes nothing
    cmc2, mean_ap2 = reid_map_cmc(dist[2:], qp[2:], gp, qc[2:], gc)
    np.testing.assert_allclose(cmc, cmc2, atol=1e-12)
    assert mean_ap == pytest.approx(mean_ap2, abs=1e-12)
    assert (
        reid_evaluate(q, g, qp, gp, qc, gc)["num_valid_queries"] == count_valid(qp, gp, qc, gc) <= len(qp) - 2
    )


@pytest.mark.parametrize("workers", [1, 3])
def test_many_blocks_and_heavy_ties_match_reference(monkeypatch, workers):
    # integer distances: ties everywhere, including between true matches, junk and non-matches;
    # 300 queries span two internal blocks; the block runner is tried with 1 and 3 threads
    monkeypatch.setattr(reid_module.torch, "get_num_threads", lambda: workers)
    rng = np.random.default_rng(7)
    num_q, num_g = 300, 120
    qp, qc = rng.integers(1, 8, num_q), rng.integers(0, 3, num_q)
    gp, gc = rng.integers(-1, 8, num_g), rng.integers(0, 3, num_g)
    dist = rng.integers(0, 4, (num_q, num_g)).astype(np.float32)
    cmc, mean_ap = reid_map_cmc(dist, qp, gp, qc, gc, max_rank=20)
    ref_cmc, ref_ap = reference_map_cmc(dist, qp, gp, qc, gc, max_rank=20)
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
    assert mean_ap == pytest.approx(ref_ap, abs=1e-6)


def test_hand_worked_case():
    # gallery:          g0          g1          g2          g3           g4          g5
    #   pid / cam:      1 / 0       2 / 1       1 / 1       -1 / 2       0 / 1       1 / 2
    g_pids = np.array([1, 2, 1, -1, 0, 1])
    g_cams = np.array([0, 1, 1, 2, 1, 2])
    distmat = np.array(
        [
            [0.1, 0.2, 0.3, 0.05, 0.4, 0.5],  # q0: pid 1, cam 0
            [0.1, 0.2, 0.3, 0.05, 0.4, 0.5],  # q1: pid 1, cam 1
            [0.1, 0.2, 0.3, 0.05, 0.4, 0.5],  # q2: pid 2, cam 1 (its only match g1 is in its camera)
            [0.1, 0.2, 0.3, 0.05, 0.4, 0.5],  # q3: pid 3 (absent from the gallery)
        ]
    )
    q_pids, q_cams = np.array([1, 1, 2, 3]), np.array([0, 1, 1, 0])
    # q0: order g3 g0 g1 g2 g4 g5; junk g3 (pid -1), g0 (pid 1 cam 0) -> kept g1 g2 g4 g5 = [0 1 0 1]
    #     AP = (1/2 + 2/4) / 2 = 0.5; CMC = 0 1 1 1 1 1
    # q1: junk g3, g2 (pid 1 cam 1) -> kept g0 g1 g4 g5 = [1 0 0 1]; AP = (1/1 + 2/4) / 2 = 0.75; CMC 1 1 ..
    #     (g4 is a pid-0 distractor: an ordinary non-match)
    # q2, q3: no valid match -> skipped.  mAP = 0.625; CMC = 0.5 1 1 1 1 1 (length clipped to 6 < 50)
    cmc, mean_ap = reid_map_cmc(distmat, q_pids, g_pids, q_cams, g_cams)
    assert mean_ap == pytest.approx(0.625, abs=1e-12)
    np.testing.assert_allclose(cmc, [0.5, 1, 1, 1, 1, 1], atol=1e-12)
    cmc3, _ = reid_map_cmc(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=3)
    np.testing.assert_allclose(cmc3, [0.5, 1, 1], atol=1e-12)


def test_ties_are_ranked_by_gallery_order():
    # one query (pid 1, cam 0); every distance equal, so the gallery order decides:
    # g0 pid 2 | g1 pid 1 cam 0 (junk) | g2 pid 1 cam 1 | g3 pid 1 cam 2 | g4 pid 3
    # kept: g0 g2 g3 g4 = [0 1 1 0] -> AP = (1/2 + 2/3) / 2 = 7/12, CMC = 0 1 1 1
    g_pids, g_cams = np.array([2, 1, 1, 1, 3]), np.array([1, 0, 1, 2, 1])
    dist = np.ones((1, 5))
    cmc, mean_ap = reid_map_cmc(dist, [1], g_pids, [0], g_cams)
    assert mean_ap == pytest.approx(7 / 12, abs=1e-12)
    np.testing.assert_allclose(cmc, [0, 1, 1, 1, 1], atol=1e-12)
    # the same gallery with g0 moved to the end: kept g2 g3 g4 g0 = [1 1 0 0] -> AP = 1, CMC = 1 1 1 1 1
    order = np.array([1, 2, 3, 4, 0])
    cmc, mean_ap = reid_map_cmc(dist, [1], g_pids[order], [0], g_cams[order])
    assert mean_ap == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(cmc, np.ones(5), atol=1e-12)
    # a strictly smaller distance still wins over gallery order
    dist2 = np.array([[1.0, 1.0, 1.0, 1.0, 0.5]])  # g4 (non-match) first: kept g4 g0 g2 g3 = [0 0 1 1]
    _, mean_ap = reid_map_cmc(dist2, [1], g_pids, [0], g_cams)
    assert mean_ap == pytest.approx((1 / 3 + 2 / 4) / 2, abs=1e-12)


def test_accepts_torch_tensors():
    q, g, qp, gp, qc, gc = market_like(4)
    dist = sq_euclidean(q, g)
    cmc, mean_ap = reid_map_cmc(
        torch.from_numpy(dist),
        torch.from_numpy(qp),
        torch.from_numpy(gp),
        torch.from_numpy(qc),
        torch.tensor(gc),
    )
    ref_cmc, ref_ap = reference_map_cmc(dist, qp, gp, qc, gc)
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
    assert mean_ap == pytest.approx(ref_ap, abs=1e-6)


def test_rejects_bad_input():
    dist = np.random.default_rng(0).random((3, 4))
    qp, gp, qc, gc = np.array([1, 2, 3]), np.array([1, 2, 3, 4]), np.zeros(3, int), np.ones(4, int)
    with pytest.raises(ValueError, match="no query has a valid match"):
        reid_map_cmc(dist, qp, gp, qc, np.zeros(4, int))  # every match shares the query's camera
    with pytest.raises(ValueError, match="no query has a valid match"):
        reid_map_cmc(dist, qp, np.full(4, -1), qc, gc)
    with pytest.raises(ValueError, match="q_pids has 2 entries"):
        reid_map_cmc(dist, qp[:2], gp, qc, gc)
    with pytest.raises(ValueError, match="g_camids has 3 entries"):
        reid_map_cmc(dist, qp, gp, qc, gc[:3])
    with pytest.raises(ValueError, match="distmat must be 2-D"):
        reid_map_cmc(dist[0], qp, gp, qc, gc)
    with pytest.raises(ValueError, match="max_rank"):
        reid_map_cmc(dist, qp, gp, qc, gc, max_rank=0)
    for bad in (np.nan, np.inf, -np.inf):
        broken = dist.copy()
        broken[2, 1] = bad
        with pytest.raises(ValueError, match="NaN/inf"):
            reid_map_cmc(broken, qp, gp, qc, gc)
    broken = dist.copy()
    broken[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):  # also in a junk column
        reid_map_cmc(broken, qp, np.array([1, 2, 3, -1]), qc, gc)


# ------------------------------------------------------------------------------------------ reid_evaluate
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_evaluate_equals_metric_on_explicit_distances(metric, chunk_size):
    q, g, qp, gp, qc, gc = market_like(5)
    q = q + 3.0  # not centred, so cosine and euclidean rank differently
    if metric == "euclidean":
        dist = sq_euclidean(q, g)
    else:
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        gn = g / np.linalg.norm(g, axis=1, keepdims=True)
        dist = 1.0 - qn @ gn.T
    cmc, mean_ap = reid_map_cmc(dist, qp, gp, qc, gc)
    out = reid_evaluate(q, g, qp, gp, qc, gc, metric=metric, chunk_size=chunk_size)
    np.testing.assert_allclose(out["cmc"], cmc, atol=1e-12)
    assert out["mAP"] == pytest.approx(mean_ap, abs=1e-12)
    assert (out["rank1"], out["rank5"], out["rank10"]) == (cmc[0], cmc[4], cmc[9])
    assert out["num_valid_queries"] == count_valid(qp, gp, qc, gc) <= len(qp) - 2
    other = reid_evaluate(q, g, qp, gp, qc, gc, metric="cosine" if metric == "euclidean" else "euclidean")
    assert other["mAP"] != pytest.approx(out["mAP"], abs=1e-6)


def test_evaluate_small_gallery_and_torch_float32():
    q, g, qp, gp, qc, gc = market_like(6)
    # gallery of 3 (rank5/rank10 fall back to cmc[-1]): a true match of query 2 and two other entries
    match = np.flatnonzero((gp == qp[2]) & (gc != qc[2]))[0]
    keep = np.concatenate([[match], np.flatnonzero((gp > 0) & (gp != qp[2]))[:2]])
    qf, gf = torch.tensor(q, dtype=torch.float32), torch.tensor(g[keep], dtype=torch.float32)
    out = reid_evaluate(qf, gf, torch.tensor(qp), gp[keep], qc, gc[keep])
    cmc, mean_ap = reid_map_cmc(
        sq_euclidean(qf.double().numpy(), gf.double().numpy()), qp, gp[keep], qc, gc[keep]
    )
    assert out["cmc"].shape == (3,)
    assert out["rank5"] == out["rank10"] == out["cmc"][-1]
    np.testing.assert_allclose(out["cmc"], cmc, atol=1e-6)
    assert out["mAP"] == pytest.approx(mean_ap, abs=1e-6)


def test_evaluate_rejects_bad_features():
    q, g, qp, gp, qc, gc = market_like(0)
    bad = g.copy()
    bad[[3, 9], 0] = np.nan
    with pytest.raises(ValueError, match="gallery_features has 2 row"):
        reid_evaluate(q, bad, qp, gp, qc, gc)
    bad = q.copy()
    bad[0, 1] = np.inf
    with pytest.raises(ValueError, match="query_features has 1 row"):
        reid_evaluate(bad, g, qp, gp, qc, gc)
    with pytest.raises(ValueError, match="dimension"):
        reid_evaluate(q[:, :5], g, qp, gp, qc, gc)
    with pytest.raises(ValueError, match="metric must be"):
        reid_evaluate(q, g, qp, gp, qc, gc, metric="manhattan")
    with pytest.raises(ValueError, match="g_pids has"):
        reid_evaluate(q, g, qp, gp[:-1], qc, gc)


# ------------------------------------------------------------------------------------------ ReIDMetric
@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric ReIDMetric was called before")
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_reid_metric_over_updates_equals_reid_evaluate(metric):
    q, g, qp, gp, qc, gc = market_like(8)
    feats = torch.tensor(np.concatenate([q, g]), dtype=torch.float32)
    pids = torch.tensor(np.concatenate([qp, gp]))
    cams = torch.tensor(np.concatenate([qc, gc]))
    is_query = torch.arange(len(feats)) < len(q)
    perm = torch.randperm(len(feats), generator=torch.Generator().manual_seed(0))  # queries and gallery mixed
    feats, pids, cams, is_query = feats[perm], pids[perm], cams[perm], is_query[perm]
    m = ReIDMetric(metric=metric)
    for chunk in torch.arange(len(feats)).split(37):
        m.update(feats[chunk], pids[chunk], cams[chunk], is_query[chunk])
    result = m.compute()
    q_mask, g_mask = is_query, ~is_query
    ref = reid_evaluate(
        feats[q_mask], feats[g_mask], pids[q_mask], pids[g_mask], cams[q_mask], cams[g_mask], metric=metric
    )
    assert set(result) == {"mAP", "rank1", "rank5", "rank10"}
    for key in result:
        assert result[key].dim() == 0
        assert result[key].item() == pytest.approx(ref[key], abs=1e-6), key
    m.reset()
    with pytest.raises(ValueError, match="before any update"):
        m.compute()
    m.update(feats[:5], pids[:5], cams[:5], torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="both query and gallery"):
        m.compute()
    with pytest.raises(ValueError, match="camids must have shape"):
        m.update(feats[:5], pids[:5], cams[:4], is_query[:5])


# ---------------------------------------------------------------------------------------- DDP (both metrics)
def _verification_data():
    rng = np.random.default_rng(11)
    num_images, dim = 90, 8
    ids = rng.integers(0, 12, num_images)
    centres = rng.normal(size=(12, dim)) * 1.5
    emb = (centres[ids] + rng.normal(size=(num_images, dim))).astype(np.float32)
    pairs = rng.integers(0, num_images, (130, 2))
    issame = ids[pairs[:, 0]] == ids[pairs[:, 1]]
    return emb, pairs, issame


def _reid_data():
    q, g, qp, gp, qc, gc = market_like(9)
    feats = torch.tensor(np.concatenate([q, g]), dtype=torch.float32)
    return (
        feats,
        torch.tensor(np.concatenate([qp, gp])),
        torch.tensor(np.concatenate([qc, gc])),
        torch.arange(len(feats)) < len(q),
    )


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        feats, pids, cams, is_query = _reid_data()
        split = 150  # uneven shards: rank 0 gets 150 samples in 3 updates, rank 1 the other 310 in 2
        lo, hi, parts = (0, split, 3) if rank == 0 else (split, len(feats), 2)
        reid = ReIDMetric()
        for idx in torch.arange(lo, hi).tensor_split(parts):
            reid.update(feats[idx], pids[idx], cams[idx], is_query[idx])
        emb, pairs, issame = _verification_data()
        ver = VerificationMetric(pairs, issame, num_images=len(emb))
        # rank 0: images 0..29, rank 1: 30..89 plus image 5 again (padding of a distributed sampler)
        index = np.arange(0, 30) if rank == 0 else np.concatenate([np.arange(30, 90), [5]])
        for idx in np.array_split(index, 2):
            ver.update(torch.from_numpy(emb[idx]), torch.from_numpy(idx))
        torch.save({"reid": reid.compute(), "ver": ver.compute()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_metrics_under_two_gloo_ranks_equal_single_process(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    feats, pids, cams, is_query = _reid_data()
    ref = reid_evaluate(
        feats[is_query], feats[~is_query], pids[is_query], pids[~is_query], cams[is_query], cams[~is_query]
    )
    emb, pairs, issame = _verification_data()
    acc, std, _ = verification_accuracy(emb[pairs[:, 0]], emb[pairs[:, 1]], issame)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key in ("mAP", "rank1", "rank5", "rank10"):
            assert result["reid"][key].item() == pytest.approx(ref[key], abs=1e-6), (rank, key)
        assert result["ver"]["accuracy"].item() == pytest.approx(acc, abs=1e-6)
        assert result["ver"]["std"].item() == pytest.approx(std, abs=1e-6)
