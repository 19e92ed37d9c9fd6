"""diffusers' ``DiTPipeline`` with its default settings on any of our generators: the reference of issue 15.

``DiTPipeline`` hard-codes the null (CFG) label as 1000 and needs a VAE. Two thin adapters make it run
unchanged on a :class:`~rgsd_lightning.diffusion.DiTGenerator` with N identities, in latent or pixel mode:

* :class:`NullLabelTransformer` maps label 1000 to the generator's null label N (no other change; the
  transformer and its weights are the generator's own);
* :class:`PixelVAE` is the identity "VAE" of a pixel-mode generator (scaling factor 1).

The scheduler is the one DiT ships with (``facebook/DiT-XL-2-256``: ``DDIMScheduler``, linear betas, no
clipping, ``set_alpha_to_one``, offset 0, "leading" spacing) and the call uses the pipeline's defaults
(50 steps); the guidance scale is the caller's (the recipe's), so both sides guide alike. Per-sample
``torch.Generator`` objects give the pipeline the initial noise our sampler draws from the same seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import DDIMScheduler, DiTPipeline
from torch import nn

PIPELINE_NULL_LABEL = 1000
"""The null label ``DiTPipeline.__call__`` hard-codes."""


class NullLabelTransformer(nn.Module):
    """The generator's transformer with the pipeline's null label 1000 mapped to ours (N).

    Args:
        transformer: the generator's ``DiTTransformer2DModel``.
        null_label: the generator's null label N.
    """

    def __init__(self, transformer: nn.Module, null_label: int) -> None:
        super().__init__()
        self.transformer = transformer
        self.null_label = int(null_label)

    @property
    def config(self) -> Any:
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> Any:
        labels = torch.where(class_labels == PIPELINE_NULL_LABEL, self.null_label, class_labels)
        return self.transformer(hidden_states, timestep=timestep, class_labels=labels)


class _Decoded(SimpleNamespace):
    sample: torch.Tensor


class PixelVAE(nn.Module):
    """Identity decoder with ``scaling_factor`` 1: what ``DiTPipeline`` needs of a VAE in pixel mode."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def decode(self, latents: torch.Tensor) -> _Decoded:
        return _Decoded(sample=latents)


def dit_scheduler(scheduler_config: dict[str, Any]) -> DDIMScheduler:
    """The DDIM scheduler of the DiT release on the generator's betas (diffusers' conversion settings)."""
    return DDIMScheduler(
        **scheduler_config,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def dit_pipeline(gen: Any) -> DiTPipeline:
    """A ``DiTPipeline`` on ``gen``'s own transformer (and VAE, or :class:`PixelVAE` in pixel mode)."""
    vae = gen.vae if gen.vae is not None else PixelVAE().to(gen.device)
    pipe = DiTPipeline(
        transformer=NullLabelTransformer(gen.transformer, gen.null_label),
        vae=vae,
        scheduler=dit_scheduler(gen.scheduler_config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def pipeline_images(
    pipe: DiTPipeline,
    labels: Sequence[int],
    seeds: Sequence[int],
    *,
    guidance_scale: float,
    num_inference_steps: int = 50,
) -> torch.Tensor:
    """Images in [-1, 1] (B, C, H, W) from the pipeline, sample i from ``seeds[i]``'s initial noise."""
    if len(labels) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds for {len(labels)} labels")
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out = pipe(
        [int(y) for y in labels],
        guidance_scale=guidance_scale,
        generator=generators,
        num_inference_steps=num_inference_steps,
        output_type="pt",
    )
    return out.images.float() * 2.0 - 1.0
