"""Fast deterministic solvers for generation: DPM-Solver++ (multistep, order 1 or 2) on the model's own ᾱ.

DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095) integrates the probability-flow ODE in the data prediction
x̂0 = (x_t - σ_t ε̂)/α_t, with α_t = √ᾱ_t, σ_t = √(1-ᾱ_t) and λ_t = log(α_t/σ_t). A step t -> s with
h = λ_s - λ_t is

* first order:  x_s = (σ_s/σ_t) x_t - α_s (e^{-h} - 1) x̂0_t          (equal to DDIM with η = 0);
* second order (multistep, midpoint): with the previous data prediction x̂0_r at r (h_0 = λ_t - λ_r,
  r_0 = h_0/h), D1 = (x̂0_t - x̂0_r)/r_0 and x_s = (σ_s/σ_t) x_t - α_s (e^{-h} - 1)(x̂0_t + D1/2).

These are the update rules and defaults of diffusers' ``DPMSolverMultistepScheduler`` (``dpmsolver++``,
``midpoint``, ``final_sigmas_type="zero"``, ``lower_order_final``; ``tests/test_solvers.py`` drives that
scheduler step by step on the same model and noise): the first step is first order (no history), the step
onto ᾱ = 1 (t_prev < 0, σ = 0) is first order, and ``clip_x0`` equals its ``thresholding`` with
``sample_max_value=1``. The grid is the scheduler's default "linspace" one (:func:`dpmsolver_timesteps`).

Everything is a pure function of a state, an ε function and ᾱ, so a caller may run the solver over any
descending part of a grid - e.g. the deterministic stretch outside the trained window of a windowed RL mode
(:func:`solve` from x at ``timesteps[0]`` to ``prev_timesteps[-1]``). The coefficients are computed in
float64 and applied in fp32; the chain is kept in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SOLVERS = ("dpmsolver",)
"""Sampler methods served by this module (deterministic, no log-probs)."""

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]
"""``eps_fn(x_t, t) -> ε̂`` (fp32, the guided noise prediction at integer timestep t)."""


def dpmsolver_timesteps(num_train_timesteps: int, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of diffusers' ``DPMSolverMultistepScheduler.set_timesteps`` (default "linspace" spacing).

    ``timesteps`` = round(linspace(0, T-1, N+1)) reversed without its last entry (high noise first, from
    T-1); ``prev_timesteps[i]`` is the next entry and -1 after the last one (ᾱ = 1, σ = 0). Both LongTensor
    (N,); ValueError unless 1 <= N < T (the entries are then distinct).
    """
    if not 1 <= num_steps < num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps}: DPM-Solver needs 1 <= steps < num_train_timesteps={num_train_timesteps}"
        )
    grid = torch.linspace(0, num_train_timesteps - 1, num_steps + 1, dtype=torch.float64).round().long()
    timesteps = grid.flip(0)[:-1].clone()
    prev = torch.cat([timesteps[1:], torch.tensor([-1], dtype=torch.long)])
    return timesteps, prev


def _alpha_sigma_lambda(alphas_cumprod: torch.Tensor, t: int) -> tuple[float, float, float]:
    """(α_t, σ_t, λ_t) in float64 for an integer timestep; t < 0 means ᾱ = 1 (σ = 0, λ = +inf)."""
    if t < 0:
        return 1.0, 0.0, math.inf
    a = float(alphas_cumprod[t].double())
    alpha, sigma = math.sqrt(a), math.sqrt(1.0 - a)
    return alpha, sigma, math.log(alpha) - math.log(sigma)


def data_prediction(
    eps: torch.Tensor, x_t: torch.Tensor, t: int, alphas_cumprod: torch.Tensor, clip_x0: bool = False
) -> torch.Tensor:
    """x̂0 = (x_t - σ_t ε̂)/α_t in fp32, clipped to [-1, 1] with ``clip_x0``."""
    alpha, sigma, _ = _alpha_sigma_lambda(alphas_cumprod, t)
    x0 = (x_t.float() - sigma * eps.float()) / alpha
    return x0.clamp(-1.0, 1.0) if clip_x0 else x0


def dpmsolver_step(
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: int,
    t_prev: int,
    alphas_cumprod: torch.Tensor,
    *,
    history: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """One DPM-Solver++ step x_t -> x_{t_prev} (fp32) from the data prediction ``x0`` at t.

    First order without ``history`` or when ``t_prev < 0`` (the step onto ᾱ = 1 returns ``x0``); else the
    second-order multistep update with ``history = (x̂0_r, r)``, the previous step's data prediction and its
    timestep r > t.
    """
    _, sigma_t, lam_t = _alpha_sigma_lambda(alphas_cumprod, t)
    alpha_s, sigma_s, lam_s = _alpha_sigma_lambda(alphas_cumprod, t_prev)
    x = x_t.float()
    if t_prev < 0:  # σ_s = 0, h = inf: x_s = α_s x̂0 with α_s = 1
        return x0.float().clone()
    h = lam_s - lam_t
    coef = -alpha_s * math.expm1(-h)  # -α_s (e^{-h} - 1) > 0
    if history is None:
        return (sigma_s / sigma_t) * x + coef * x0
    prev_x0, r = history
    _, _, lam_r = _alpha_sigma_lambda(alphas_cumprod, r)
    r0 = (lam_t - lam_r) / h
    d1 = (x0 - prev_x0.float()) / r0
    return (sigma_s / sigma_t) * x + coef * (x0 + 0.5 * d1)


def solve(
    eps_fn: EpsFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    prev_timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    order: int = 2,
    clip_x0: bool = False,
    on_step: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate the probability-flow ODE (DPM-Solver++) from x at ``timesteps[0]`` to ``prev_timesteps[-1]``.

    Args:
        eps_fn: ``eps_fn(x_t, t) -> ε̂`` (e.g. classifier-free guided, one batched forward per step).
        x: the state at ``timesteps[0]`` (B, ...).
        timesteps: the steps' timesteps, descending (any part of a grid).
        prev_timesteps: each step's target timestep (-1: ᾱ = 1, the clean sample).
        alphas_cumprod: ᾱ of the model's training schedule.
        order: 1 (= DDIM η=0) or 2 (multistep; the first step and the step onto ᾱ = 1 are first order).
        clip_x0: clip every data prediction to [-1, 1].
        on_step: called with the state after every step (e.g. to record a trajectory).

    Returns:
        The state at ``prev_timesteps[-1]``, fp32.
    """
    if order not in (1, 2):
        raise ValueError(f"order={order}: DPM-Solver++ here is of order 1 or 2")
    steps = list(zip(timesteps.tolist(), prev_timesteps.tolist(), strict=True))
    for (t, t_prev), (t_next, _) in zip(steps, steps[1:], strict=False):
        if t_prev != t_next:
            raise ValueError(f"prev_timesteps must chain into timesteps: step {t} -> {t_prev}, next {t_next}")
    if any(t <= t_prev for t, t_prev in steps):
        raise ValueError("timesteps must descend: every step goes from t to a smaller t_prev")
    x = x.float()
    history: tuple[torch.Tensor, int] | None = None
    for t, t_prev in steps:
        x0 = data_prediction(eps_fn(x, t), x, t, alphas_cumprod, clip_x0)
        x = dpmsolver_step(x, x0, t, t_prev, alphas_cumprod, history=history if order == 2 else None)
        history = (x0, t)
        if on_step is not None:
            on_step(x)
    return x
