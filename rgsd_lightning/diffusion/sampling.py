"""Our sampler: classifier-free guidance with null label N, DDIM/DDPM steps with Gaussian log-probs.

One CFG rule (:func:`guided_eps`) and one step function (:func:`step_with_logprob`) serve sampling,
log-prob recompute in RL and the KL reference. All Gaussian maths runs in fp32; steps whose σ is ~0
(the DiT DDIM schedule ends at t = 0 -> ᾱ_prev = 1) are deterministic: log-prob 0, no gradient, no NaN.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rgsd_lightning.diffusion.generator import as_labels
from rgsd_lightning.diffusion.schedule import (
    SIGMA_MIN,
    add_noise,
    alpha_bar,
    make_timesteps,
    posterior_variance,
)
from rgsd_lightning.diffusion.solvers import SOLVERS, dpmsolver_timesteps, solve

METHODS = ("ddim", "ddpm", *SOLVERS)
"""Sampler methods of :func:`sample`: the stochastic-capable steps with log-probs, then the fast solvers."""


def check_eta(eta: float) -> float:
    """``eta`` as a float; ValueError unless it is a finite number >= 0 (the DDIM noise scale).

    η = 0 is deterministic DDIM (every step has log-prob 0 by design), η = 1 draws the DDPM posterior noise;
    a negative η has no meaning (σ = η·σ_posterior would be negative).
    """
    value = float(eta)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"eta must be a finite number >= 0 (0 = deterministic DDIM, 1 = ancestral sampling), got {eta}"
        )
    return value


@dataclass
class StepOutput:
    """One reverse step x_t -> x_prev: the sample, its log-density and the Gaussian's parameters (fp32).

    Args:
        prev_sample: x_prev (B, C, h, w), fp32.
        log_prob: log p(x_prev | x_t) per sample (B,), mean or sum over elements; 0 for deterministic steps.
        mean: Gaussian mean (B, C, h, w), differentiable w.r.t. eps.
        std: Gaussian std per sample, shaped (B, 1, 1, 1).
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class SampleOutput:
    """Result of :func:`sample`.

    Args:
        images: decoded images in [-1, 1] (B, channels, H, W), or None when ``decode=False``.
        latents: x_0 in the transformer's space (B, C, h, w), fp32.
        trajectory: states x_T..x_0 (B, T+1, C, h, w), fp32, or None unless recorded.
        log_probs: log p(x_prev | x_t) of every step (B, T), fp32 (0 for deterministic steps).
        timesteps: t of every step (T,).
        prev_timesteps: t_prev of every step (T,); -1 means ᾱ_prev = 1.
    """

    images: torch.Tensor | None
    latents: torch.Tensor
    trajectory: torch.Tensor | None
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor


def guided_eps(
    model: Any,
    x_t: torch.Tensor,
    t: torch.Tensor | int,
    labels: torch.Tensor,
    *,
    guidance_scale: float,
    null_label: int | None = None,
) -> torch.Tensor:
    """Classifier-free guided ε in fp32: u + w (c - u) over all channels, one batched [cond; uncond] pass.

    ``model(x_t, t, labels) -> eps`` (a DiTGenerator); ``t`` scalar or per-sample (B,); the unconditional
    half is skipped when ``guidance_scale == 1``. ``null_label`` defaults to ``model.null_label``.
    """
    if guidance_scale == 1.0:
        return model(x_t, t, labels).float()
    if null_label is None:
        null_label = model.null_label
    batch = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device)
    t = t.expand(batch) if t.ndim == 0 else t
    labels = as_labels(labels, device=x_t.device)
    both = model(
        torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null_label)])
    ).float()
    cond, uncond = both[:batch], both[batch:]
    return uncond + guidance_scale * (cond - uncond)


