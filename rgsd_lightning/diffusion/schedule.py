"""Noise-schedule helpers on top of a diffusers ``DDPMScheduler`` config.

The cumulative products ``alphas_cumprod`` always come from diffusers (no hand-written beta table), the
timestep grids reproduce ``DDIMScheduler.set_timesteps`` and the training loss is the ε-MSE of DiT.
A previous timestep ``< 0`` means "past the end of the chain": ``alpha_prev = 1`` (diffusers'
``set_alpha_to_one=True``, the setting of the DiT scheduler).

The one copy of the step maths used by the forward process, the sampler and RL: :func:`alpha_bar` (ᾱ_t per
sample), :func:`posterior_variance` (β̃ of a step t -> s) and :func:`step_sigmas` (σ of every step of a
grid, which tells RL which steps are stochastic).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
}
"""The DiT training schedule: 1000 steps, linear betas 1e-4..0.02, ε-prediction."""

_BETA_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
"""diffusers beta schedules a model built from scratch may use (``squaredcos_cap_v2``: the cosine schedule
of Nichol & Dhariwal 2021, suited to small pixel-space models; a pretrained DiT keeps its own linear one)."""


def clean_scheduler_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """Keep the keys of a (DDPM/DDIM) scheduler config that define the betas; defaults fill the rest.

    Raises ValueError for a scheduler that does not predict ε (the only parameterisation we support).
    """
    config = dict(config or {})
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"scheduler prediction_type={prediction!r}: only 'epsilon' models are supported")
    known = set(inspect.signature(DDPMScheduler.__init__).parameters)
    out = dict(DEFAULT_SCHEDULER_CONFIG)
    for key in _BETA_KEYS:
        if key in config and key in known:
            out[key] = config[key]
    if out.get("trained_betas") is None:
        out.pop("trained_betas", None)
    return out


def alphas_cumprod(scheduler_config: dict[str, Any] | None = None) -> torch.Tensor:
    """ᾱ_t for t = 0..T-1 (fp32, CPU), exactly as diffusers' ``DDPMScheduler`` computes them."""
    scheduler = DDPMScheduler(**clean_scheduler_config(scheduler_config))
    return scheduler.alphas_cumprod.to(torch.float32).clone()


SIGMA_MIN = 1e-6
"""Steps with σ below this are deterministic (log-prob 0, no policy gradient)."""


