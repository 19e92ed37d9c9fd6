"""Speed and memory of the library against what a user would pick instead (issue 7; issues 3 and 4).

    python -m benchmarks speed --out DIR [--quick] [--name speed] [--only sampler,reid,selection,dpok]
    python -m benchmarks speed --gpu-scale --out DIR        # what benchmarks/gpu.sh runs (CUDA)

CPU measurements (``DIR/<name>.json`` + ``DIR/<name>.md``):

1. ``sampler`` - our sampler vs diffusers' ``DiTPipeline`` on the same transformer, VAE, DDIM schedule, step
   count, guidance scale and initial noise, for the "tiny" and "small" presets (label space of 1000 + null,
   where the pipeline's hard-coded null label 1000 is valid; latent mode with a small random AutoencoderKL
   decoding on both sides). Images/s, ratio, and the largest pixel difference of the two outputs.
2. ``reid`` - Market-1501-sized evaluation from 2048-d features: ``reid_evaluate`` vs a torchreid-style
   per-query NumPy loop and a lean per-query loop (below), plus ``reid_map_cmc`` on a precomputed distance
   matrix. Time, ratio, peak memory, max |difference| of mAP and CMC.
3. ``selection`` - the lookahead-selection overhead table of ``benchmarks.selection_overhead``.
4. ``dpok`` - one RewardDPOK round (rollout / reward / update) and its peak memory for the "tiny" and
   "small" presets, and a census of the parameter storage reachable during the update (no second copy).

Randomly initialised weights everywhere (speed does not depend on the values; zero-initialised DiT layers
get small noise so outputs, rewards and gradients are not trivially zero). Variants of one comparison run
interleaved in one process; medians are reported (``benchmarks.common``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from torch import nn

from benchmarks.common import (
    CudaMeter,
    RSSMeter,
    cuda_sync,
    interleaved_times,
    make_meter,
    md_table,
    median,
    mib,
    run_sections,
)

SECTIONS = ("sampler", "reid", "selection", "dpok")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DIT_XL2_GMACS = 119.0
"""DiT-XL/2 at 256²: the DiT paper's "119 Gflops" per forward, counted as multiply-accumulates (fvcore)."""

FULL: dict[str, Any] = {
    "sampler": {
        "presets": {"tiny": {"batch": 16, "steps": 50}, "small": {"batch": 8, "steps": 25}},
        "guidance_scales": (1.0, 4.0),
        "warmup": 1,
        "repeats": 5,
    },
    "reid": {
        "num_query": 3368,
        "num_gallery": 15913,
        "num_ids": 750,
        "num_distractors": 2793,
        "num_cameras": 6,
        "dim": 2048,
        "repeats": 3,
    },
    "selection": {},  # the selection_overhead defaults: resnet18, 128x64, P=16 x K=4
    "dpok": {
        "presets": ("tiny", "small"),
        "num_identities": 8,
        "p": 4,
        "k": 4,
        "sample_steps": 20,
        "policy_steps": 5,
        "grad_accum": 12,
        "micro_batch": 4,
        "extractor": "resnet18",
        "extractor_size": (128, 64),
        "repeats": 3,
    },
}
QUICK: dict[str, Any] = {
    "sampler": {
        "presets": {"tiny": {"batch": 2, "steps": 2}, "small": {"batch": 1, "steps": 2}},
        "guidance_scales": (1.0, 4.0),
        "warmup": 1,
        "repeats": 1,
    },
    "reid": {
        "num_query": 40,
        "num_gallery": 240,
        "num_ids": 12,
        "num_distractors": 30,
        "num_cameras": 6,
        "dim": 32,
        "repeats": 1,
    },
    "selection": {"height": 32, "width": 16, "p": 2, "k": 2, "warmup": 0, "repeats": 1},
    "dpok": {
        "presets": ("tiny",),
        "num_identities": 4,
        "p": 2,
        "k": 2,
        "sample_steps": 3,
        "policy_steps": 1,
        "grad_accum": 2,
        "micro_batch": 2,
        "extractor": "test_resnet",
        "extractor_size": (32, 16),
        "repeats": 1,
    },
}


# =============================================================================================== helpers
def _perturb_(module: nn.Module, std: float, seed: int) -> None:
    """Add N(0, std²) noise to every parameter (shared parameters once), drawn on the CPU from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=g, dtype=torch.float32)
            param.add_(noise.to(device=param.device, dtype=param.dtype), alpha=std)


def small_vae() -> AutoencoderKL:
    """A small random ``AutoencoderKL`` (2 levels: latents at half the image side, 4 channels)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    )


