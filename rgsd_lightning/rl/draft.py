"""The differentiable objective of the DRaFT-K mode: the composite reward without its batch standardisation.

The paper's total reward ``tanh(Σ λ_i R̃_i)`` standardises each component over the batch (Eq. 10). That
suits a policy gradient (only the ranking within a batch matters) but not a gradient ascent on the reward
itself: the batch mean of a z-score is 0 by construction, so the mean total carries almost no gradient
towards a better batch. DRaFT therefore ascends the raw components with the same weights,

    R_raw = λ_sem · sem_j + λ_cov · R_cov(G_y) + λ_exp · R_exp(G_y)          (per sample j of identity y),

the semantic consistency of the sample plus the *group* values of coverage (Eq. 5) and expansion (Eq. 9)
of its identity's generated set; its batch mean is the objective. Every term is differentiable in the
features, hence (through the frozen reward extractor and the decoder) in the images and the policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

RAW_KEYS = ("sem", "cov_group", "exp_group")
"""The components of the raw composite, in the order of the reward's λ."""


def raw_reward(components: Mapping[str, torch.Tensor], lambdas: Sequence[float]) -> torch.Tensor:
    """Per-sample λ-weighted raw composite (B,) of a reward dict (``sem``, ``cov_group``, ``exp_group``)."""
    missing = [k for k in RAW_KEYS if k not in components]
    if missing:
        raise KeyError(f"the raw composite needs the reward components {missing}")
    if len(lambdas) != len(RAW_KEYS):
        raise ValueError(f"{len(lambdas)} lambdas for the {len(RAW_KEYS)} components {RAW_KEYS}")
    return sum(float(lam) * components[k] for lam, k in zip(lambdas, RAW_KEYS, strict=True))