def alpha_bar(
    alphas_cumprod: torch.Tensor,
    t: torch.Tensor | int,
    like: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ᾱ_t per sample, shaped (B, 1, ..., 1) to broadcast against ``like`` (B, ...); t < 0 gives 1.

    Args:
        alphas_cumprod: ᾱ for t = 0..T-1.
        t: one timestep for the whole batch (int or 0-d tensor) or one per sample (B,); t < 0 means past the
            end of the chain (ᾱ = 1).
        like: a tensor whose batch size, rank and device the result follows.
        dtype: dtype of the result (fp32 for the sampler's maths).
    """
    if isinstance(t, int):  # one timestep for the whole batch (the sampling loop): a broadcast view
        if t >= 0:
            value = alphas_cumprod[t].to(device=like.device, dtype=dtype)
        else:
            value = torch.ones((), device=like.device, dtype=dtype)
        return value.expand(like.shape[0], *([1] * (like.ndim - 1)))
    t = torch.as_tensor(t, device=like.device, dtype=torch.long)
    t = t.expand(like.shape[0]) if t.ndim == 0 else t
    values = alphas_cumprod.to(device=like.device, dtype=dtype)
    out = torch.where(t >= 0, values[t.clamp(min=0)], torch.ones((), device=like.device, dtype=dtype))
    return out.view(-1, *([1] * (like.ndim - 1)))


def posterior_variance(a_t: torch.Tensor, a_s: torch.Tensor) -> torch.Tensor:
    """β̃ = (1-ᾱ_s)/(1-ᾱ_t) · (1-ᾱ_t/ᾱ_s) of a step t -> s, clamped at 0.

    The variance of the DDPM posterior q(x_s | x_t, x_0), and of a DDIM step divided by η².
    """
    return ((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)).clamp(min=0.0)


def step_sigmas(
    timesteps: torch.Tensor,
    prev_timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    eta: float,
    method: str = "ddim",
) -> torch.Tensor:
    """σ of every step of a grid (T,), float64 on CPU: η √β̃ for "ddim", √β̃ for "ddpm".

    A step with σ <= :data:`SIGMA_MIN` is deterministic: t_prev < 0 means ᾱ_s = 1, which makes the last step
    of the DiT "leading" schedule (t = 0) deterministic.
    """
    a = alphas_cumprod.detach().double().cpu()
    like = torch.empty(len(timesteps), dtype=torch.float64)
    a_t = alpha_bar(a, timesteps.long().cpu(), like, dtype=torch.float64)
    a_s = alpha_bar(a, prev_timesteps.long().cpu(), like, dtype=torch.float64)
    scale = 1.0 if method == "ddpm" else eta
    return scale * posterior_variance(a_t, a_s).sqrt()


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Forward process q(x_t | x_0): √ᾱ_t x_0 + √(1-ᾱ_t) ε (fp32 maths, returned in x0's dtype)."""
    a = alpha_bar(alphas_cumprod, t, x0)
    x_t = a.sqrt() * x0.float() + (1.0 - a).sqrt() * noise.float()
    return x_t.to(x0.dtype)


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) at the timesteps ``t`` (fp32, shaped like ``t``)."""
    a = alphas_cumprod.to(torch.float32)[torch.as_tensor(t, dtype=torch.long, device=alphas_cumprod.device)]
    return a / (1.0 - a)


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor | int, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights of the ε-MSE (Hang et al. 2023): min(SNR_t, γ) / SNR_t (fp32, shaped like ``t``).

    The ε-loss of a timestep is the x0-loss times SNR_t; capping that factor at γ keeps the nearly noise-free
    timesteps (huge SNR, trivial ε) from dominating the gradient. The weight is 1 where SNR_t <= γ, also
    where SNR_t = 0 (ᾱ = 0 at the end of a cosine schedule). ValueError unless γ > 0.
    """
    if not gamma > 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
    s = snr(alphas_cumprod, t)
    return torch.where(s > gamma, gamma / s.clamp(min=1e-20), torch.ones_like(s))


def make_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str = "leading", *, steps_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling grid (timesteps, prev_timesteps), both LongTensor (num_steps,), high noise first.

    ``timesteps`` equal diffusers' ``DDIMScheduler.set_timesteps`` for ``spacing`` "leading" (with
    ``steps_offset``) and "trailing". ``prev_timesteps[i]`` is the next entry of the grid and -1 after the
    last one (ᾱ_prev = 1). Whenever ``num_train_timesteps`` is a multiple of ``num_steps`` (and always for
    "leading") this equals diffusers' ``t - num_train_timesteps // num_steps``.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} must lie in [1, num_train_timesteps={num_train_timesteps}]")
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        timesteps = torch.arange(num_steps - 1, -1, -1, dtype=torch.long) * ratio + steps_offset
        prev = timesteps - ratio
    elif spacing == "trailing":
        if steps_offset:
            raise ValueError("steps_offset is only used with spacing='leading'")
        ratio = num_train_timesteps / num_steps
        grid = torch.arange(num_train_timesteps, 0, -ratio, dtype=torch.float64)
        timesteps = torch.round(grid).to(torch.long) - 1
        prev = torch.cat([timesteps[1:], torch.tensor([-1], dtype=torch.long)])
    else:
        raise ValueError(f"spacing={spacing!r}: expected 'leading' or 'trailing'")
    if int(timesteps.max()) >= num_train_timesteps:
        raise ValueError(f"steps_offset={steps_offset} pushes timesteps past num_train_timesteps")
    return timesteps, prev.clamp(min=-1)


def denoising_loss(
    generator: Any,
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    generator_rng: torch.Generator | None = None,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """ε-MSE of DiT: mean over all elements of (ε̂(x_t, t, y) - ε)², optionally min-SNR-γ weighted.

    ``generator`` is a :class:`~rgsd_lightning.diffusion.generator.DiTGenerator` (anything with
    ``alphas_cumprod``, ``num_train_timesteps`` and ``__call__(x_t, t, labels) -> eps``); ``x0`` is already
    in the transformer's space (latents when a VAE is used). ``timesteps`` are drawn uniformly from
    [0, T) and ``noise`` from N(0, I) with ``generator_rng`` when not given. With ``min_snr_gamma`` each
    sample's mean squared error is weighted by :func:`min_snr_weights` before the batch mean. Returns a
    scalar fp32 tensor.
    """
    batch = x0.shape[0]
    rng_device = generator_rng.device if generator_rng is not None else x0.device
    if timesteps is None:
        timesteps = torch.randint(
            0, generator.num_train_timesteps, (batch,), generator=generator_rng, device=rng_device
        )
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator_rng, device=rng_device, dtype=torch.float32)
    timesteps = timesteps.to(x0.device)
    noise = noise.to(x0.device)
    x_t = add_noise(x0, noise, timesteps, generator.alphas_cumprod)
    eps = generator(x_t, timesteps, labels)
    if min_snr_gamma is None:
        return F.mse_loss(eps.float(), noise.float())
    per_sample = (eps.float() - noise.float()).pow(2).flatten(1).mean(1)
    weights = min_snr_weights(generator.alphas_cumprod.to(per_sample.device), timesteps, min_snr_gamma)
    return (weights * per_sample).mean()
