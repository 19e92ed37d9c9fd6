"""Rollout chains of the cheaper RL modes: a window of stochastic steps, and a differentiable tail (DRaFT-K).

Both reuse the sampler's CFG rule (:func:`~rgsd_lightning.diffusion.sampling.guided_eps`) and step
function (:func:`~rgsd_lightning.diffusion.sampling.step_with_logprob`), so a windowed rollout's
log-probs are the very Gaussian densities the update recomputes. Per-sample CPU generators (one seed per
trajectory) draw the initial noise and one noise tensor at *every* step, used or not, so a trajectory does
not depend on its batch nor on where its window lies.

* :func:`window_start` / :func:`step_etas`: where a window of ``size`` stochastic steps lies in the
  schedule and the η of every step (the sampler's η inside, 0 = deterministic DDIM outside);
* :func:`sample_windowed`: a recorded rollout with per-step η (log-prob 0 on the deterministic steps);
* :func:`draft_chain`: the whole chain with the last ``k`` steps differentiable, and the ε-MSE to a
  reference policy on those steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from rgsd_lightning.diffusion.sampling import SampleOutput, guided_eps, step_with_logprob
from rgsd_lightning.diffusion.schedule import SIGMA_MIN, make_timesteps, step_sigmas


def stochastic_candidates(
    timesteps: torch.Tensor,
    prev_timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    eta: float,
    method: str,
) -> list[int]:
    """Indices of the steps that draw noise (σ > SIGMA_MIN) at the sampler's η: where windows may lie."""
    sigmas = step_sigmas(timesteps, prev_timesteps, alphas_cumprod, eta, method)
    return [i for i, s in enumerate(sigmas.tolist()) if s > SIGMA_MIN]


def window_region(num_candidates: int, span: tuple[float, float]) -> tuple[int, int]:
    """[lo, hi) of the ``num_candidates`` stochastic steps inside ``span`` (fractions, high noise first)."""
    lo = int(span[0] * num_candidates)
    hi = max(lo + 1, min(num_candidates, int(round(span[1] * num_candidates))))
    return lo, hi


