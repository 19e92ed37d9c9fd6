"""Generator-quality metrics (evaluation/quality.py) and per-source ReID metrics against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from rgsd_lightning.evaluation import ReIDMetric, reid_evaluate, reid_evaluate_sources
from rgsd_lightning.evaluation.quality import (
    fid_kid,
    identity_fidelity,
    identity_ranks,
    intra_identity_distance,
    prototypes,
    selection_precision,
    set_summary,
)


# ---------------------------------------------------------------------------------- quality maths
def test_fidelity_and_diversity_match_hand_computed_values():
    real = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    protos, names = prototypes(real, ["a", "a", "b", "b"])
    assert names == ["a", "b"]
    np.testing.assert_allclose(protos[0], np.array([0.9, 0.3]) / math.hypot(0.9, 0.3))
    np.testing.assert_allclose(protos[1], np.array([-0.3, 0.9]) / math.hypot(0.3, 0.9))
    # [1, .1] -> a (right); [.7, .7] -> a although labelled b (wrong); [-1, .2] -> b (right)
    samples = np.array([[1.0, 0.1], [0.7, 0.7], [-1.0, 0.2]])
    assert identity_fidelity(samples, ["a", "b", "b"], protos, names) == pytest.approx(2 / 3)
    assert identity_fidelity(samples, ["b", "b", "a"], protos, names) == pytest.approx(0.0)

    # a, b: one pair each at distance sqrt(0.4); c: a 3-4-5 triangle (mean 4); d: one image (ignored)
    feats = np.array([[1, 0], [0.8, 0.6], [0, 1], [-0.6, 0.8], [0, 0], [3, 4], [0, 4], [9, 9]])
    labels = ["a", "a", "b", "b", "c", "c", "c", "d"]
    expected = (math.sqrt(0.4) * 2 + 4.0) / 3
    assert intra_identity_distance(feats, labels) == pytest.approx(expected)
    assert intra_identity_distance(feats[:1], ["a"]) is None
    with pytest.raises(ValueError, match="2 features but 1 labels"):
        identity_fidelity(samples[:2], ["a"], protos, names)


def test_identity_ranks_match_a_brute_force_sort_and_count_ties_against_the_sample():
    rng = np.random.default_rng(0)
    protos, names = prototypes(rng.normal(size=(30, 4)), [f"id{i % 6}" for i in range(30)])
    samples = rng.normal(size=(20, 4))
    labels = [names[i] for i in rng.integers(0, 6, size=20)]
    ranks = identity_ranks(samples, labels, protos, names)
    for sample, label, rank in zip(samples, labels, ranks, strict=True):
        cos = [float(sample @ p) / np.linalg.norm(sample) for p in protos]
        order = sorted(names, key=lambda n: -cos[names.index(n)])  # brute force: sort, find the label
        assert rank == order.index(label) + 1
    top1 = identity_fidelity(samples, labels, protos, names)
    assert np.mean(ranks == 1) == pytest.approx(top1)  # fidelity is the share at rank 1
    # a tie with another prototype counts against the sample: [1, 0] is as near to a as to a copy of it
    tied = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert identity_ranks(np.array([[1.0, 0.0]]), ["a"], tied, ["a", "b", "c"]).tolist() == [2]
    with pytest.raises(ValueError, match="without a prototype"):
        identity_ranks(samples[:1], ["nobody"], protos, names)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def test_fid_and_kid_match_closed_forms_with_the_extractor_as_feature_space():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = rng.normal(loc=0.5, scale=1.5, size=(40, 3))
    weight = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0], [0.2, 0.0, 2.0]], dtype=torch.float64)

    class Linear(nn.Module):  # "images" (N, 3, 1, 1) -> features x W^T: a known feature extractor
        def forward(self, images):
            return images.flatten(1).double() @ weight.T

    fx, fy = x @ weight.numpy().T, y @ weight.numpy().T
    as_images = lambda a: torch.tensor(a).view(-1, 3, 1, 1)  # noqa: E731
    out = fid_kid(Linear(), 3, as_images(x), as_images(y), kid_subset_size=1000)

    s1, s2 = np.cov(fx, rowvar=False), np.cov(fy, rowvar=False)
    # Tr sqrt(S1 S2) = Tr sqrt(sqrt(S1) S2 sqrt(S1)) (a symmetric PSD product)
    r1 = _sqrtm_psd(s1)
    fid = ((fx.mean(0) - fy.mean(0)) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(_sqrtm_psd(r1 @ s2 @ r1))
    assert out["fid"] == pytest.approx(fid, rel=1e-4)

    def k(a, b):
        return (a @ b.T / 3 + 1) ** 3

    m = len(fx)  # subset size = every sample: all KID subsets are the same set, so std is 0
    kxx, kyy, kxy = k(fx, fx), k(fy, fy), k(fx, fy)
    mmd = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    assert out["kid_subset_size"] == 40
    assert out["kid"] == pytest.approx(mmd, rel=1e-4)
    # identical subsets: 0 up to float32 rounding of the kernel sums, whose terms are ~ max |k| (not mmd)
    assert out["kid_std"] == pytest.approx(0.0, abs=1e-5 * float(np.abs(kxx).max()))
    same = fid_kid(Linear(), 3, as_images(x), as_images(x), kid_subset_size=1000)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=">= 2 real and >= 2 synthetic"):
        fid_kid(Linear(), 3, as_images(x[:1]), as_images(y))


# ---------------------------------------------------------------------------------- ReID per source
def _source_case():
    # source X = cameras 1,2 (0-based 0,1): the true match is nearest -> AP 1, rank-1 hit
    # source Y = cameras 3,4 (0-based 2,3): an impostor is nearer -> AP 1/2, rank-1 miss
    q_pids, q_cams = [1, 3], [0, 2]
    g_pids, g_cams = [1, 2, 3, 4], [1, 1, 3, 3]
    qf = np.array([[0.0, 0.0], [10.0, 10.0]])
    gf = np.array([[0.1, 0.0], [1.0, 0.0], [10.0, 11.0], [10.0, 10.5]])
    return qf, gf, q_pids, g_pids, q_cams, g_cams


def test_source_metrics_hand_case():
    qf, gf, qp, gp, qc, gc = _source_case()
    out = reid_evaluate_sources(qf, gf, qp, gp, qc, gc, {"X": [1, 2], "Y": [3, 4], "W": [1, 4]})
    assert out["X/mAP"] == pytest.approx(1.0) and out["X/rank1"] == 1.0
    assert out["Y/mAP"] == pytest.approx(0.5) and out["Y/rank1"] == 0.0
    assert "W/mAP" not in out  # cameras 1 + 4: query 0001 has no match there, nothing to rank
    overall = reid_evaluate(qf, gf, qp, gp, qc, gc)
    assert overall["mAP"] == pytest.approx(0.75) and overall["rank1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="source 'Z': no query or gallery image from cameras"):
        reid_evaluate_sources(qf, gf, qp, gp, qc, gc, {"Z": [5, 6]})


def test_reid_metric_adds_per_source_results():
    qf, gf, qp, gp, qc, gc = _source_case()
    metric = ReIDMetric(sources={"X": [1, 2], "Y": [3, 4]})
    features = torch.tensor(np.concatenate([qf, gf]), dtype=torch.float32)
    metric.update(features, torch.tensor(qp + gp), torch.tensor(qc + gc), torch.tensor([1, 1, 0, 0, 0, 0]))
    out = metric.compute()
    assert float(out["X/mAP"]) == pytest.approx(1.0) and float(out["Y/rank1"]) == 0.0
    assert float(out["mAP"]) == pytest.approx(0.75)


def test_selection_precision_hand_case():
    # a (judge-correct) seen 4 kept 3, b (wrong) seen 4 kept 1, c (correct) seen 2 kept 0
    out = selection_precision([4, 4, 2], [3, 1, 0], [True, False, True])
    assert out["kept_share"] == pytest.approx(4 / 10)
    assert out["precision_seen"] == pytest.approx(6 / 10)  # (4 + 2) correct appearances of 10
    assert out["precision_kept"] == pytest.approx(3 / 4)  # 3 correct keeps of 4
    assert out["gain"] == pytest.approx(3 / 4 - 6 / 10)
    assert math.isnan(selection_precision([2], [0], [True])["precision_kept"])
    with pytest.raises(ValueError, match="between 0 and the seen"):
        selection_precision([1], [2], [True])
    with pytest.raises(ValueError, match="differ in length"):
        selection_precision([1, 2], [1], [True])


def test_set_summary_counts_a_set_as_it_is_after_its_near_copies_were_dropped():
    card = {
        "reward_stats": {"sem": {"mean": 0.8}},
        "audit": {"num_images": 40, "num_flagged": 10, "fraction_flagged": 0.25},
    }
    plain = set_summary(card)["audit"]
    assert (plain["num_images"], plain["num_flagged"], plain["fraction_flagged"]) == (40, 10, 0.25)
    assert plain["num_dropped"] == 0 and plain["fraction_dropped"] == 0.0
    card["audit"]["dropped"] = {"count": 10, "moved_to": "rejected"}  # the writer dropped every flag
    dropped = set_summary(card)
    assert dropped["rewards"] == {"sem": 0.8}
    audit = dropped["audit"]
    assert (audit["num_images"], audit["num_flagged"], audit["fraction_flagged"]) == (30, 0, 0.0)
    assert audit["num_dropped"] == 10 and audit["fraction_dropped"] == pytest.approx(10 / 40)
    card["audit"]["dropped"]["count"] = 4  # (a partial drop: 6 of the remaining 36 still flagged)
    audit = set_summary(card)["audit"]
    assert audit["fraction_flagged"] == pytest.approx(6 / 36) and audit["num_images"] == 36
    assert set_summary({})["audit"] is None


def _noise_records(folder, n: int, seed: int) -> list:
    """n random 8x8 RGB images on disk, alternately of identities id0 and id1."""
    from PIL import Image

    from rgsd_lightning.data.records import IdentityRecord

    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
        records.append(IdentityRecord(str(path), f"id{i % 2}"))
    return records


def test_judge_scores_images_in_memory_like_files(tmp_path):
    from rgsd_lightning.evaluation.quality import Judge, load_images

    records = _noise_records(tmp_path, 8, seed=0)
    torch.manual_seed(0)
    extractor = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))
    judge = Judge(extractor, records[:6], 8, 3, kid_subset_size=2)
    fakes = records[4:]
    from_files = judge.score(fakes)
    in_memory = judge.score_images(load_images(fakes, 8, 3), [r.identity for r in fakes])
    assert from_files == in_memory and from_files["num_images"] == 4
    with pytest.raises(ValueError, match="unknown to the judge"):
        judge.score_images(load_images(fakes, 8, 3), ["id0", "id1", "id9", "id0"])
    with pytest.raises(ValueError, match="identity labels"):
        judge.score_images(load_images(fakes, 8, 3), ["id0"])


def test_judge_spread_reference_is_heldout_real_images(tmp_path):
    """With held-out real images of its identities, the syn/real ratio divides by their spread (computed
    here by brute force), their accuracy is reported, and training images / unknown identities among
    them are ignored; without any the reference stays the training images."""
    from rgsd_lightning.data.records import IdentityRecord
    from rgsd_lightning.evaluation.quality import Judge, embed, load_images

    records = _noise_records(tmp_path, 12, seed=1)
    torch.manual_seed(0)
    extractor = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    train, heldout, fakes = records[:4], records[4:8], records[8:]
    stray = IdentityRecord(records[9].path, "id7")  # an identity the judge does not know: ignored
    judge = Judge(extractor, train, 8, 3, kid_subset_size=2, heldout=[*heldout, train[0], stray])

    def spread(recs):
        f = embed(extractor, load_images(recs, 8, 3)).astype(np.float64)
        per_id = []
        for name in ("id0", "id1"):
            g = f[[r.identity == name for r in recs]]
            per_id.append(np.mean([np.linalg.norm(a - b) for j, a in enumerate(g) for b in g[j + 1 :]]))
        return float(np.mean(per_id))

    assert judge.num_heldout == 4 and judge.reference == "heldout"
    assert judge.train_diversity == pytest.approx(spread(train), rel=1e-6)
    assert judge.real_diversity == pytest.approx(spread(heldout), rel=1e-6)
    scores = judge.score(fakes)
    assert scores["diversity_ratio"] == pytest.approx(spread(fakes) / spread(heldout), rel=1e-6)
    assert scores["reference"] == "heldout"
    assert 0.0 <= judge.describe()["heldout_fidelity"] <= 1.0
    plain = Judge(extractor, train, 8, 3, kid_subset_size=2, heldout=[stray, train[1]])
    assert plain.reference == "train" and plain.real_diversity == pytest.approx(spread(train), rel=1e-6)
