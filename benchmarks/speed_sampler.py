"""Measurement 1 of ``benchmarks.speed``: our sampler vs diffusers' ``DiTPipeline``.

Same transformer, VAE, DDIM schedule, step count, guidance scale and initial noise, for the "tiny" and
"small" presets (label space of 1000 + null, where the pipeline's hard-coded null label 1000 is valid;
latent mode with a small random AutoencoderKL decoding on both sides). Images/s, ratio, and the largest
pixel difference of the two outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL

from benchmarks.common import cuda_sync, interleaved_times, md_table, median
from benchmarks.speed_models import _autocast, _perturb_, small_vae


def sampler_models(
    preset: str, vae: AutoencoderKL | None, device: torch.device, seed: int = 0, image_size: int | None = None
) -> tuple[Any, Any]:
    """(our DiTGenerator, a DiTPipeline on the same transformer/VAE with the equivalent DDIMScheduler).

    1000 identity labels, so the pipeline's hard-coded null label 1000 is our null label too. The DDIM
    scheduler (leading spacing, offset 0, ᾱ_prev = 1 at the end, no clipping) is the grid our sampler uses.
    """
    from diffusers import DDIMScheduler, DiTPipeline

    from rgsd_lightning.diffusion import build_dit

    torch.manual_seed(seed)
    gen = build_dit(preset=preset, num_identities=1000, vae=vae, image_size=image_size).to(device).eval()
    _perturb_(gen.transformer, 0.02, seed)
    scheduler = DDIMScheduler(
        **gen.scheduler_config,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = DiTPipeline(transformer=gen.transformer, vae=gen.vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return gen, pipe


def sampler_callables(
    gen: Any,
    pipe: Any,
    *,
    batch: int,
    steps: int,
    guidance_scale: float,
    amp_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> dict[str, Callable[[], torch.Tensor]]:
    """``{"ours", "pipeline"}``: one generation call each, same labels, initial noise, steps and guidance.

    Both return images in [0, 1] (ours are mapped from [-1, 1]) of shape (batch, 3, H, W).
    """
    from rgsd_lightning.diffusion import sample

    device = gen.device
    labels = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(seed)).tolist()

    def ours() -> torch.Tensor:
        with _autocast(device, amp_dtype):
            out = sample(
                gen,
                labels,
                generator=torch.Generator().manual_seed(seed),
                num_steps=steps,
                guidance_scale=guidance_scale,
                eta=0.0,
            )
        return out.images.float() * 0.5 + 0.5

    def pipeline() -> torch.Tensor:
        with _autocast(device, amp_dtype):
            out = pipe(
                labels,
                guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed),
                num_inference_steps=steps,
                output_type="pt",
            )
        return out.images.float()

    return {"ours": ours, "pipeline": pipeline}


def bench_sampler_pair(
    gen: Any,
    pipe: Any,
    *,
    batch: int,
    steps: int,
    guidance_scale: float,
    warmup: int,
    repeats: int,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Time our ``sample`` and the pipeline interleaved (warm-up untimed); images/s, ratio, output check."""
    fns = sampler_callables(
        gen, pipe, batch=batch, steps=steps, guidance_scale=guidance_scale, amp_dtype=amp_dtype
    )
    times, first = interleaved_times(fns, repeats, warmup=warmup, sync=cuda_sync)
    if first["ours"].shape != first["pipeline"].shape:
        raise RuntimeError(
            f"image shapes differ: ours {first['ours'].shape}, pipeline {first['pipeline'].shape}"
        )
    t_ours, t_pipe = median(times["ours"]), median(times["pipeline"])
    return {
        "batch": batch,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "image_shape": list(first["ours"].shape[1:]),
        "ours_s": t_ours,
        "pipeline_s": t_pipe,
        "ours_images_per_s": batch / t_ours,
        "pipeline_images_per_s": batch / t_pipe,
        "ratio_ours_over_pipeline": t_pipe / t_ours,
        "max_abs_pixel_diff": float((first["ours"] - first["pipeline"]).abs().max()),
        "times_s": times,
    }


def _decode_time(gen: Any, batch: int, repeats: int = 3) -> float:
    latents = torch.randn(batch, *gen.latent_shape, device=gen.device)
    times, _ = interleaved_times({"decode": lambda: gen.decode(latents)}, repeats, warmup=1, sync=cuda_sync)
    return median(times["decode"])


