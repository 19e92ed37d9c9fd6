"""``python -m benchmarks roundtrip``: a set of real images sent through a generator and back (SDEdit).

The faces oracle (``oracle_split``) shows that new real images of an identity help the recognizer a lot, and
the generator's samples, which a judge assigns as well as new real images, do not. Is it what the generator
*draws* (the content: pose, expression, lighting) or how it *renders* (its artefacts: blocky patches,
stripes)? This writes, per strength, the images of a set (e.g. the oracle's held-back real images) noised to
the strength's point of the sampler grid and denoised by the generator under their own identity's label -
SDEdit, as ``sample(init=..., strength=...)`` does for ``SyntheticGenerator(init_images=...)``, except that
each image keeps its identity. A low strength keeps the real image's content and imprints the generator's
rendering; strength 1 is the generator's own sample. Trained on as the synthetic set of the same study rows,
the strengths trace where between the oracle and the generator the utility goes.

The source is a synthetic-set folder (``--set``) or the training images of an identity-folder target
(``--target`` with ``--train-per-identity``: the same content with the generator's rendering, the control
for new content). ``--copies`` round-trips every image that many times. Every output image gets its own seed
(its position in the output), so a strength's images do not depend on the batch.
Per strength, a synthetic-set folder ``<out>/s<100 x strength>`` (PNGs + ``manifest.jsonl`` with the start
image, strength and seed of each row), a grid (``<out>/grid.png``: each column the start image, then one row
per strength) and ``<out>/roundtrip.json`` with the root mean square pixel change per strength. Writes
nothing over an existing ``<out>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    command_line,
    md_environment,
    md_table,
    report_header,
    sample_batched,
    write_report,
)
from benchmarks.lighting_spread import set_folder
from rgsd_lightning.backbones import FeatureExtractor
from rgsd_lightning.data.images import load_image
from rgsd_lightning.data.records import IdentityRecord, read_manifest, write_manifest
from rgsd_lightning.data.sources import read_identity_folders
from rgsd_lightning.data.synthetic_set import image_path, manifest_path
from rgsd_lightning.data.transforms import generator_transform
from rgsd_lightning.diffusion.generator import DiTGenerator
from rgsd_lightning.diffusion.sampling import steps_from_init
from rgsd_lightning.evaluation.quality import Judge
from rgsd_lightning.io import atomic_folder, atomic_write_json, image_grid, save_png, to_uint8


def strength_folder(strength: float) -> str:
    """``s<100 x strength>``, zero-padded to 3 digits (``s020``, ``s100``)."""
    return f"s{round(100 * strength):03d}"


def training_rows(target: str | Path, train_per_identity: int) -> list[IdentityRecord]:
    """The training images of an identity-folder target, as the study's datamodule splits it."""
    records = read_identity_folders(target, train_per_identity=train_per_identity)
    return [r for r in records if r.split == "train"]


def load_images(
    rows: Sequence[IdentityRecord], generator: DiTGenerator, source: str
) -> tuple[list[IdentityRecord], torch.Tensor]:
    """The rows and their images (N, C, S, S) in [-1, 1] at the generator's geometry; raises naming the
    identities the generator has no label for."""
    rows = list(rows)
    if not rows:
        raise ValueError(f"{source}: no image to round-trip")
    unknown = sorted({r.identity for r in rows} - set(generator.identities))
    if unknown:
        raise ValueError(f"{source}: identities {unknown[:5]} are not among the generator's labels")
    transform = generator_transform(generator.image_size, generator.channels, hflip=False)
    mode = "L" if generator.channels == 1 else "RGB"
    return rows, torch.stack([transform(load_image(r.path, mode)) for r in rows])


