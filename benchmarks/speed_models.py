"""Random models shared by the speed measurements (nothing is downloaded), and the autocast switch.

Speed does not depend on the values of the weights; zero-initialised DiT layers get small noise
(:func:`_perturb_`) so outputs, rewards and gradients are not trivially zero.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn


def _perturb_(module: nn.Module, std: float, seed: int) -> None:
    """Add N(0, std²) noise to every parameter (shared parameters once), drawn on the CPU from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=g, dtype=torch.float32)
            param.add_(noise.to(device=param.device, dtype=param.dtype), alpha=std)


def small_vae() -> AutoencoderKL:
    """A small random ``AutoencoderKL`` (2 levels: latents at half the image side, 4 channels)."""
    return _random_vae(block_out_channels=(32, 64), layers_per_block=1)


def sd_vae_shaped() -> AutoencoderKL:
    """A random ``AutoencoderKL`` with the architecture of stabilityai/sd-vae-ft-ema (nothing downloaded)."""
    return _random_vae(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        act_fn="silu",
        sample_size=256,
        scaling_factor=0.18215,
    )


def _random_vae(block_out_channels: tuple[int, ...], layers_per_block: int, **config: Any) -> AutoencoderKL:
    """RGB in and out, 4 latent channels, one down / up block per entry of ``block_out_channels``."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=32,
        **config,
    )


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
