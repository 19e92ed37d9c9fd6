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

Layout: this module holds the sizes, the runners and the command line; the measurements live in
``speed_sampler`` (1), ``speed_reid`` (2), ``speed_dpok`` (4) and ``gpu_scale`` (``--gpu-scale``), on
the random models of ``speed_models``; measurement 3 is the adapter below. Their names are re-exported here.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import run_sections
from benchmarks.gpu_scale import (
    DIT_XL2_GMACS,
    forward_flops,
    gpu_dpok,
    gpu_recognizer,
    gpu_sampler,
    md_gpu_dpok,
    md_gpu_recognizer,
    md_gpu_sampler,
)
from benchmarks.speed_dpok import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    bench_dpok,
    bench_dpok_preset,
    build_dpok,
    live_parameters,
    make_generator_export,
    md_dpok,
    parameter_census,
    time_dpok_round,
)
from benchmarks.speed_dpok import _storages as _storages  # tests/test_benchmarks.py checks it
from benchmarks.speed_models import sd_vae_shaped, small_vae
from benchmarks.speed_reid import (
    bench_reid,
    full_distance_matrix,
    market_like_features,
    md_reid,
    reid_per_query_lean,
    reid_per_query_reference,
)
from benchmarks.speed_sampler import (
    bench_sampler,
    bench_sampler_pair,
    md_sampler,
    sampler_callables,
    sampler_models,
)

__all__ = [
    "DIT_XL2_GMACS",
    "FULL",
    "GPU_PAPER",
    "GPU_QUICK",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "QUICK",
    "SECTIONS",
    "bench_dpok",
    "bench_dpok_preset",
    "bench_reid",
    "bench_sampler",
    "bench_sampler_pair",
    "bench_selection",
    "build_dpok",
    "forward_flops",
    "full_distance_matrix",
    "gpu_dpok",
    "gpu_recognizer",
    "gpu_sampler",
    "live_parameters",
    "main",
    "make_generator_export",
    "market_like_features",
    "md_dpok",
    "md_gpu_dpok",
    "md_gpu_recognizer",
    "md_gpu_sampler",
    "md_reid",
    "md_sampler",
    "md_selection",
    "parameter_census",
    "reid_per_query_lean",
    "reid_per_query_reference",
    "run_gpu_scale",
    "run_speed",
    "sampler_callables",
    "sampler_models",
    "sd_vae_shaped",
    "small_vae",
    "time_dpok_round",
    "torch_threads",
]

# =============================================================================================== sizes
SECTIONS = ("sampler", "reid", "selection", "dpok")

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

# =============================================================================================== GPU scale
FAST_STEPS = 20
"""DPM-Solver++ steps of the paper generation recipes (``experiments/<dataset>/generate.yaml``, w=4): the
fastest setting within 5 % of DiTPipeline-default FID and fidelity in ``fast_sampling_w4.md``."""
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
        "fast": {"method": "dpmsolver", "steps": FAST_STEPS},  # the recipes' setting (fast_sampling.md)
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
        "fast": {"method": "dpmsolver", "steps": 2},
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


# =============================================================================================== runners
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