def round_trip(
    generator: DiTGenerator,
    images: torch.Tensor,
    labels: Sequence[int],
    strength: float,
    *,
    seeds: Sequence[int],
    steps: int = 25,
    method: str = "dpmsolver",
    guidance_scale: float = 2.0,
    clip_x0: bool = True,
    batch_size: int = 64,
) -> torch.Tensor:
    """``images`` (N, C, S, S) in [-1, 1] noised to ``strength`` and denoised under ``labels``, in batches
    (each image's noise from its own seed, so the result does not depend on the batching)."""
    return sample_batched(
        generator,
        labels,
        seeds,
        init=images,
        batch_size=batch_size,
        num_steps=steps,
        method=method,
        guidance_scale=guidance_scale,
        clip_x0=clip_x0,
        strength=strength,
    )


def build(
    source: str | Path | Sequence[IdentityRecord],
    generator_dir: str | Path,
    out: str | Path,
    strengths: Sequence[float],
    *,
    copies: int = 1,
    name: str = "records",
    judge: Judge | None = None,
    **sampling: Any,
) -> dict[str, Any]:
    """Write every strength's set, the grid and ``roundtrip.json`` into ``out`` (atomically); returns the
    summary. ``source``: a synthetic-set folder, or the records of the images to round-trip (``name`` says
    where they come from in the summary). With a ``judge``, the summary holds its scores (fidelity,
    spread, FID) of the images as given (``"given"``) and of every strength's."""
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be a positive int, got {copies!r}")
    if not strengths:
        raise ValueError("give at least one strength")
    for s in strengths:
        steps_from_init(sampling.get("steps", 25), s)  # (0, 1] and at least one step: fails before any work
    if len({strength_folder(s) for s in strengths}) != len(strengths):
        raise ValueError(f"strengths {list(strengths)} repeat (to the percent)")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: remove it or pick another --out (nothing was written)")
    if isinstance(source, (str, Path)):
        source, records = str(source), read_manifest(manifest_path(source))
    else:
        source, records = name, list(source)
    generator = DiTGenerator.from_pretrained(generator_dir).eval()
    rows, images = load_images(records, generator, source)
    rows, images = rows * copies, images.repeat(copies, 1, 1, 1)
    labels = [generator.identities.index(r.identity) for r in rows]
    seeds = list(range(len(rows)))
    summary: dict[str, Any] = {
        "source": source,
        "copies": copies,
        "generator": str(generator_dir),
        "images": len(rows),
        "sampling": {"steps": 25, "method": "dpmsolver", "guidance_scale": 2.0, "clip_x0": True, **sampling},
        "strengths": {},
    }
    identities = [r.identity for r in rows]
    if judge is not None:
        summary["given"] = judge.score_images(images, identities)
    columns = min(len(rows), 8)
    grid_rows = [[images[i] for i in range(columns)]]
    with atomic_folder(out) as tmp:
        for strength in strengths:
            result = round_trip(generator, images, labels, strength, seeds=seeds, **sampling)
            folder = tmp / strength_folder(strength)
            written = []
            for r, seed, pixels in zip(rows, seeds, to_uint8(result), strict=True):
                rel = image_path(r.identity, seed)
                save_png(pixels, folder / rel)
                extra = {"seed": seed, "init_image": r.path, "init_strength": strength}
                written.append(IdentityRecord(str(folder / rel), r.identity, source="synthetic", extra=extra))
            write_manifest(folder / "manifest.jsonl", written)
            change = ((result - images) / 2).pow(2).mean(dim=(1, 2, 3)).sqrt()
            summary["strengths"][strength_folder(strength)] = {
                "strength": strength,
                "steps_run": steps_from_init(summary["sampling"]["steps"], strength),
                "rms_change": float(change.mean()),
            }
            if judge is not None:
                summary["strengths"][strength_folder(strength)]["judge"] = judge.score_images(
                    result, identities
                )
            grid_rows.append([result[i] for i in range(columns)])
        save_png(to_uint8(image_grid(grid_rows)[None])[0], tmp / "grid.png")
        atomic_write_json(tmp / "roundtrip.json", summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks roundtrip", description=__doc__.split("\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--set", help="synthetic-set folder (manifest.jsonl) or a run's set stage")
    what.add_argument("--target", help="identity folders: round-trip their training images")
    p.add_argument("--run", default=None, help="with --set naming a stage: the run folder holding it")
    p.add_argument("--train-per-identity", type=int, default=1, help="with --target: training images each")
    p.add_argument("--copies", type=int, default=1, help="round trips of every image (seeds of their own)")
    p.add_argument("--generator", required=True, help="generator export folder (its labels name the set's)")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    p.add_argument("--steps", type=int, default=25, help="sampler grid (the strength runs its last part)")
    p.add_argument("--method", default="dpmsolver", choices=["dpmsolver", "ddim"])
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--judge", default=None, help="recognizer export that scores the images (quality table)")
    p.add_argument("--judge-target", default=None, help="identity folders of the judge's real images")
    p.add_argument("--judge-shots", type=int, default=5, help="the judge's training images per identity")
    p.add_argument("--name", default=None, help="with --judge: write benchmarks/results/<name>.json and .md")
    p.add_argument("--results", default="benchmarks/results", help="folder of the --name report")
    args = p.parse_args(argv)
    if (args.judge is None) != (args.judge_target is None):
        p.error("--judge and --judge-target go together")
    if args.name and not args.judge:
        p.error("--name needs --judge (the report is the judge's table)")
    judge = None
    if args.judge:
        records = read_identity_folders(args.judge_target, train_per_identity=args.judge_shots)
        probe = DiTGenerator.from_pretrained(args.generator)
        judge = Judge(
            FeatureExtractor.from_export(args.judge),
            [r for r in records if r.split == "train"],
            probe.image_size,
            probe.channels,
            heldout=[r for r in records if r.split != "train"],
        )
    if args.target:
        source = training_rows(args.target, args.train_per_identity)
    else:
        source = set_folder(args.run, args.set) if args.run else Path(args.set)
    summary = build(
        source,
        args.generator,
        args.out,
        args.strengths,
        copies=args.copies,
        name=f"{args.target} (first {args.train_per_identity} per identity)" if args.target else "records",
        steps=args.steps,
        method=args.method,
        guidance_scale=args.guidance,
        judge=judge,
    )
    print(json.dumps({k: v["rms_change"] for k, v in summary["strengths"].items()}))
    if args.name:
        report = {**report_header(args.name, False, command_line("roundtrip", argv), vars(args)), **summary}
        report["judge"] = judge.describe()
        write_report(args.results, args.name, report, markdown(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    """The report's table: per strength the change and the judge's scores, after the images as given."""
    rows = []
    for label, entry in [("0 (as given)", {"judge": report["given"]}), *report["strengths"].items()]:
        scores = entry["judge"]
        rows.append(
            [
                label if "strength" not in entry else f"{entry['strength']:g}",
                entry.get("steps_run", 0),
                f"{entry.get('rms_change', 0.0):.3f}",
                f"{100 * scores['fidelity']:.1f}",
                f"{scores['diversity_ratio']:.2f}" if scores["diversity_ratio"] is not None else "n/a",
                f"{scores['fid']:.3f}",
            ]
        )
    facts = report["judge"]
    return (
        f"# Round trip through the generator: {report['source']}\n\n"
        f"{md_environment(report['environment']).rstrip()}\n\nCommand: `{report['command']}`\n\n"
        f"Generator `{report['generator']}`; {report['images']} images ({report['copies']} round trip(s) of"
        f" each), {report['sampling']}.\n\n"
        + md_table(
            ["strength", "steps run", "RMS change", "judge fidelity %", "spread syn/real", "FID"], rows
        )
        + f"\n\nRMS change: root mean square pixel difference to the start image, in [0, 1] units. Judge:"
        f" {facts['num_identities']} identities, {facts['num_real_images']} real training images; a new real"
        f" image reaches fidelity {100 * (facts['heldout_fidelity'] or 0):.1f} %; spread syn/real against"
        f" its {facts['reference']} images; FID in its feature space.\n"
    )


if __name__ == "__main__":
    sys.exit(main())
