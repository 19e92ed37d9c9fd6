"""Face verification: insightface 10-fold accuracy against brute force, folds, thresholds, reports, Metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rgsd_lightning.evaluation import (
    VerificationMetric,
    VerificationResult,
    flip_fuse,
    group_report,
    verification_accuracy,
)


def brute_force(e1, e2, issame, n_folds=10):
    """Explicit loops over folds and thresholds, KFold(shuffle=False) folds, strict '<', first best."""
    e1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    dist = np.array([sum((a - b) ** 2) for a, b in zip(e1, e2, strict=True)])
    n = len(dist)
    sizes = [n // n_folds + (1 if f < n % n_folds else 0) for f in range(n_folds)]
    starts = np.cumsum([0, *sizes])
    accs, chosen = [], []
    for f in range(n_folds):
        test = np.zeros(n, dtype=bool)
        test[starts[f] : starts[f + 1]] = True
        best_acc, best_thr = -1.0, None
        for thr in np.arange(0, 4, 0.01):
            acc = np.mean((dist[~test] < thr) == issame[~test])
            if acc > best_acc:  # strictly better only: the first (lowest) threshold wins a tie
                best_acc, best_thr = acc, thr
        accs.append(np.mean((dist[test] < best_thr) == issame[test]))
        chosen.append(best_thr)
    return float(np.mean(accs)), float(np.std(accs)), np.array(chosen)


def random_pairs(seed, n=600, dim=12, noise=1.0):
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    e1 = rng.normal(size=(n, dim))
    other = rng.normal(size=(n, dim))
    e2 = np.where(issame[:, None], e1 + noise * rng.normal(size=(n, dim)), other)
    return e1 * rng.uniform(0.5, 3.0, (n, 1)), e2, issame  # arbitrary norms: the protocol normalises


@pytest.mark.parametrize(("seed", "n", "n_folds"), [(0, 600, 10), (1, 603, 10), (2, 97, 7)])
def test_matches_brute_force(seed, n, n_folds):
    e1, e2, issame = random_pairs(seed, n)
    acc, std, thr = verification_accuracy(e1, e2, issame, n_folds=n_folds)
    ref_acc, ref_std, ref_thr = brute_force(e1, e2, issame, n_folds)
    assert acc == pytest.approx(ref_acc, abs=1e-12)
    assert std == pytest.approx(ref_std, abs=1e-12)
    np.testing.assert_array_equal(thr, ref_thr)
    assert 0.6 < acc < 0.99 and std > 0  # a non-trivial problem
    result = verification_accuracy(
        torch.from_numpy(e1), torch.from_numpy(e2), torch.from_numpy(issame), n_folds
    )
    assert isinstance(result, VerificationResult)
    assert result.accuracy == pytest.approx(acc, abs=1e-12) and result.thresholds.shape == (n_folds,)


def test_strict_less_than_and_lowest_threshold():
    # pairs 0-4 "same" with identical embeddings (distance exactly 0); pairs 5-9 "different" with orthogonal
    # embeddings (distance exactly 2). Two folds: fold 0 = the same pairs, fold 1 = the different pairs.
    # Fold 0 trains on "different" pairs only: every threshold <= 2.0 is perfect, the first is 0.0; on the
    #   held-out fold, 0 < 0.0 is false, so every "same" pair is called different: accuracy 0
    #   (with '<=' it would be 1).
    # Fold 1 trains on "same" pairs at distance 0: thresholds 0.01 .. 3.99 are all perfect (a plateau); the
    #   lowest, 0.01, is chosen ('<=' would choose 0.0); held out, 2 < 0.01 is false: accuracy 1.
    eye = np.eye(4)
    e1 = np.concatenate([np.tile(3 * eye[0], (5, 1)), np.tile(eye[1], (5, 1))])
    e2 = np.concatenate([np.tile(2 * eye[0], (5, 1)), np.tile(0.5 * eye[2], (5, 1))])
    issame = np.array([True] * 5 + [False] * 5)
    acc, std, thr = verification_accuracy(e1, e2, issame, n_folds=2)
    assert acc == pytest.approx(0.5, abs=1e-12)
    assert std == pytest.approx(0.5, abs=1e-12)
    np.testing.assert_array_equal(thr, [0.0, 0.01])


def test_plateau_picks_the_lowest_threshold():
    # "same" distances all below 0.5, "different" ones all above 1.5: every threshold on the grid between
    # max(same) and min(different) is perfect; the chosen one is the first grid value above max(same)
    rng = np.random.default_rng(3)
    n, dim = 200, 6
    issame = np.arange(n) % 2 == 0
    e1 = rng.normal(size=(n, dim))
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = -e1 + 0.05 * rng.normal(size=(n, dim))  # distance about 4
    e2[issame] = e1[issame] + 0.1 * rng.normal(size=(issame.sum(), dim))
    acc, std, thr = verification_accuracy(e1, e2, issame)
    u1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    u2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    dist = ((u1 - u2) ** 2).sum(1)
    assert dist[issame].max() < 0.5 and dist[~issame].min() > 1.5
    assert acc > 0.95  # held-out "same" pairs beyond the training maximum are (correctly) counted wrong
    grid = np.arange(0, 4, 0.01)
    for fold, t in enumerate(thr):
        train = np.ones(n, dtype=bool)
        train[fold * 20 : (fold + 1) * 20] = False
        assert t == grid[grid > dist[train & issame].max()][0]


def test_fold_sizes_follow_kfold():
    # 13 pairs, 10 folds -> sizes 2 2 2 1 1 1 1 1 1 1 (KFold: the first n % k folds get one more pair).
    # All pairs are perfectly separable except pair 2 ("same", but far apart), which is wrong at the chosen
    # threshold; it lies in fold 1 (pairs 2 and 3), whose accuracy is 1/2; every other fold scores 1.
    # mean = (9 + 0.5) / 10 = 0.95, population std = sqrt((9 * 0.05^2 + 0.45^2) / 10) = 0.15
    # (if the remainder went to the last fold, pair 2 would be alone in its fold: mean 0.9).
    eye = np.eye(3)
    issame = np.array([i % 2 == 0 for i in range(13)])
    e1 = np.tile(eye[0], (13, 1))
    e2 = np.where(issame[:, None], eye[0], eye[1])
    e2[2] = eye[1]
    acc, std, _ = verification_accuracy(e1, e2, issame)
    assert acc == pytest.approx(0.95, abs=1e-12)
    assert std == pytest.approx(0.15, abs=1e-12)
    sklearn_model_selection = pytest.importorskip("sklearn.model_selection")
    sizes = [len(test) for _, test in sklearn_model_selection.KFold(n_splits=10, shuffle=False).split(e1)]
    assert sizes == [2, 2, 2, 1, 1, 1, 1, 1, 1, 1]


def test_rejects_bad_input():
    e1, e2, issame = random_pairs(0, 40)
    bad = e2.copy()
    bad[4, 2] = np.nan
    with pytest.raises(ValueError, match="embeddings2 has 1 row"):
        verification_accuracy(e1, bad, issame)
    with pytest.raises(ValueError, match="shape"):
        verification_accuracy(e1, e2[:-1], issame)
    with pytest.raises(ValueError, match="issame must have shape"):
        verification_accuracy(e1, e2, issame[:-1])
    with pytest.raises(ValueError, match="larger than the number of pairs"):
        verification_accuracy(e1[:5], e2[:5], issame[:5], n_folds=10)
    with pytest.raises(ValueError, match="n_folds must be"):
        verification_accuracy(e1, e2, issame, n_folds=1)
    with pytest.raises(ValueError, match="issame must hold booleans"):
        verification_accuracy(e1, e2, np.full(40, 2))


def test_flip_fuse():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    fused = flip_fuse(a, b)
    expected = (a + b) / np.linalg.norm(a + b, axis=1, keepdims=True)
    np.testing.assert_allclose(fused, expected, atol=1e-12)
    np.testing.assert_allclose(flip_fuse(a, 3 * a), a / np.linalg.norm(a, axis=1, keepdims=True), atol=1e-12)
    fused_t = flip_fuse(torch.from_numpy(a), torch.from_numpy(b))
    assert isinstance(fused_t, torch.Tensor)
    np.testing.assert_allclose(fused_t.numpy(), expected, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        flip_fuse(a, b[:3])


def test_group_report_by_hand():
    report = group_report({"African": 0.90, "Asian": 0.80, "Caucasian": 0.95, "Indian": 0.85})
    # mean 0.875; deviations +-0.025, +-0.075 -> variance (2 * 0.025^2 + 2 * 0.075^2) / 4 = 0.003125
    # errors 0.10 0.20 0.05 0.15 -> max / min = 0.20 / 0.05 = 4
    assert report["African"] == 0.90 and report["Indian"] == 0.85
    assert report["mean"] == pytest.approx(0.875, abs=1e-12)
    assert report["std"] == pytest.approx(np.sqrt(0.003125), abs=1e-12)
    assert report["max_min_error_ratio"] == pytest.approx(4.0, abs=1e-9)
    assert group_report({"a": 1.0, "b": 0.9})["max_min_error_ratio"] == float("inf")
    with pytest.raises(ValueError, match="clash"):
        group_report({"mean": 0.9})
    with pytest.raises(ValueError, match="at least one group"):
        group_report({})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        group_report({"a": 91.5})


def make_image_set(seed=0, num_images=70, dim=8, num_pairs=120):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 10, num_images)
    emb = (rng.normal(size=(10, dim))[ids] + 0.8 * rng.normal(size=(num_images, dim))).astype(np.float32)
    pairs = rng.integers(0, num_images, (num_pairs, 2))
    return emb, pairs, ids[pairs[:, 0]] == ids[pairs[:, 1]]


def test_metric_equals_function_and_checks_indices():
    emb, pairs, issame = make_image_set()
    order = np.random.default_rng(1).permutation(len(emb))
    m = VerificationMetric(pairs, issame, num_images=len(emb))
    for idx in np.array_split(order, 4):
        m.update(torch.from_numpy(emb[idx]), torch.from_numpy(idx))
    m.update(torch.from_numpy(emb[[3, 3]]), torch.tensor([3, 3]))  # repeated image, same embedding: fine
    out = m.compute()
    acc, std, _ = verification_accuracy(emb[pairs[:, 0]], emb[pairs[:, 1]], issame)
    assert 0.6 < acc < 1.0
    assert out["accuracy"].dim() == 0 and out["accuracy"].item() == pytest.approx(acc, abs=1e-6)
    assert out["std"].item() == pytest.approx(std, abs=1e-6)

    m.update(torch.from_numpy(emb[[4]] + 1.0), torch.tensor([4]))
    with pytest.raises(ValueError, match="different embeddings for the same image index"):
        m.compute()
    m.reset()
    used = np.unique(pairs)
    seen = np.setdiff1d(np.arange(len(emb)), used[:3])
    m.update(torch.from_numpy(emb[seen]), torch.from_numpy(seen))
    with pytest.raises(ValueError, match="missing the embeddings of 3 image"):
        m.compute()
    m.reset()
    m.update(torch.from_numpy(emb[:2]), torch.tensor([0, len(emb)]))
    with pytest.raises(ValueError, match="outside"):
        m.compute()
    with pytest.raises(ValueError, match="outside"):
        VerificationMetric(pairs, issame, num_images=int(pairs.max()))
    with pytest.raises(ValueError, match="issame must be"):
        VerificationMetric(pairs, issame[:-1], num_images=len(emb))


def test_nan_embeddings_are_named_as_nan_not_as_duplicates():
    """Issue 14 case 3: flip_fuse on torch tensors and VerificationMetric.update refuse NaN/inf embeddings."""
    a = torch.randn(4, 3)
    bad = a.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="embeddings_flipped has 1 row"):
        flip_fuse(a, bad)
    with pytest.raises(ValueError, match="embeddings has 1 row"):
        flip_fuse(bad, a)
    with pytest.raises(ValueError, match="embeddings has 1 row"):  # numpy input: the same rule
        flip_fuse(bad.numpy(), a.numpy())
    emb, pairs, issame = make_image_set()
    m = VerificationMetric(pairs, issame, num_images=len(emb))
    nan = torch.from_numpy(emb[:3].copy())
    nan[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"1 row\(s\) with NaN/inf values \(image indices \[1\]\)"):
        m.update(nan, torch.arange(3))
