"""The KL-regularised policy-gradient objective of DPOK (Fan et al. 2023), as pure functions.

Per transition i (x_t -> x_prev of a trajectory with reward r_i):

    L_i = -α · A_i · clamp(ρ_i, 1 - c, 1 + c) + β · KL_i,    ρ_i = exp(log p_θ(x_prev|x_t) - log p_old),

A_i = r_i - V(x_t) (value baseline) or r_i. The clamp (DPOK's, not PPO's min/max) passes the
gradient only while ρ stays within [1 - c, 1 + c]. KL_i is either DPOK's unweighted ε-MSE between the
guided noise predictions of the policy and the reference, or the exact KL between the two Gaussian
transition kernels, ‖μ_θ - μ_ref‖² / (2σ_t²) (element mean), which weights late steps more.
"""

from __future__ import annotations

import torch


def policy_gradient_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantage: torch.Tensor,
    *,
    reward_weight: float,
    ratio_clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-transition −α · A · clamp(ρ, 1−c, 1+c); returns the loss (n,) and ratio diagnostics."""
    ratio = torch.exp(log_prob - old_log_prob)
    clipped = torch.clamp(ratio, 1.0 - ratio_clip, 1.0 + ratio_clip)
    loss = -reward_weight * advantage.detach() * clipped
    stats = {
        "ratio_mean": ratio.detach().mean(),
        "ratio_max_dev": (ratio.detach() - 1).abs().max(),
        "clip_frac": ((ratio.detach() - 1).abs() > ratio_clip).float().mean(),
    }
    return loss, stats


def dpok_kl(eps_policy: torch.Tensor, eps_reference: torch.Tensor) -> torch.Tensor:
    """DPOK's KL surrogate: mean over elements of (ε̂_θ − ε̂_ref)² per transition (n,)."""
    return (eps_policy.float() - eps_reference.float().detach()).pow(2).flatten(1).mean(1)


def exact_gaussian_kl(
    mean_policy: torch.Tensor, mean_reference: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """KL(N(μ_θ, σ²) ‖ N(μ_ref, σ²)) per element, averaged over elements (n,); 0 where σ is 0."""
    var = std.float().pow(2).flatten(1)[:, :1]
    sq = (mean_policy.float() - mean_reference.float().detach()).pow(2).flatten(1)
    kl = sq / (2 * var.clamp_min(1e-12))
    return torch.where(var > 1e-12, kl, torch.zeros_like(kl)).mean(1)
