"""Train-step cost of lookahead sample selection (paper §4.3) against a plain step, on one batch and model.

    python -m benchmarks.selection_overhead --out runs/bench/selection [--arch resnet18 --threads 2]

Every variant runs the same LookaheadReID training step (ID cross-entropy + batch-hard triplet, Adam) on the
same P x K batch with a share of synthetic samples:

* ``no_selection``: forward, loss, backward, optimizer step;
* ``selection_full``: + lookahead selection with the virtual step on every parameter, reusing the training
  forward (one extra backward for the virtual gradient, one extra forward at w');
* ``selection_head``: + selection with the virtual step on neck + classifier only (backbone features reused);
* ``deepcopy_reference``: the naive implementation - deep-copy the model, forward + backward + SGD step on the
  copy, forward the copy again for l(w'), then the ordinary training step (two extra forwards and a copy).

Variants are timed interleaved (``benchmarks.common.interleaved_times``: one step of each per round, the
order reversed every other round, so a drift of a shared machine hits all alike) after warm-up rounds, and
the median per variant is reported; each variant trains its own copy of the model, so weights drift between
steps as in training. Results go to ``selection_overhead.json`` and ``selection_overhead.md`` in
``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import environment, interleaved_times, median
from rgsd_lightning.modules.config import EmbeddingNetConfig
from rgsd_lightning.modules.lookahead_reid import LookaheadReID
from rgsd_lightning.selection import SelectionConfig

VARIANTS = ("no_selection", "selection_full", "selection_head", "deepcopy_reference")


def _batch(p: int, k: int, height: int, width: int, synthetic_fraction: float, device: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(p).repeat_interleave(k)
    n_syn = max(1, int(round(k * synthetic_fraction))) if synthetic_fraction > 0 else 0  # selection must run
    is_syn = (torch.arange(k) >= k - n_syn).repeat(p)
    images = torch.randn(p * k, 3, height, width, generator=g)
    return {"image": images.to(device), "label": labels.to(device), "is_synthetic": is_syn.to(device)}


def _step_fn(model: LookaheadReID, optimizer: torch.optim.Optimizer, variant: str) -> Callable[[dict], float]:
    """One training step of the given variant; returns the loss."""
    selection = {
        "no_selection": SelectionConfig(enabled=False),
        "selection_full": SelectionConfig(enabled=True, keep_ratio=0.5, scope="full"),
        "selection_head": SelectionConfig(enabled=True, keep_ratio=0.5, scope="head"),
        "deepcopy_reference": SelectionConfig(enabled=False),
    }[variant]

    def real_step(batch: dict, keep: torch.Tensor | None = None) -> float:
        out = model.identity_forward(batch)
        keep = out["keep"] if keep is None else keep
        loss = out["losses"][keep].mean() + model.triplet_loss(out["features"][keep], batch["label"][keep])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def deepcopy_step(batch: dict) -> float:
        twin = copy.deepcopy(model)
        before = twin.identity_losses(twin.net(batch["image"]), batch["label"])
        grads = torch.autograd.grad(before.mean(), [p for p in twin.parameters() if p.requires_grad])
        with torch.no_grad():
            for param, grad in zip([p for p in twin.parameters() if p.requires_grad], grads, strict=True):
                param.sub_(0.01 * grad)
            after = twin.identity_losses(twin.net(batch["image"]), batch["label"])
        delta = torch.where(batch["is_synthetic"], after - before.detach(), torch.inf)
        n_keep = int(batch["is_synthetic"].sum()) // 2
        keep = ~batch["is_synthetic"]
        keep[torch.argsort(delta)[:n_keep]] = True
        return real_step(batch, keep)

    def step(batch: dict) -> float:
        model.selection = selection
        return deepcopy_step(batch) if variant == "deepcopy_reference" else real_step(batch)

    return step


def run(
    out: str | Path,
    *,
    arch: str = "resnet18",
    height: int = 128,
    width: int = 64,
    p: int = 16,
    k: int = 4,
    synthetic_fraction: float = 0.25,
    warmup: int = 2,
    repeats: int = 7,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Time every variant and write ``selection_overhead.json`` / ``.md`` to ``out``; returns the results.

    Args:
        out: output folder.
        arch: timm backbone (random init).
        height: input height.
        width: input width.
        p: identities per batch.
        k: images per identity.
        synthetic_fraction: share of each identity's K images flagged synthetic.
        warmup: untimed steps per variant.
        repeats: timed steps per variant (the median is reported).
        device: "cpu" or "cuda".
        seed: model seed.
    """
    torch.manual_seed(seed)
    base = LookaheadReID(p, net=EmbeddingNetConfig(architecture=arch)).to(device).train()
    batch = _batch(p, k, height, width, synthetic_fraction, device)
    steps: dict[str, Callable[[], float]] = {}
    for variant in VARIANTS:
        model = copy.deepcopy(base)
        optimizer = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=3.5e-4)
        step = _step_fn(model, optimizer, variant)
        steps[variant] = lambda step=step: step(batch)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else None
    times, _ = interleaved_times(steps, repeats, warmup=warmup, sync=sync)
    results: dict[str, Any] = {v: {"median_s": median(times[v]), "times_s": times[v]} for v in VARIANTS}
    ref = results["no_selection"]["median_s"]
    for variant in VARIANTS:
        results[variant]["ratio"] = results[variant]["median_s"] / ref
    report = {
        "benchmark": "selection_overhead",
        "config": dict(
            arch=arch,
            height=height,
            width=width,
            p=p,
            k=k,
            synthetic_fraction=synthetic_fraction,
            warmup=warmup,
            repeats=repeats,
            device=device,
            seed=seed,
        ),
        "environment": environment(),
        "threads": torch.get_num_threads(),
        "results": results,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "selection_overhead.md").write_text(markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table."""
    cfg = report["config"]
    lines = [
        f"# Lookahead selection overhead ({cfg['arch']}, {cfg['height']}x{cfg['width']}, "
        f"P={cfg['p']} x K={cfg['k']}, {cfg['device']}, {report['threads']} threads)",
        "",
        "| variant | median step (s) | ratio to no selection |",
        "|---|---:|---:|",
    ]
    for variant, row in report["results"].items():
        lines.append(f"| {variant} | {row['median_s']:.3f} | {row['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (``python -m benchmarks.selection_overhead --out DIR``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--p", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--synthetic-fraction", type=float, default=0.25)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(
        args.out,
        arch=args.arch,
        height=args.height,
        width=args.width,
        p=args.p,
        k=args.k,
        synthetic_fraction=args.synthetic_fraction,
        warmup=args.warmup,
        repeats=args.repeats,
        device=args.device,
    )
    print(markdown(report), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