def step_with_logprob(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor | int,
    t_prev: torch.Tensor | int,
    alphas_cumprod: torch.Tensor,
    *,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    method: str = "ddim",
    clip_x0: bool = False,
    reduction: str = "mean",
    compute_log_prob: bool = True,
) -> StepOutput:
    """One reverse step with the Gaussian log-density of its result, all in fp32.

    DDIM with η: x̂0 = (x_t - √(1-ᾱ_t) ε)/√ᾱ_t, σ = η √((1-ᾱ_s)/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_s),
    μ = √ᾱ_s x̂0 + √(1-ᾱ_s-σ²) ε. ``method="ddpm"`` uses the posterior q(x_s | x_t, x̂0) (mean and β̃;
    equal to DDIM η=1, ``eta`` ignored). ``t``/``t_prev`` are ints or per-sample (B,) tensors (t_prev < 0:
    ᾱ_s = 1). With ``prev_sample`` the log-prob of that (detached) sample is returned and the gradient
    flows through ``mean`` only; otherwise x_prev = μ + σ·noise (``noise`` drawn when None).
    ``reduction``: "mean" (default) or "sum" over the non-batch elements. ``compute_log_prob=False``
    returns zeros instead (deterministic sampling has no use for it).
    """
    if method not in ("ddim", "ddpm"):
        raise ValueError(f"method={method!r}: expected 'ddim' or 'ddpm'")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'sum'")
    eta = check_eta(eta)
    x = x_t.float()
    e = eps.float()
    a_t = alpha_bar(alphas_cumprod, t, x)
    a_s = alpha_bar(alphas_cumprod, t_prev, x)
    x0 = (x - (1.0 - a_t).sqrt() * e) / a_t.sqrt()
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    var = posterior_variance(a_t, a_s)
    if method == "ddim":
        std = eta * var.sqrt()
        mean = a_s.sqrt() * x0 + (1.0 - a_s - std**2).clamp(min=0.0).sqrt() * e
    else:
        std = var.sqrt()
        beta = 1.0 - a_t / a_s
        mean = (a_s.sqrt() * beta * x0 + (a_t / a_s).sqrt() * (1.0 - a_s) * x) / (1.0 - a_t)
    deterministic = std < SIGMA_MIN
    if prev_sample is None:
        if noise is None:
            noise = torch.randn_like(mean)
        prev = mean + torch.where(deterministic, torch.zeros_like(std), std) * noise.to(mean)
        target = prev.detach()
    else:
        prev = prev_sample.detach().float()
        target = prev
    if not compute_log_prob:
        return StepOutput(
            prev_sample=prev, log_prob=torch.zeros(x.shape[0], device=x.device), mean=mean, std=std
        )
    safe_std = torch.where(deterministic, torch.ones_like(std), std)
    elem = -((target - mean) ** 2) / (2.0 * safe_std**2) - safe_std.log() - 0.5 * math.log(2.0 * math.pi)
    dims = tuple(range(1, elem.ndim))
    log_prob = elem.mean(dims) if reduction == "mean" else elem.sum(dims)
    log_prob = torch.where(deterministic.view(-1), torch.zeros_like(log_prob), log_prob)
    return StepOutput(prev_sample=prev, log_prob=log_prob, mean=mean, std=std)


def steps_from_init(num_steps: int, strength: float) -> int:
    """How many of ``num_steps`` grid steps run from an init image: ⌊N·strength⌋ (diffusers' img2img rule).

    ValueError unless 0 < strength <= 1 and at least one step runs.
    """
    value = float(strength)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"strength must be in (0, 1] (1 = start from pure noise), got {strength}")
    run = min(int(num_steps * value), num_steps)
    if run < 1:
        raise ValueError(f"strength={strength} runs no step of {num_steps}: raise strength or steps")
    return run


