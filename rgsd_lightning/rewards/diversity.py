"""Diversity of generated features against the real bank, per identity: spread ratio, precision, coverage.

Pure functions (no gradient) used to make collapse and noise visible during RL, in the reward extractor's
feature space. Features are L2-normalised first (as the reward does). Only identities present in the
generated batch count, and every statistic is the unweighted mean over those identities.

* **spread** of a set: the mean pairwise Euclidean distance of its features (the judge's intra-identity
  distance, :func:`rgsd_lightning.evaluation.quality.intra_identity_distance`, in another space).
  :func:`spread_ratio` = mean over identities of the generated spread / the same mean of the real spread:
  about 1 when the samples vary as much as the real images, -> 0 when they collapse to copies, >> 1 noise.
* **k-NN precision and coverage** (Kynkäänniemi et al. 2019, "Improved precision and recall"; Naeem et al.
  2020, "Reliable fidelity and diversity metrics"): each real feature r_i of identity y gets the radius
  ρ_i = distance to its k-th nearest *other* real feature of y (k clipped to n_y - 1). Then

  - precision_y = share of the generated features of y that lie within some real ball,
    ``∃ i: ‖g_j - r_i‖ <= ρ_i`` (how much of the output looks like real data: drops with noise);
  - coverage_y = share of the real features of y whose ball holds at least one generated feature of y,
    ``min_j ‖g_j - r_i‖ <= ρ_i`` (how much of the real data the output reaches: drops with collapse).

  An identity with fewer than two real features has no radius and is skipped; with none left the
  value is NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rgsd_lightning.rewards.functional import l2_normalize

DEFAULT_K = 3
"""k of the k-NN radii (the papers use 3-5; the toy bank has about 3 real images per identity)."""


def _groups(
    features: Tensor, identities: Tensor, bank_features: Tensor, bank_identities: Tensor
) -> list[tuple[Tensor, Tensor]]:
    """(generated rows, real rows) of every identity in ``identities``, normalised, float64, no grad."""
    if features.ndim != 2 or bank_features.ndim != 2 or features.shape[1] != bank_features.shape[1]:
        raise ValueError(
            f"features {tuple(features.shape)} and bank features {tuple(bank_features.shape)} must be "
            "(rows, D) with the same D"
        )
    if identities.shape != features.shape[:1] or bank_identities.shape != bank_features.shape[:1]:
        raise ValueError("one identity per feature row is needed (generated and bank)")
    g = l2_normalize(features.detach().double())
    r = l2_normalize(bank_features.detach().double().to(g.device))
    ids, bank_ids = identities.to(g.device).long(), bank_identities.to(g.device).long()
    return [(g[ids == y], r[bank_ids == y]) for y in torch.unique(ids).tolist()]


def mean_pairwise_distance(x: Tensor) -> float | None:
    """Mean Euclidean distance over the pairs of rows of ``x``; None with fewer than two rows."""
    n = x.shape[0]
    if n < 2:
        return None
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    iu = torch.triu_indices(n, n, offset=1, device=x.device)
    return float(d[iu[0], iu[1]].mean())


@torch.no_grad()
def spread_ratio(
    features: Tensor, identities: Tensor, bank_features: Tensor, bank_identities: Tensor
) -> float:
    """Mean generated spread / mean real spread over the identities with >= 2 generated and >= 2 real rows.

    Args:
        features: (B, D) generated features.
        identities: (B,) identity of each generated row.
        bank_features: (M, D) real features.
        bank_identities: (M,) identity of each real row.

    Returns:
        The ratio, or NaN when no identity qualifies (or the real spread is 0).
    """
    gen, real = [], []
    for g, r in _groups(features, identities, bank_features, bank_identities):
        dg, dr = mean_pairwise_distance(g), mean_pairwise_distance(r)
        if dg is not None and dr is not None:
            gen.append(dg)
            real.append(dr)
    if not real or sum(real) <= 0:
        return math.nan
    return (sum(gen) / len(gen)) / (sum(real) / len(real))


@torch.no_grad()
def knn_precision_coverage(
    features: Tensor,
    identities: Tensor,
    bank_features: Tensor,
    bank_identities: Tensor,
    k: int = DEFAULT_K,
) -> dict[str, float]:
    """Per-identity k-NN precision and coverage of generated features against the real bank (see module).

    Args:
        features: (B, D) generated features.
        identities: (B,) identity of each generated row.
        bank_features: (M, D) real features.
        bank_identities: (M,) identity of each real row.
        k: neighbour rank of the real radii (clipped to n_y - 1 per identity).

    Returns:
        ``{"precision": p, "coverage": c}``, means over the identities with >= 2 real rows (NaN if none).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    precision, coverage = [], []
    for g, r in _groups(features, identities, bank_features, bank_identities):
        n = r.shape[0]
        if n < 2 or g.shape[0] == 0:
            continue
        rr = torch.cdist(r, r, compute_mode="donot_use_mm_for_euclid_dist")
        rr.fill_diagonal_(math.inf)  # a real feature is not its own neighbour
        radius = rr.sort(dim=1).values[:, min(k, n - 1) - 1]  # (n,)
        inside = torch.cdist(g, r, compute_mode="donot_use_mm_for_euclid_dist") <= radius.unsqueeze(0)
        precision.append(float(inside.any(dim=1).double().mean()))
        coverage.append(float(inside.any(dim=0).double().mean()))
    if not precision:
        return {"precision": math.nan, "coverage": math.nan}
    return {"precision": sum(precision) / len(precision), "coverage": sum(coverage) / len(coverage)}
