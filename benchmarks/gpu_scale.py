"""The paper-scale measurements of ``benchmarks.speed --gpu-scale`` (what ``benchmarks/gpu.sh`` runs).

Sampler vs DiTPipeline, a recognizer training step and a RewardDPOK round on one CUDA GPU under bf16
autocast: images/s, peak memory and model-FLOP utilisation. The runner and the sizes are in
``benchmarks.speed``.
"""

from __future__ import annotations

import math
import tempfile
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn

from benchmarks.common import cuda_sync, interleaved_times, make_meter, md_table, median, mib
from benchmarks.speed_dpok import bench_dpok_preset, build_dpok, make_generator_export, md_dpok
from benchmarks.speed_models import _autocast, sd_vae_shaped, small_vae
from benchmarks.speed_sampler import bench_fast_pair, bench_sampler_pair, sampler_callables, sampler_models

DIT_XL2_GMACS = 119.0
"""DiT-XL/2 at 256²: the DiT paper's "119 Gflops" per forward, counted as multiply-accumulates (fvcore)."""


def _make_vae(kind: str | None) -> AutoencoderKL | None:
    return {"sd": sd_vae_shaped, "small": small_vae, None: lambda: None}[kind]()


def forward_flops(gen: Any, amp_dtype: torch.dtype | None) -> int:
    """FLOPs of one transformer forward of one sample (``torch.utils.flop_counter``; 2 FLOPs per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = gen.device
    x = torch.randn(1, *gen.latent_shape, device=device)
    t, y = torch.tensor([500], device=device), torch.tensor([0], device=device)
    with torch.no_grad(), _autocast(device, amp_dtype), FlopCounterMode(display=False) as counter:
        gen(x, t, y)
    return int(counter.get_total_flops())


def _attention_processors(gen: Any) -> list[str]:
    return sorted({type(m.processor).__name__ for m in gen.transformer.modules() if hasattr(m, "processor")})


def _mfu(flops: float | None, per_second: float, peak_tflops: float) -> float | None:
    return None if flops is None else flops * per_second / (peak_tflops * 1e12)


def gpu_sampler(
    cfg: dict[str, Any], device: torch.device, amp: torch.dtype | None, peak_tflops: float
) -> dict:
    """Our sampler vs DiTPipeline at paper scale: images/s, peak memory, model-FLOP utilisation."""
    gen, pipe = sampler_models(cfg["preset"], _make_vae(cfg["vae"]), device, image_size=cfg["image_size"])
    counted = forward_flops(gen, amp)
    paper = 2 * DIT_XL2_GMACS * 1e9 if cfg["preset"] == "xl2" and gen.image_size == 256 else None
    meter = make_meter(device)
    rows = []
    for w in cfg["guidance_scales"]:
        row = bench_sampler_pair(
            gen,
            pipe,
            batch=cfg["batch"],
            steps=cfg["steps"],
            guidance_scale=w,
            warmup=cfg["warmup"],
            repeats=cfg["repeats"],
            amp_dtype=amp,
        )
        fns = sampler_callables(
            gen, pipe, batch=cfg["batch"], steps=cfg["steps"], guidance_scale=w, amp_dtype=amp
        )
        passes = cfg["steps"] * (2 if w > 1.0 else 1)  # transformer forwards per image (CFG doubles)
        for name, fn in fns.items():
            meter.reset()
            fn()
            row[f"{name}_peak_bytes"] = meter.peak()
            row[f"{name}_max_memory_allocated"] = meter.absolute_peak()
            rate = row[f"{name}_images_per_s"]
            row[f"{name}_mfu_counted"] = _mfu(passes * counted, rate, peak_tflops)
            row[f"{name}_mfu_paper_figure"] = _mfu(
                None if paper is None else passes * paper, rate, peak_tflops
            )
        rows.append(row)
    meter.stop()
    fast = None
    if cfg.get("fast"):  # DiTPipeline defaults vs the generation recipes' fast solver (fast_sampling.md)
        fast = bench_fast_pair(
            gen,
            pipe,
            batch=cfg["batch"],
            steps=cfg["steps"],
            fast=cfg["fast"],
            guidance_scale=max(cfg["guidance_scales"]),
            warmup=cfg["warmup"],
            repeats=cfg["repeats"],
            amp_dtype=amp,
        )
        fast["mfu_counted"] = _mfu(2 * fast["fast_steps"] * counted, fast["fast_images_per_s"], peak_tflops)
    return {
        "fast": fast,
        "preset": cfg["preset"],
        "image_size": gen.image_size,
        "latent_shape": list(gen.latent_shape),
        "attention_processors": _attention_processors(gen),
        "amp_dtype": str(amp),
        "forward_flops_counted": counted,
        "forward_flops_paper_figure": paper,
        "rows": rows,
    }


def gpu_recognizer(
    cfg: dict[str, Any], device: torch.device, amp: torch.dtype | None, peak_tflops: float
) -> dict:
    """A recognizer training step (EmbeddingNet + BNNeck + ID head, CE, Adam): images/s, memory, MFU."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from rgsd_lightning.backbones import EmbeddingNet

    torch.manual_seed(0)
    net = EmbeddingNet(cfg["arch"]).to(device).train()
    head = nn.Linear(net.feature_dim, cfg["num_classes"], bias=False).to(device)
    params = [p for p in list(net.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3.5e-4, weight_decay=5e-4)
    x = torch.randn(cfg["batch"], 3, cfg["height"], cfg["width"], device=device)
    y = torch.randint(0, cfg["num_classes"], (cfg["batch"],), device=device)

    def step() -> None:
        with _autocast(device, amp):
            loss = F.cross_entropy(head(net(x)).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = int(counter.get_total_flops())
    times, _ = interleaved_times({"step": step}, cfg["repeats"], warmup=cfg["warmup"], sync=cuda_sync)
    meter = make_meter(device)
    meter.reset()
    step()
    peak, absolute = meter.peak(), meter.absolute_peak()
    meter.stop()
    t = median(times["step"])
    return {
        **{k: cfg[k] for k in ("arch", "height", "width", "batch", "num_classes")},
        "amp_dtype": str(amp),
        "step_s": t,
        "images_per_s": cfg["batch"] / t,
        "step_flops_counted": flops,
        "mfu_counted": _mfu(flops, 1.0 / t, peak_tflops),
        "peak_bytes": peak,
        "max_memory_allocated": absolute,
    }


def gpu_dpok(cfg: dict[str, Any], device: torch.device, amp: torch.dtype | None, peak_tflops: float) -> dict:
    """One RewardDPOK round at paper scale (LoRA on a DiT-XL/2 export), split, memory, rollout MFU.

    Under bf16 autocast the update's forward is not bit-identical to the rollout's; the old log-probs are
    recomputed with the update's forward (ratio exactly 1), the drift check is switched off here and the
    measured drift max |log p_update - log p_rollout| of the first round is reported.
    """
    with tempfile.TemporaryDirectory() as tmp:
        export = make_generator_export(
            cfg["preset"],
            int(cfg["num_identities"]),
            tmp,
            vae=_make_vae(cfg["vae"]),
            image_size=cfg["image_size"],
        )
        model = build_dpok(export, cfg, device, ratio_check_tol=math.inf if amp is not None else 1e-4)
        row = bench_dpok_preset(model, cfg, amp_dtype=amp)
        flops = forward_flops(model.generator, amp)
        row["latent_shape"] = list(model.generator.latent_shape)
        del model
    passes = int(cfg["sample_steps"]) * 2  # CFG w=4 in rollouts
    row["rollout_mfu_counted"] = _mfu(
        passes * flops * row["images_per_round"], 1.0 / row["sampling_s"], peak_tflops
    )
    row["preset"] = cfg["preset"]
    settings = {k: v for k, v in cfg.items() if k not in ("repeats", "presets")}
    return {"settings": settings, "rows": [row], "amp_dtype": str(amp), "forward_flops_counted": flops}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def md_gpu_sampler(result: dict[str, Any]) -> str:
    """Markdown of the paper-scale sampler measurement."""
    rows = []
    for r in result["rows"]:
        for name in ("ours", "pipeline"):
            rows.append(
                [
                    "ours" if name == "ours" else "DiTPipeline",
                    r["guidance_scale"],
                    r["batch"],
                    r["steps"],
                    f"{r[f'{name}_images_per_s']:.2f}",
                    f"{r['ratio_ours_over_pipeline']:.2f}" if name == "ours" else "",
                    mib(r[f"{name}_max_memory_allocated"]),
                    _pct(r[f"{name}_mfu_counted"]),
                    _pct(r[f"{name}_mfu_paper_figure"]),
                ]
            )
    paper = result["forward_flops_paper_figure"]
    return (
        f"## Sampler at paper scale ({result['preset']}, {result['image_size']}px, latent "
        f"{'x'.join(map(str, result['latent_shape']))}, autocast {result['amp_dtype']}, attention "
        f"{', '.join(result['attention_processors'])})\n\n"
        f"Forward FLOPs per sample: counted {result['forward_flops_counted'] / 1e9:.4g} G"
        + (f", paper figure 2 x {DIT_XL2_GMACS:.0f} GMAC = {paper / 1e9:.0f} G" if paper else "")
        + ". MFU = transformer FLOPs only (VAE decode time included in the wall time) / peak.\n\n"
        + md_table(
            [
                "sampler",
                "w",
                "batch",
                "steps",
                "img/s",
                "ratio",
                "peak MiB",
                "MFU (counted)",
                "MFU (paper figure)",
            ],
            rows,
        )
        + md_gpu_fast(result.get("fast"))
    )


def md_gpu_fast(fast: dict[str, Any] | None) -> str:
    """Markdown of the DiTPipeline-default vs fast-solver pair (empty without it)."""
    if not fast:
        return ""
    return (
        f"\nDiTPipeline defaults ({fast['pipeline_steps']} DDIM steps) vs ours `{fast['fast_method']}` "
        f"with {fast['fast_steps']} steps (the generation recipes' setting, quality-matched in "
        f"`fast_sampling.md`), w={fast['guidance_scale']:g}, batch {fast['batch']}, interleaved:\n\n"
        + md_table(
            ["sampler", "steps", "img/s", "ratio", "MFU (counted)"],
            [
                ["DiTPipeline", fast["pipeline_steps"], f"{fast['pipeline_images_per_s']:.2f}", "1.00", "-"],
                [
                    f"ours {fast['fast_method']}",
                    fast["fast_steps"],
                    f"{fast['fast_images_per_s']:.2f}",
                    f"**{fast['ratio_fast_over_pipeline']:.2f}**",
                    _pct(fast["mfu_counted"]),
                ],
            ],
        )
    )


def md_gpu_recognizer(r: dict[str, Any]) -> str:
    """Markdown of the recognizer step measurement."""
    return (
        f"## Recognizer training step ({r['arch']} at {r['height']}x{r['width']}, batch {r['batch']}, "
        f"autocast {r['amp_dtype']})\n\n"
        + md_table(
            ["step s", "img/s", "GFLOP/step (counted)", "MFU", "peak MiB"],
            [
                [
                    f"{r['step_s']:.4f}",
                    f"{r['images_per_s']:.1f}",
                    f"{r['step_flops_counted'] / 1e9:.4g}",
                    _pct(r["mfu_counted"]),
                    mib(r["max_memory_allocated"]),
                ]
            ],
        )
    )


def md_gpu_dpok(result: dict[str, Any]) -> str:
    """Markdown of the paper-scale RewardDPOK round."""
    r = result["rows"][0]
    return md_dpok(result) + (
        f"\nRollout MFU (counted FLOPs, CFG): {_pct(r['rollout_mfu_counted'])}; "
        f"autocast {result['amp_dtype']}; "
        f"max |log p_new - log p_old| on the first micro-batch: {r['logp_check_first_round']:.2e}; drift "
        f"max |log p_update - log p_rollout| absorbed by the recompute: "
        f"{r.get('logp_drift_first_round', float('nan')):.2e} (drift check off under autocast).\n"
    )