def bench_sampler(cfg: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """Measurement 1 at CPU scale: our sampler vs ``DiTPipeline`` for every preset and guidance scale."""
    device = torch.device(device)
    rows = []
    for preset, size in cfg["presets"].items():
        gen, pipe = sampler_models(preset, small_vae(), device)
        decode_s = _decode_time(gen, size["batch"])
        for w in cfg["guidance_scales"]:
            row = bench_sampler_pair(
                gen,
                pipe,
                batch=size["batch"],
                steps=size["steps"],
                guidance_scale=w,
                warmup=cfg["warmup"],
                repeats=cfg["repeats"],
            )
            rows.append({"preset": preset, "decode_s": decode_s, **row})
        del gen, pipe
    return {
        "setup": (
            "same DiTTransformer2DModel (1000 labels + null), same small random AutoencoderKL (latent mode, "
            "decode included on both sides), DDIMScheduler(leading, offset 0, set_alpha_to_one, no clipping) "
            "= our DDIM grid, eta=0, same labels and initial noise (one CPU generator per call)"
        ),
        "rows": rows,
    }


def md_sampler(result: dict[str, Any]) -> str:
    """Markdown of measurement 1."""
    rows = [
        [
            r["preset"],
            "x".join(str(s) for s in r["image_shape"]),
            r["batch"],
            r["steps"],
            r["guidance_scale"],
            f"{r['ours_images_per_s']:.2f}",
            f"{r['pipeline_images_per_s']:.2f}",
            f"**{r['ratio_ours_over_pipeline']:.2f}**",
            f"{r['decode_s']:.3f}",
            f"{r['max_abs_pixel_diff']:.1e}",
        ]
        for r in result["rows"]
    ]
    head = ["preset", "image", "batch", "steps", "w", "ours img/s", "DiTPipeline img/s", "ratio"]
    return (
        "## 1. Sampler vs diffusers DiTPipeline\n\n"
        + f"Setup: {result['setup']}. Ratio = ours / pipeline images/s (target >= 1.0); median of the "
        "interleaved timed calls, warm-up untimed; 'decode' = VAE decode of one batch (shared cost); "
        "'max diff' = largest pixel difference between the two outputs in [0, 1].\n\n"
        + md_table(head + ["decode s", "max diff"], rows)
    )


def bench_fast_pair(
    gen: Any,
    pipe: Any,
    *,
    batch: int,
    steps: int,
    fast: dict[str, Any],
    guidance_scale: float,
    warmup: int,
    repeats: int,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """``DiTPipeline`` at ``steps`` (its default 50) vs our fast setting (``fast``: ``method``, ``steps``),
    interleaved on the same model, labels and initial noise: images/s and their ratio.

    The quality side of this pair is measured on a trained model by ``benchmarks.fast_sampling``; here it is
    the speed at paper scale.
    """
    from rgsd_lightning.diffusion import sample

    fns = sampler_callables(
        gen, pipe, batch=batch, steps=steps, guidance_scale=guidance_scale, amp_dtype=amp_dtype
    )
    labels = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(0)).tolist()

    def ours_fast() -> torch.Tensor:
        with _autocast(gen.device, amp_dtype):
            out = sample(
                gen,
                labels,
                generator=torch.Generator().manual_seed(0),
                num_steps=int(fast["steps"]),
                guidance_scale=guidance_scale,
                method=str(fast["method"]),
            )
        return out.images.float() * 0.5 + 0.5

    calls = {"pipeline": fns["pipeline"], "ours_fast": ours_fast}
    times, first = interleaved_times(calls, repeats, warmup=warmup, sync=cuda_sync)
    t_pipe, t_fast = median(times["pipeline"]), median(times["ours_fast"])
    return {
        "batch": batch,
        "guidance_scale": guidance_scale,
        "pipeline_steps": steps,
        "fast_method": str(fast["method"]),
        "fast_steps": int(fast["steps"]),
        "pipeline_images_per_s": batch / t_pipe,
        "fast_images_per_s": batch / t_fast,
        "ratio_fast_over_pipeline": t_pipe / t_fast,
        "image_shape": list(first["ours_fast"].shape[1:]),
        "times_s": times,
    }