def sd_vae_shaped() -> AutoencoderKL:
    """A random ``AutoencoderKL`` with the architecture of stabilityai/sd-vae-ft-ema (nothing downloaded)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=0.18215,
    )


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# =============================================================================================== sampler
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


# =============================================================================================== ReID
def market_like_features(
    *,
    num_query: int = 3368,
    num_gallery: int = 15913,
    num_ids: int = 750,
    num_distractors: int = 2793,
    num_cameras: int = 6,
    dim: int = 2048,
    latent_dim: int = 32,
    noise: float = 0.5,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random float32 features with Market-1501's identity/camera structure.

    Identities 1..num_ids each have at most one query per camera (Market: 3,368 queries of 750 identities)
    and several gallery images on their cameras - including the query's own camera (same-camera junk) -
    plus ``num_distractors`` distractors of identity 0 on random cameras. A feature is a random linear image
    (``dim`` wide) of a low-dimensional identity code + camera shift + noise, so ranks are neither trivial
    nor random (mAP ~0.7 at Market size), plus a little isotropic noise.
    """
    if num_query > num_ids * num_cameras or num_cameras < 2:
        raise ValueError(f"{num_query} queries need num_ids x num_cameras >= that (one query per camera)")
    matched = num_gallery - num_distractors
    if matched < num_ids or num_distractors < 0:
        raise ValueError(f"num_gallery={num_gallery} must exceed num_distractors + num_ids")
    rng = np.random.default_rng(seed)
    q_per = np.full(num_ids, num_query // num_ids)
    q_per[rng.permutation(num_ids)[: num_query % num_ids]] += 1
    g_per = np.full(num_ids, matched // num_ids)
    g_per[rng.permutation(num_ids)[: matched % num_ids]] += 1
    q_pids, q_cams, g_pids, g_cams = [], [], [], []
    for i in range(num_ids):
        cams = rng.choice(num_cameras, rng.integers(max(int(q_per[i]), 2), num_cameras + 1), replace=False)
        q_pids += [i + 1] * int(q_per[i])
        q_cams += cams[: q_per[i]].tolist()
        g_pids += [i + 1] * int(g_per[i])
        g_cams += rng.choice(cams, int(g_per[i])).tolist()
    g_pids += [0] * num_distractors
    g_cams += rng.integers(0, num_cameras, num_distractors).tolist()
    order = rng.permutation(num_gallery)
    g_pids_a, g_cams_a = np.asarray(g_pids)[order], np.asarray(g_cams)[order]
    q_pids_a, q_cams_a = np.asarray(q_pids), np.asarray(q_cams)

    proj = rng.standard_normal((latent_dim, dim), dtype=np.float32) / math.sqrt(latent_dim)
    centres = rng.standard_normal((num_ids + 1, latent_dim), dtype=np.float32)
    cam_shift = 0.5 * rng.standard_normal((num_cameras, latent_dim), dtype=np.float32)

    def features(pids: np.ndarray, cams: np.ndarray) -> np.ndarray:
        code = (
            centres[pids] + cam_shift[cams] + noise * rng.standard_normal((len(pids), latent_dim), np.float32)
        )
        distractor = pids == 0  # every distractor is its own person
        code[distractor] = rng.standard_normal((int(distractor.sum()), latent_dim), np.float32)
        return code @ proj + 0.1 * rng.standard_normal((len(pids), dim), np.float32)

    return {
        "q_feats": features(q_pids_a, q_cams_a),
        "g_feats": features(g_pids_a, g_cams_a),
        "q_pids": q_pids_a,
        "g_pids": g_pids_a,
        "q_camids": q_cams_a,
        "g_camids": g_cams_a,
    }


def full_distance_matrix(query: torch.Tensor, gallery: torch.Tensor) -> np.ndarray:
    """All query-gallery squared Euclidean distances at once, |q|² + |g|² - 2 q·g (the toolkits' formula)."""
    with torch.no_grad():
        sq = query.pow(2).sum(1, keepdim=True) + gallery.pow(2).sum(1)[None, :]
        return torch.addmm(sq, query, gallery.T, alpha=-2.0).cpu().numpy()


def _check_shapes(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids, g_camids) -> None:
    num_q, num_g = distmat.shape
    if len(q_pids) != num_q or len(q_camids) != num_q or len(g_pids) != num_g or len(g_camids) != num_g:
        raise ValueError(f"label lengths do not match distmat of shape {distmat.shape}")


def _mean_cmc(curves: list[np.ndarray], max_rank: int) -> np.ndarray:
    if not curves:
        raise ValueError("no query has a valid match in the gallery")
    # A valid query's curve is 1 past its (junk-free) list's end, as reid_map_cmc defines it.
    padded = [np.pad(c[:max_rank], (0, max(0, max_rank - len(c))), constant_values=1) for c in curves]
    return np.mean(np.asarray(padded, dtype=np.float64), axis=0)


def reid_per_query_reference(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
) -> tuple[np.ndarray, float]:
    """The Market-1501 protocol as the python ReID toolkits write it (torchreid-style baseline).

    One query at a time: sort its distance row (stable, ties by gallery index), drop same-identity
    same-camera entries and identity -1, take the 0/1 hit vector, CMC = clipped cumulative hits, AP =
    sum over ranks of precision@k x hit@k / number of hits with the precision of every rank built in a
    Python loop (as torchreid's python evaluator does). Returns ``(cmc, mAP)`` like ``reid_map_cmc``.
    """
    _check_shapes(distmat, q_pids, g_pids, q_camids, g_camids)
    max_rank = min(max_rank, distmat.shape[1])
    curves, aps = [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        pids, cams = g_pids[order], g_camids[order]
        junk = ((pids == q_pids[i]) & (cams == q_camids[i])) | (pids == -1)
        hits = (pids[~junk] == q_pids[i]).astype(np.int32)
        if not hits.any():
            continue
        cumulative = hits.cumsum()
        curves.append(np.minimum(cumulative, 1))
        precision = np.asarray([found / (rank + 1.0) for rank, found in enumerate(cumulative)])
        aps.append(float((precision * hits).sum() / hits.sum()))
    return _mean_cmc(curves, max_rank), float(np.mean(aps))


def reid_per_query_lean(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
) -> tuple[np.ndarray, float]:
    """The same protocol, still one query at a time, but with vector ops only (no per-rank Python loop).

    Per query: stable argsort of the row, junk mask, positions of the true matches in the junk-free list;
    CMC from the first position, AP = mean of k / rank_k. Returns ``(cmc, mAP)``.
    """
    _check_shapes(distmat, q_pids, g_pids, q_camids, g_camids)
    max_rank = min(max_rank, distmat.shape[1])
    first, aps = [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        pids = g_pids[order]
        same = pids == q_pids[i]
        keep = ~((same & (g_camids[order] == q_camids[i])) | (pids == -1))
        ranks = np.flatnonzero(same[keep]) + 1
        if ranks.size == 0:
            continue
        first.append(ranks[0])
        aps.append(float(np.mean(np.arange(1, ranks.size + 1) / ranks)))
    if not first:
        raise ValueError("no query has a valid match in the gallery")
    cmc = (np.asarray(first)[:, None] <= np.arange(1, max_rank + 1)[None, :]).mean(axis=0, dtype=np.float64)
    return cmc, float(np.mean(aps))


def _as_cmc_map(result: Any) -> tuple[np.ndarray, float]:
    if isinstance(result, dict):
        return np.asarray(result["cmc"]), float(result["mAP"])
    cmc, mean_ap = result
    return np.asarray(cmc), float(mean_ap)


def bench_reid(cfg: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """Measurement 2: Market-sized ReID evaluation, ours vs per-query NumPy loops (time, memory, equality)."""
    from rgsd_lightning.evaluation import reid_map_cmc
    from rgsd_lightning.evaluation.reid import reid_evaluate

    device = torch.device(device)

    sizes = {
        k: cfg[k] for k in ("num_query", "num_gallery", "num_ids", "num_distractors", "num_cameras", "dim")
    }
    data = market_like_features(**sizes)
    labels = (data["q_pids"], data["g_pids"], data["q_camids"], data["g_camids"])
    qf = torch.from_numpy(data["q_feats"]).to(device)
    gf = torch.from_numpy(data["g_feats"]).to(device)
    distmat = full_distance_matrix(qf, gf)  # for the metric-only row

    variants: dict[str, Callable[[], Any]] = {
        "ours_reid_evaluate": lambda: reid_evaluate(qf, gf, *labels),
        "ours_reid_map_cmc_on_distmat": lambda: reid_map_cmc(distmat, *labels),
        "torchreid_style_per_query": lambda: reid_per_query_reference(full_distance_matrix(qf, gf), *labels),
        "lean_per_query": lambda: reid_per_query_lean(full_distance_matrix(qf, gf), *labels),
        "full_distance_matrix_only": lambda: full_distance_matrix(qf, gf),
    }
    meter = make_meter(device)  # CPU: RSS high-water delta; CUDA: max_memory_allocated above the start
    times, results = interleaved_times(variants, cfg["repeats"], warmup=0, sync=cuda_sync, meter=meter)
    meter.stop()
    memory = {name: int(median(peaks)) for name, peaks in results["peak_bytes"].items()}
    med = {name: median(t) for name, t in times.items()}

    ref_cmc, ref_map = _as_cmc_map(results["torchreid_style_per_query"])
    equality = {}
    for name in ("ours_reid_evaluate", "ours_reid_map_cmc_on_distmat", "lean_per_query"):
        cmc, mean_ap = _as_cmc_map(results[name])
        equality[name] = {
            "max_abs_diff_mAP": abs(mean_ap - ref_map),
            "max_abs_diff_cmc": float(np.abs(cmc - ref_cmc).max())
            if cmc.shape == ref_cmc.shape
            else math.inf,
        }
    d = med["full_distance_matrix_only"]
    return {
        "sizes": sizes,
        "mAP": ref_map,
        "rank1": float(ref_cmc[0]),
        "median_s": med,
        "times_s": times,
        "ratio_torchreid_style_over_ours": med["torchreid_style_per_query"] / med["ours_reid_evaluate"],
        "ratio_lean_over_ours": med["lean_per_query"] / med["ours_reid_evaluate"],
        "metric_only_ratio_torchreid_style": (med["torchreid_style_per_query"] - d)
        / med["ours_reid_map_cmc_on_distmat"],
        "metric_only_ratio_lean": (med["lean_per_query"] - d) / med["ours_reid_map_cmc_on_distmat"],
        "peak_memory_bytes": memory,
        "peak_memory_bytes_per_call": results["peak_bytes"],
        "memory_method": meter.method,
        "equality_vs_torchreid_style": equality,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


def md_reid(result: dict[str, Any]) -> str:
    """Markdown of measurement 2."""
    s, med, mem, eq = (
        result["sizes"],
        result["median_s"],
        result["peak_memory_bytes"],
        result["equality_vs_torchreid_style"],
    )
    base = med["torchreid_style_per_query"]
    descr = {
        "ours_reid_evaluate": "(a) ours: `reid_evaluate` (features -> blocked distances -> metric)",
        "ours_reid_map_cmc_on_distmat": "(a') ours: `reid_map_cmc` on a precomputed distance matrix",
        "torchreid_style_per_query": "(b) torchreid-style: full distmat + per-query argsort/masks/Python AP",
        "lean_per_query": "(c) lean per-query: full distmat + per-query argsort + vector ops",
        "full_distance_matrix_only": "full distance matrix alone (part of b and c)",
    }
    rows = []
    for name, text in descr.items():
        e = eq.get(name)
        diff = "reference" if name == "torchreid_style_per_query" else "-"
        if e is not None:
            diff = f"{e['max_abs_diff_mAP']:.1e} / {e['max_abs_diff_cmc']:.1e}"
        rows.append([text, f"{med[name]:.3f}", f"{base / med[name]:.1f}x", mib(mem[name]), diff])
    return (
        "## 2. ReID evaluation at Market-1501 size\n\n"
        f"{s['num_query']} queries x {s['num_gallery']} gallery ({s['num_distractors']} distractors of "
        f"identity 0), {s['num_ids']} identities, {s['num_cameras']} cameras, {s['dim']}-d float32 random "
        f"features with identity/camera structure (mAP {result['mAP']:.3f}, rank-1 {result['rank1']:.3f}); "
        f"squared Euclidean; device {result['device']}, {result['threads']} torch threads (ours ranks blocks "
        "on that many threads; the per-query loops are single-threaded NumPy as users run them). Median of "
        f"interleaved runs. Peak memory: {result['memory_method']}, median over the timed calls.\n\n"
        + md_table(
            ["variant", "time s", "speed-up vs (b)", "peak MiB", "max abs diff mAP / CMC vs (b)"], rows
        )
        + "\nSpeed-up of ours, features -> metric: "
        f"**{result['ratio_torchreid_style_over_ours']:.1f}x** vs (b) (target >= 20x), "
        f"{result['ratio_lean_over_ours']:.1f}x vs (c). Metric only (distance-matrix time subtracted from "
        f"b and c; a' on the same matrix): {result['metric_only_ratio_torchreid_style']:.1f}x vs (b), "
        f"{result['metric_only_ratio_lean']:.1f}x vs (c). Below 1 means slower.\n"
    )


# =============================================================================================== selection
def bench_selection(settings: dict[str, Any]) -> dict[str, Any]:
    """Measurement 3: ``benchmarks.selection_overhead.run`` (its own files go to a temporary folder).

    A small adapter: only the settings its ``run`` accepts are passed (the others are reported as ignored),
    and its markdown comes from its ``markdown`` function when present.
    """
    from benchmarks import selection_overhead

    run = selection_overhead.run
    accepted = set(inspect.signature(run).parameters)
    kwargs = {k: v for k, v in settings.items() if k in accepted}
    with tempfile.TemporaryDirectory() as tmp:
        report = run(tmp, **kwargs)
    render = getattr(selection_overhead, "markdown", None)
    table = render(report) if render is not None else f"```\n{report}\n```\n"
    return {"report": report, "markdown": table, "ignored_settings": sorted(set(settings) - accepted)}


def md_selection(result: dict[str, Any]) -> str:
    """Markdown of measurement 3 (the selection benchmark's own table, one heading level down)."""
    table = "\n".join(
        "##" + line if line.startswith("#") else line for line in result["markdown"].splitlines()
    )
    return (
        "## 3. Lookahead selection overhead\n\n"
        "From `benchmarks.selection_overhead` (target: selection step <= 1.5x the plain step; its own "
        "sequential medians, not interleaved).\n\n" + table + "\n"
    )


# =============================================================================================== DPOK
def make_generator_export(
    preset: str,
    num_identities: int,
    root: str | Path,
    *,
    vae: AutoencoderKL | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> Path:
    """Build a random generator of ``preset`` (noise added to zero-initialised layers) and export it."""
    from rgsd_lightning.diffusion import build_dit

    torch.manual_seed(seed)
    gen = build_dit(preset=preset, num_identities=num_identities, vae=vae, image_size=image_size)
    _perturb_(gen.transformer, 0.02, seed)
    return gen.save_pretrained(Path(root) / f"{preset}_export")


def _storages(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> dict[tuple[str, int], int]:
    """Distinct storages of the tensors: {(device, data pointer): bytes}."""
    out = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes():
            out[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return out


def _is_parameter(obj: Any) -> bool:
    # type(), not isinstance: the isinstance hook reads attributes of any object (deprecation warnings).
    return issubclass(type(obj), nn.Parameter)


def parameter_census(model: nn.Module) -> dict[str, Any]:
    """Distinct parameter storage a RewardDPOK holds, and whether its KL reference is a second copy.

    Counts storages (tensors sharing memory counted once) of: the generator's base weights, its LoRA
    adapters, everything else in the module (value net, reward extractor, bank), the tensors of the KL
    reference (entered with ``model.reference()``) that are not the generator's own, and parameters alive
    anywhere in the process, outside the module, shaped like a generator weight (a hidden copy).
    """
    gen = model.generator
    named = list(gen.named_parameters()) + list(gen.named_buffers())
    lora = _storages(t for n, t in named if ".lora_" in n)
    base = _storages(t for n, t in named if ".lora_" not in n)
    held = list(model.parameters()) + list(model.buffers())
    for extra in getattr(model, "_reference_model", []):
        held += list(extra.parameters()) + list(extra.buffers())
    module_all = _storages(held)
    with model.reference() as ref:
        reference = _storages(list(ref.parameters()) + list(ref.buffers()))
    ref_extra = {k: v for k, v in reference.items() if k not in base and k not in lora}
    gc.collect()
    shapes = {tuple(t.shape) for n, t in named if ".lora_" not in n and t.numel() > 1}
    alive = [o for o in gc.get_objects() if _is_parameter(o) and tuple(o.shape) in shapes]
    stray = {k: v for k, v in _storages(alive).items() if k not in module_all}
    other = {k: v for k, v in module_all.items() if k not in base and k not in lora}
    return {
        "generator_base_bytes": sum(base.values()),
        "lora_bytes": sum(lora.values()),
        "other_module_bytes": sum(other.values()),
        "distinct_module_bytes": sum(module_all.values()),
        "reference_extra_bytes": sum(ref_extra.values()),
        "generator_shaped_params_outside_module_bytes": sum(stray.values()),
        "no_second_copy": not ref_extra and not stray,
    }


class _PlainOptimizer:
    """What ``RewardDPOK.training_step`` uses of Lightning's optimizer wrapper, for a trainer-less run."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    @contextlib.contextmanager
    def toggle_model(self, sync_grad: bool = True) -> Iterator[None]:
        yield

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def build_dpok(
    export: str | Path,
    cfg: dict[str, Any],
    device: torch.device | str,
    *,
    guidance_scale: float = 4.0,
    ratio_check_tol: float = 1e-4,
    trainable: str = "lora",
) -> Any:
    """A RewardDPOK on ``export`` with a random recognizer as reward extractor and a random memory bank.

    The module runs without a Trainer: ``optimizers``, ``manual_backward`` and ``log_dict`` are replaced on
    the instance by plain-PyTorch equivalents, so ``training_step`` itself (rollout, reward, store, update)
    is what runs and is timed.
    """
    from rgsd_lightning import RewardDPOK
    from rgsd_lightning.backbones import EmbeddingNet, FeatureExtractor
    from rgsd_lightning.rewards import CompositeReward, MemoryBank

    n = int(cfg["num_identities"])
    model = RewardDPOK(
        n,
        generator=str(export),
        trainable=trainable,
        samples_per_identity=cfg["k"],
        sample_steps=cfg["sample_steps"],
        guidance_scale=guidance_scale,
        policy_steps=cfg["policy_steps"],
        grad_accum=cfg["grad_accum"],
        micro_batch=cfg["micro_batch"],
        ratio_check_tol=ratio_check_tol,
        grid_every_n_steps=0,
    )
    torch.manual_seed(0)
    net = EmbeddingNet(cfg["extractor"], neck="none")
    model.set_reward_extractor(FeatureExtractor(net, cfg["extractor_size"], IMAGENET_MEAN, IMAGENET_STD))
    bank_ids = torch.arange(n).repeat_interleave(4)
    bank = MemoryBank(torch.randn(len(bank_ids), net.feature_dim), bank_ids, n)
    model.reward = CompositeReward(bank)
    model.to(device)
    optimizer = _PlainOptimizer(model.configure_optimizers())
    model.optimizers = lambda use_pl_optimizer=True: optimizer
    model.manual_backward = lambda loss, *args, **kwargs: loss.backward()
    model.log_dict = lambda *args, **kwargs: None
    return model


def time_dpok_round(
    model: Any,
    labels: torch.Tensor,
    *,
    amp_dtype: torch.dtype | None = None,
    meter: RSSMeter | CudaMeter | None = None,
    census: bool = False,
) -> dict[str, Any]:
    """Run one ``training_step`` and split its wall time into rollout sampling, reward and update.

    With ``meter`` the peak memory of the rollout (sampling + reward) and of the update is recorded instead
    of being timed cleanly (meters collect garbage); with ``census`` the parameter census runs inside the
    first micro-batch of the update.
    """
    record: dict[str, Any] = {"reward_s": 0.0}
    rollout, rewards, micro = model.rollout, model.rewards, model.micro_batch_loss

    def timed_rewards(images, lbl):
        cuda_sync()
        start = time.perf_counter()
        out = rewards(images, lbl)
        cuda_sync()
        record["reward_s"] += time.perf_counter() - start
        return out

    def timed_rollout(lbl):
        start = time.perf_counter()
        out = rollout(lbl)
        cuda_sync()
        record["rollout_s"] = time.perf_counter() - start
        if meter is not None:
            record["rollout_peak_bytes"] = meter.peak()
            meter.reset(new_baseline=False)
        return out

    def checked_micro(mb, check_ratio):
        if census and "census" not in record:
            record["census"] = parameter_census(model)
        loss, stats = micro(mb, check_ratio)
        if check_ratio:
            record["logp_check"] = float(stats["logp_check"])
        return loss, stats

    model.rollout, model.rewards, model.micro_batch_loss = timed_rollout, timed_rewards, checked_micro
    try:
        if meter is not None:
            meter.reset()
        cuda_sync()
        start = time.perf_counter()
        with _autocast(model.device, amp_dtype):
            model.training_step({"label": labels}, 0)
        cuda_sync()
        total = time.perf_counter() - start
        if meter is not None:
            record["update_peak_bytes"] = meter.peak()
    finally:
        del model.rollout, model.rewards, model.micro_batch_loss  # back to the class methods
    record["total_s"] = total
    record["sampling_s"] = record["rollout_s"] - record["reward_s"]
    record["update_s"] = total - record["rollout_s"]
    return record


def bench_dpok_preset(
    model: Any, cfg: dict[str, Any], *, amp_dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Warm-up round (with the census), ``repeats`` timed rounds, then one memory round; medians."""
    n, p = int(cfg["num_identities"]), int(cfg["p"])

    def labels(i: int) -> torch.Tensor:
        return (torch.arange(p) + i * p) % n

    first = time_dpok_round(model, labels(0), amp_dtype=amp_dtype, census=True)
    rounds = [time_dpok_round(model, labels(i + 1), amp_dtype=amp_dtype) for i in range(cfg["repeats"])]
    meter = make_meter(model.device)
    mem = time_dpok_round(model, labels(cfg["repeats"] + 1), amp_dtype=amp_dtype, meter=meter)
    meter.stop()
    keys = ("total_s", "sampling_s", "reward_s", "update_s")
    images = p * int(cfg["k"])
    micro_batches = int(cfg["policy_steps"]) * int(cfg["grad_accum"])
    return {
        **{k: median([r[k] for r in rounds]) for k in keys},
        "rounds": [{k: r[k] for k in keys} for r in rounds],
        "images_per_round": images,
        "micro_batches_per_round": micro_batches,
        "transitions_per_micro_batch": int(cfg["micro_batch"]),
        "rollout_peak_bytes": mem["rollout_peak_bytes"],
        "update_peak_bytes": mem["update_peak_bytes"],
        "memory_method": meter.method,
        "logp_check_first_round": first["logp_check"],
        "census": first["census"],
    }


def bench_dpok(cfg: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """Measurement 4 at CPU scale: one RewardDPOK round per preset, split, peak memory, copy census."""
    device = torch.device(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in cfg["presets"]:
            export = make_generator_export(preset, int(cfg["num_identities"]), tmp)
            model = build_dpok(export, cfg, device)
            rows.append(
                {
                    "preset": preset,
                    "latent_shape": list(model.generator.latent_shape),
                    **bench_dpok_preset(model, cfg),
                }
            )
            del model
    settings = {k: v for k, v in cfg.items() if k not in ("presets", "repeats")}
    return {"settings": settings, "rows": rows}


def md_dpok(result: dict[str, Any]) -> str:
    """Markdown of measurement 4."""
    s = result["settings"]
    time_rows, census_rows = [], []
    for r in result["rows"]:
        time_rows.append(
            [
                r["preset"],
                "x".join(str(v) for v in r["latent_shape"]),
                f"{r['total_s']:.2f}",
                f"{r['sampling_s']:.2f}",
                f"{r['reward_s']:.2f}",
                f"{r['update_s']:.2f}",
                mib(r["rollout_peak_bytes"]),
                mib(r["update_peak_bytes"]),
            ]
        )
        c = r["census"]
        census_rows.append(
            [
                r["preset"],
                mib(c["generator_base_bytes"]),
                f"{c['lora_bytes'] / 2**10:.1f}",
                mib(c["other_module_bytes"]),
                c["reference_extra_bytes"],
                c["generator_shaped_params_outside_module_bytes"],
                "yes" if c["no_second_copy"] else "**NO**",
            ]
        )
    memory_method = result["rows"][0]["memory_method"] if result["rows"] else ""
    return (
        "## 4. RewardDPOK round cost\n\n"
        f"One `training_step` (no Trainer): P={s['p']} identities x K={s['k']} samples, {s['sample_steps']} "
        f"DDIM steps (eta=1, CFG w=4), reward extractor {s['extractor']} at {s['extractor_size'][0]}x"
        f"{s['extractor_size'][1]} (random), update = {s['policy_steps']} optimizer steps x "
        f"{s['grad_accum']} "
        f"micro-batches of {s['micro_batch']} transitions (LoRA rank 4, value baseline, DPOK KL). Median "
        f"seconds of the timed rounds (a warm-up round untimed); peak memory = {memory_method} above the "
        "RSS before the round, in a separate round.\n\n"
        + md_table(
            [
                "preset",
                "latent",
                "round s",
                "rollout sampling s",
                "reward s",
                "update s",
                "rollout peak MiB",
                "update peak MiB",
            ],
            time_rows,
        )
        + "\nParameter storage reachable during the update (distinct storages; the KL reference is the "
        "generator with its adapters off):\n\n"
        + md_table(
            [
                "preset",
                "generator base MiB",
                "LoRA KiB",
                "other module MiB",
                "reference extra bytes",
                "generator-shaped params elsewhere (bytes)",
                "no second copy",
            ],
            census_rows,
        )
    )


# =============================================================================================== GPU scale
GPU_PAPER: dict[str, Any] = {
    "sampler": {
        "preset": "xl2",
        "vae": "sd",
        "image_size": 256,
        "batch": 32,
        "steps": 50,
        "guidance_scales": (4.0, 1.0),
        "warmup": 1,
        "repeats": 3,
    },
    "recognizer": {
        "arch": "resnet50",
        "height": 256,
        "width": 128,
        "batch": 64,
        "num_classes": 751,
        "warmup": 3,
        "repeats": 10,
    },
    "reid": {**FULL["reid"], "repeats": 1},
    "selection": {
        "arch": "resnet50",
        "height": 256,
        "width": 128,
        "p": 16,
        "k": 4,
        "warmup": 2,
        "repeats": 7,
    },
    "dpok": {
        **FULL["dpok"],
        "preset": "xl2",
        "vae": "sd",
        "image_size": 256,
        "num_identities": 1000,
        "sample_steps": 50,
        "extractor": "resnet50",
        "extractor_size": (256, 128),
        "repeats": 2,
    },
}
"""Paper scale: DiT-XL/2 at 256² (latent 32x32x4, sd-vae-ft-ema-shaped VAE), ResNet-50 at 256x128."""
GPU_QUICK: dict[str, Any] = {
    "sampler": {
        "preset": "tiny",
        "vae": "small",
        "image_size": None,
        "batch": 2,
        "steps": 2,
        "guidance_scales": (4.0, 1.0),
        "warmup": 1,
        "repeats": 1,
    },
    "recognizer": {
        "arch": "test_resnet",
        "height": 32,
        "width": 16,
        "batch": 4,
        "num_classes": 5,
        "warmup": 1,
        "repeats": 1,
    },
    "reid": QUICK["reid"],
    "selection": QUICK["selection"],
    "dpok": {**QUICK["dpok"], "preset": "tiny", "vae": None, "image_size": None},
}
"""The same code path at toy size (to test the GPU script on a CPU with ``--device cpu --quick``)."""


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
    return {
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

    Under bf16 autocast the log-prob recompute is not bit-identical to the rollout, so the ratio check is
    switched off here and the measured max |log p_new - log p_old| of the first micro-batch is reported.
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
        f"max |log p_new - log p_old| on the first micro-batch: {r['logp_check_first_round']:.2e} (ratio "
        "check off under autocast).\n"
    )


def run_gpu_scale(
    out: str | Path,
    *,
    device: str = "cuda",
    quick: bool = False,
    name: str = "speed_gpu",
    peak_tflops: float = 989.0,
    only: list[str] | None = None,
    command: str = "",
) -> dict[str, Any] | None:
    """Paper-scale measurements on a CUDA device (bf16 autocast); None (and a "skipped" line) without CUDA.

    ``device="cpu"`` with ``quick=True`` runs the same code at toy size, to test it where no GPU exists.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA (torch.cuda.is_available() is False); nothing was measured", flush=True)
        return None
    names = ("sampler", "recognizer", "reid", "selection", "dpok")
    chosen = list(only or names)
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise ValueError(f"--only: unknown measurement(s) {unknown}; expected some of {list(names)}")
    cfg = GPU_QUICK if quick else GPU_PAPER
    amp = torch.bfloat16
    runners = {
        "sampler": lambda: gpu_sampler(cfg["sampler"], dev, amp, peak_tflops),
        "recognizer": lambda: gpu_recognizer(cfg["recognizer"], dev, amp, peak_tflops),
        "reid": lambda: bench_reid(cfg["reid"], dev),
        "selection": lambda: bench_selection({**cfg["selection"], "device": str(dev)}),
        "dpok": lambda: gpu_dpok(cfg["dpok"], dev, amp, peak_tflops),
    }
    renderers = {
        "sampler": md_gpu_sampler,
        "recognizer": md_gpu_recognizer,
        "reid": md_reid,
        "selection": md_selection,
        "dpok": md_gpu_dpok,
    }
    meta = {
        "benchmark": "speed_gpu_scale",
        "quick": quick,
        "device": str(dev),
        "command": command,
        "peak_tflops_assumed": peak_tflops,
        "peak_note": "dense bf16 tensor-core peak of an H100/H200 SXM (989 TFLOP/s); else pass --peak-tflops",
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "settings": {k: cfg[k] for k in chosen},
    }
    title = f"Speed and memory at paper scale ({dev})" + (" - quick mode (toy sizes)" if quick else "")
    sections = {k: runners[k] for k in names if k in chosen}
    return run_sections(out, name, title, sections, renderers, meta)


# =============================================================================================== runner
_BENCHES = {
    "sampler": (bench_sampler, md_sampler),
    "reid": (bench_reid, md_reid),
    "selection": (bench_selection, md_selection),
    "dpok": (bench_dpok, md_dpok),
}


def run_speed(
    out: str | Path,
    *,
    quick: bool = False,
    name: str = "speed",
    only: list[str] | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Run the CPU measurements, write ``<out>/<name>.json`` and ``<out>/<name>.md``; returns the report."""
    chosen = list(only or SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise ValueError(f"--only: unknown measurement(s) {unknown}; expected some of {list(SECTIONS)}")
    cfg = QUICK if quick else FULL
    sections = {k: (lambda k=k: _BENCHES[k][0](cfg[k])) for k in SECTIONS if k in chosen}
    meta = {
        "benchmark": "speed",
        "quick": quick,
        "command": command,
        "settings": {k: cfg[k] for k in chosen},
    }
    title = "Speed and memory (CPU)" + (" - quick mode (sizes for tests, not results)" if quick else "")
    return run_sections(out, name, title, sections, {k: _BENCHES[k][1] for k in SECTIONS}, meta)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op CPU threads (None: unchanged); the previous count is restored after."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks speed ...``: CPU measurements, or ``--gpu-scale`` (paper-scale CUDA run)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks speed", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder for <name>.json and <name>.md")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for tests)")
    parser.add_argument("--name", default=None, help="report file stem (default: speed, or speed_gpu)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--gpu-scale", action="store_true", help="paper-scale CUDA measurements (gpu.sh)")
    parser.add_argument("--device", default="cuda", help="device of --gpu-scale (cpu only to test the code)")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak for the MFU estimate"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's; 1 is steadier when shared)",
    )
    args = parser.parse_args(argv)
    command = "python -m benchmarks speed " + " ".join(argv if argv is not None else [])
    only = args.only.split(",") if args.only else None
    with torch_threads(args.threads):
        return _dispatch(args, only, command)


def _dispatch(args: argparse.Namespace, only: list[str] | None, command: str) -> int:
    if args.gpu_scale:
        report = run_gpu_scale(
            args.out,
            device=args.device,
            quick=args.quick,
            name=args.name or "speed_gpu",
            peak_tflops=args.peak_tflops,
            only=only,
            command=command,
        )
        return 0 if report is None else (1 if report["errors"] else 0)
    report = run_speed(args.out, quick=args.quick, name=args.name or "speed", only=only, command=command)
    print(Path(args.out) / f"{args.name or 'speed'}.md")
    return 1 if report["errors"] else 0