def window_start(
    num_candidates: int,
    size: int,
    *,
    placement: str,
    span: tuple[float, float],
    shift_every: int,
    rollout_index: int,
    generator: torch.Generator,
) -> int:
    """Index (among the stochastic steps) of the first step of this rollout's window.

    ``random``: uniform over the starts that keep the window inside ``span``; ``sliding``: the start moves one
    step every ``shift_every`` rollouts from the beginning of ``span`` and wraps around.
    """
    lo, hi = window_region(num_candidates, span)
    if size > hi - lo:
        raise ValueError(
            f"window.size={size} but window.span={list(span)} holds only {hi - lo} stochastic steps"
        )
    starts = hi - size - lo + 1
    if placement == "random":
        return lo + int(torch.randint(0, starts, (1,), generator=generator))
    if placement == "sliding":
        return lo + (rollout_index // shift_every) % starts
    raise ValueError(f"window placement {placement!r}: expected 'random' or 'sliding'")


def step_etas(num_steps: int, window: Sequence[int], eta: float) -> list[float]:
    """η of every step: ``eta`` on the steps in ``window``, 0 (deterministic DDIM) elsewhere."""
    inside = set(window)
    return [eta if i in inside else 0.0 for i in range(num_steps)]


def _rngs(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _draw(rngs: list[torch.Generator], shape: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in rngs]).to(device)


@torch.no_grad()
def sample_windowed(
    model: Any,
    labels: torch.Tensor,
    *,
    seeds: Sequence[int],
    num_steps: int,
    guidance_scale: float,
    etas: Sequence[float],
    method: str = "ddim",
    clip_x0: bool = False,
    decode: bool = True,
) -> SampleOutput:
    """A recorded rollout whose step i uses η = ``etas[i]`` (``method`` on the steps with η > 0, DDIM else).

    With ``method="ddpm"`` a step with η > 0 draws the posterior noise (its η value is then ignored).

    Returns the trajectory x_T..x_0, the log-prob of every step (0 on deterministic ones) and the images.
    """
    if len(etas) != num_steps:
        raise ValueError(f"{len(etas)} step etas for {num_steps} steps")
    device = model.device
    labels = labels.to(device)
    if len(seeds) != len(labels):
        raise ValueError(f"{len(seeds)} seeds for {len(labels)} labels: give one seed per sample")
    rngs = _rngs(seeds)
    timesteps, prev_timesteps = make_timesteps(model.num_train_timesteps, num_steps)
    alphas = model.alphas_cumprod.to(device)
    shape = tuple(model.latent_shape)
    x = _draw(rngs, shape, device).float()
    states, log_probs = [x], []
    trusted = model.trusted_labels() if hasattr(model, "trusted_labels") else contextlib.nullcontext()
    with trusted:
        for i, (t, t_prev) in enumerate(zip(timesteps.tolist(), prev_timesteps.tolist(), strict=True)):
            eps = guided_eps(model, x, t, labels, guidance_scale=guidance_scale)
            noise = _draw(rngs, shape, device)
            stochastic = etas[i] > 0
            out = step_with_logprob(
                eps,
                x,
                t,
                t_prev,
                alphas,
                eta=float(etas[i]),
                noise=noise,
                method=method if stochastic else "ddim",
                clip_x0=clip_x0,
                compute_log_prob=stochastic,
            )
            x = out.prev_sample
            log_probs.append(out.log_prob)
            states.append(x)
    return SampleOutput(
        images=model.decode(x) if decode else None,
        latents=x,
        trajectory=torch.stack(states, 1),
        log_probs=torch.stack(log_probs, 1),
        timesteps=timesteps,
        prev_timesteps=prev_timesteps,
    )


def decode_with_grad(model: Any, latents: torch.Tensor) -> torch.Tensor:
    """``model.decode`` with gradient: images in [-1, 1] from the transformer's space (VAE or pixels)."""
    if model.vae is None:
        return latents.clamp(-1.0, 1.0)
    vae = model.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.to(vae.dtype) / vae.config.scaling_factor + shift
    return vae.decode(z, return_dict=False)[0].float().clamp(-1.0, 1.0)


def draft_chain(
    model: Any,
    labels: torch.Tensor,
    *,
    seeds: Sequence[int],
    num_steps: int,
    guidance_scale: float,
    eta: float,
    method: str,
    k: int,
    reference: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    use_checkpoint: bool = False,
    clip_x0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_0 of a chain whose last ``k`` steps are differentiable in ``model``'s trainable parameters.

    The first ``num_steps - k`` steps run without gradient; every later step keeps the graph through the
    guided ε (the noise of a stochastic step is fixed: reparameterised). ``reference()`` enters a context
    yielding the reference policy; its ε (no gradient) at the same states gives DPOK's ε-MSE per sample,
    averaged over the k steps (zeros without a reference). Returns (x_0 (B, C, h, w), kl (B,)).
    """
    if not 1 <= k <= num_steps:
        raise ValueError(f"draft.k={k} must lie in [1, sampler.steps={num_steps}]")
    device = model.device
    labels = labels.to(device)
    rngs = _rngs(seeds)
    timesteps, prev_timesteps = make_timesteps(model.num_train_timesteps, num_steps)
    alphas = model.alphas_cumprod.to(device)
    shape = tuple(model.latent_shape)
    x = _draw(rngs, shape, device).float()
    kl = torch.zeros(len(labels), device=device)
    first_grad = num_steps - k

    def eps_of(net: Any, state: torch.Tensor, t: int) -> torch.Tensor:
        return guided_eps(net, state, t, labels, guidance_scale=guidance_scale)

    trusted = model.trusted_labels() if hasattr(model, "trusted_labels") else contextlib.nullcontext()
    with trusted:
        for i, (t, t_prev) in enumerate(zip(timesteps.tolist(), prev_timesteps.tolist(), strict=True)):
            noise = _draw(rngs, shape, device)
            if i < first_grad:
                with torch.no_grad():
                    eps = eps_of(model, x, t)
            else:
                if reference is not None:
                    with torch.no_grad(), reference() as ref:
                        eps_ref = eps_of(ref, x.detach(), t)
                if use_checkpoint:
                    eps = checkpoint(eps_of, model, x, t, use_reentrant=False)
                else:
                    eps = eps_of(model, x, t)
                if reference is not None:
                    kl = kl + (eps - eps_ref).pow(2).flatten(1).mean(1) / k
            x = step_with_logprob(
                eps,
                x,
                t,
                t_prev,
                alphas,
                eta=eta,
                noise=noise,
                method=method,
                clip_x0=clip_x0,
                compute_log_prob=False,
            ).prev_sample
    return x, kl