def _noise(
    shape: tuple[int, ...],
    rngs: list[torch.Generator] | None,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """(B, *shape) standard normal: per-sample CPU generators, one batch generator, or the global RNG."""
    if rngs is not None:
        return torch.stack([torch.randn(shape, generator=g) for g in rngs]).to(device)
    batch = shape[0]
    if generator is not None:
        return torch.randn((batch, *shape[1:]), generator=generator, device=generator.device).to(device)
    return torch.randn((batch, *shape[1:]), device=device)


@torch.no_grad()
def sample(
    model: Any,
    labels: torch.Tensor | Sequence[int],
    *,
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    method: str = "ddim",
    spacing: str = "leading",
    clip_x0: bool = False,
    record_trajectory: bool = False,
    decode: bool = True,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
) -> SampleOutput:
    """Generate images of ``labels`` (identity indices; N = unconditional) with ``model`` (a DiTGenerator).

    ``seeds`` (one int per sample) give sample i its own CPU ``torch.Generator`` for the initial noise and
    every step's noise, so an image does not depend on the batch it is in; otherwise ``generator`` (or the
    global RNG) draws batch noise. Runs on the model's device/dtype; the chain is kept in fp32.

    ``method``: "ddim" (with ``eta``; ``spacing`` of its grid), "ddpm", or "dpmsolver" - DPM-Solver++(2M),
    deterministic (``eta`` must be 0, no log-probs: zeros), on diffusers' "linspace" grid
    (:mod:`rgsd_lightning.diffusion.solvers`), for fast generation at few steps.

    ``init`` (B, C, h, w) in the transformer's space (an encoded image per sample) with ``strength`` < 1
    starts from that image instead of pure noise (SDEdit, diffusers' img2img): only the last
    :func:`steps_from_init` steps of the grid run, from x_t = √ᾱ_t init + √(1-ᾱ_t) ε at the first of them,
    with ε the sample's own initial noise. The returned ``timesteps`` are the steps that ran.
    """
    if seeds is not None and generator is not None:
        raise ValueError("give either `seeds` or `generator`, not both")
    eta = check_eta(eta)
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {list(METHODS)}")
    if method in SOLVERS and eta != 0:
        raise ValueError(f"method={method!r} is deterministic: eta must be 0, got {eta}")
    device = model.device
    labels = as_labels(labels).reshape(-1).to(device)
    model.check_labels(labels)
    batch = labels.shape[0]
    rngs = None
    if seeds is not None:
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for {batch} labels: give one seed per sample")
        rngs = [torch.Generator().manual_seed(int(s)) for s in seeds]
    if method in SOLVERS:
        timesteps, prev_timesteps = dpmsolver_timesteps(model.num_train_timesteps, num_steps)
    else:
        timesteps, prev_timesteps = make_timesteps(model.num_train_timesteps, num_steps, spacing)
    alphas = model.alphas_cumprod.to(device)
    shape = model.latent_shape
    stochastic = method == "ddpm" or eta > 0
    sample_shape = tuple(shape) if rngs is not None else (batch, *shape)

    x = _noise(sample_shape, rngs, generator, device).float()
    if init is not None:
        if tuple(init.shape) != (batch, *shape):
            expected = (batch, *shape)
            raise ValueError(f"init has shape {tuple(init.shape)}, expected {expected} (one per label)")
        start = len(timesteps) - steps_from_init(len(timesteps), strength)
        timesteps, prev_timesteps = timesteps[start:], prev_timesteps[start:]
        x = add_noise(init.to(device).float(), x, int(timesteps[0]), alphas)
    elif strength != 1.0:
        raise ValueError(f"strength={strength} needs init images (strength < 1 starts from them)")
    if method in SOLVERS:  # deterministic: the initial noise is all the randomness
        return _solver_sample(
            model, x, labels, timesteps, prev_timesteps, guidance_scale, clip_x0, record_trajectory, decode
        )
    states = [x] if record_trajectory else None
    log_probs = []
    trusted = model.trusted_labels() if hasattr(model, "trusted_labels") else contextlib.nullcontext()
    with trusted:  # labels were checked once above
        for t, t_prev in zip(timesteps.tolist(), prev_timesteps.tolist(), strict=True):
            eps = guided_eps(model, x, t, labels, guidance_scale=guidance_scale, null_label=model.null_label)
            noise = _noise(sample_shape, rngs, generator, device) if stochastic else torch.zeros_like(x)
            out = step_with_logprob(
                eps,
                x,
                t,
                t_prev,
                alphas,
                eta=eta,
                noise=noise,
                method=method,
                clip_x0=clip_x0,
                compute_log_prob=stochastic,
            )
            x = out.prev_sample
            log_probs.append(out.log_prob)
            if states is not None:
                states.append(x)
    images = model.decode(x) if decode else None
    return SampleOutput(
        images=images,
        latents=x,
        trajectory=torch.stack(states, 1) if states is not None else None,
        log_probs=torch.stack(log_probs, 1),
        timesteps=timesteps,
        prev_timesteps=prev_timesteps,
    )


def _solver_sample(
    model: Any,
    x: torch.Tensor,
    labels: torch.Tensor,
    timesteps: torch.Tensor,
    prev_timesteps: torch.Tensor,
    guidance_scale: float,
    clip_x0: bool,
    record_trajectory: bool,
    decode: bool,
) -> SampleOutput:
    """The fast-solver branch of :func:`sample` (labels checked, initial noise drawn): guided ε, one batched
    forward per step, into :func:`rgsd_lightning.diffusion.solvers.solve`; log-probs are zeros."""

    def eps_fn(x_t: torch.Tensor, t: int) -> torch.Tensor:
        return guided_eps(model, x_t, t, labels, guidance_scale=guidance_scale, null_label=model.null_label)

    states = [x] if record_trajectory else None
    trusted = model.trusted_labels() if hasattr(model, "trusted_labels") else contextlib.nullcontext()
    with trusted:
        x = solve(
            eps_fn,
            x,
            timesteps,
            prev_timesteps,
            model.alphas_cumprod.to(x.device),
            clip_x0=clip_x0,
            on_step=states.append if states is not None else None,
        )
    return SampleOutput(
        images=model.decode(x) if decode else None,
        latents=x,
        trajectory=torch.stack(states, 1) if states is not None else None,
        log_probs=torch.zeros(x.shape[0], len(timesteps), device=x.device),
        timesteps=timesteps,
        prev_timesteps=prev_timesteps,
    )
