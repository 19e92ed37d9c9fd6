"""Diversity statistics of generated vs real features: hand-worked cases on the unit circle."""

from __future__ import annotations

import math

import pytest
import torch

from rgsd_lightning.rewards.diversity import knn_precision_coverage, mean_pairwise_distance, spread_ratio


def _circle(degrees: list[float]) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], 1)


def _chord(degrees: float) -> float:
    return 2 * math.sin(math.radians(degrees) / 2)


# identity 0: real at 0, 60, 180 degrees; samples at 10 and 20 (collapsed near the first real image)
# identity 1: real at 0 and 90; samples at 190 and 200 (far from both real images)
# identity 2: only in the bank (not generated): ignored
REAL = _circle([0, 60, 180, 0, 90, 45, 135])
REAL_IDS = torch.tensor([0, 0, 0, 1, 1, 2, 2])
GEN = _circle([10, 20, 190, 200])
GEN_IDS = torch.tensor([0, 0, 1, 1])


def test_spread_ratio_hand_case():
    real0 = (_chord(60) + _chord(120) + _chord(180)) / 3
    real1 = _chord(90)
    gen = _chord(10)  # both identities' sample pairs are 10 degrees apart
    expected = gen / ((real0 + real1) / 2)
    assert spread_ratio(GEN, GEN_IDS, REAL, REAL_IDS) == pytest.approx(expected, rel=1e-12)
    assert mean_pairwise_distance(REAL[:3]) == pytest.approx(real0, rel=1e-12)
    # copies of the real images vary exactly as much as the real images
    assert spread_ratio(REAL, REAL_IDS, REAL, REAL_IDS) == pytest.approx(1.0, rel=1e-12)
    # features are normalised first: scaling a sample does not change anything
    assert spread_ratio(GEN * 5, GEN_IDS, REAL, REAL_IDS) == pytest.approx(expected, rel=1e-12)


def test_knn_precision_coverage_hand_case():
    # k = 1: radii of identity 0 are 60 deg (0 and 60) and 120 deg (180); of identity 1: 90 deg.
    # id 0: both samples lie within the balls of 0 and 60 but not of 180 -> precision 1, coverage 2/3;
    # id 1: samples at 190/200 are > 90 deg from 0 and 90 -> precision 0, coverage 0.
    out = knn_precision_coverage(GEN, GEN_IDS, REAL, REAL_IDS, k=1)
    assert out["precision"] == pytest.approx(0.5)
    assert out["coverage"] == pytest.approx((2 / 3 + 0) / 2)
    # k = 2: identity 0's radii grow to 180/120/180 deg: every real image is covered (sample at 10 deg is
    # 170 deg from 180); identity 1 keeps k = 1 (only two real images)
    out = knn_precision_coverage(GEN, GEN_IDS, REAL, REAL_IDS, k=2)
    assert out == pytest.approx({"precision": 0.5, "coverage": 0.5})
    # the real set itself: everything covered, everything precise
    assert knn_precision_coverage(REAL, REAL_IDS, REAL, REAL_IDS, k=1) == pytest.approx(
        {"precision": 1.0, "coverage": 1.0}
    )


def test_identities_without_enough_real_images_are_skipped():
    real, ids = _circle([0, 30]), torch.tensor([0, 1])  # one real image each: no radius, no spread
    assert math.isnan(knn_precision_coverage(GEN[:2], GEN_IDS[:2], real, ids)["coverage"])
    assert math.isnan(spread_ratio(GEN[:2], GEN_IDS[:2], real, ids))
    with pytest.raises(ValueError, match="k must be"):
        knn_precision_coverage(GEN, GEN_IDS, REAL, REAL_IDS, k=0)
    with pytest.raises(ValueError, match="same D"):
        spread_ratio(GEN, GEN_IDS, torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))
