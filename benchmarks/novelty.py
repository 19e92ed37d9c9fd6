"""``python -m benchmarks novelty``: how far synthetic images sit from the real images the generator saw.

A diagnostic for a synthetic set that a judge finds faithful but that does not help the recognizer: is it
new images of the identities, or the training images again? Per image, the distance to the nearest
*training* image of its identity (the k images the generator was cold-started on and the recognizer
trains on), in two spaces:

* the judge's feature space (a recognizer export; unit features, Euclidean distance), images squared to the
  generator geometry first, as the quality table does (``evaluation.quality``);
* pixels: the grey image at the generator side, root mean square difference in [0, 1] units.

The reference is the target's real images that neither the generator, the recognizer nor the judge trained
on (per identity, the images after the first ``judge_shots``): what a new real image of the identity looks
like from the training images. Per source: the mean and median distance, their ratio to the reference's,
and the share of images nearer to a training image than the nearest new real image of their identity is
(0 for the reference itself, by construction). Which
images train is decided as the study's datamodule decides it (``sources.read_identity_folders`` with the
same ``train_per_identity``). Writes ``<out>/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import command_line, md_environment, md_table, publish, report_header
from benchmarks.lighting_spread import set_folder
from rgsd_lightning.data.records import IdentityRecord, by_identity, read_manifest
from rgsd_lightning.data.sources import read_identity_folders
from rgsd_lightning.data.synthetic_set import manifest_path

REFERENCE = "new real images (nobody trained on them)"
"""The reference row: images of the target identities that neither generator, recognizer nor judge saw."""


def nearest_distance(
    points: np.ndarray, labels: Sequence[str], anchors: np.ndarray, anchor_labels: Sequence[str]
) -> np.ndarray:
    """Per row of ``points`` (N, D), the Euclidean distance to the nearest row of ``anchors`` (M, D) with the
    same label. Raises when a label has no anchor."""
    points, anchors = np.asarray(points, dtype=np.float64), np.asarray(anchors, dtype=np.float64)
    if points.shape[0] != len(labels) or anchors.shape[0] != len(anchor_labels):
        raise ValueError("points / anchors and their labels differ in length")
    anchor_labels = np.asarray(anchor_labels)
    out = np.empty(len(labels))
    for i, (x, label) in enumerate(zip(points, labels, strict=True)):
        mine = anchors[anchor_labels == label]
        if not len(mine):
            raise ValueError(f"identity {label!r} has no training image to measure a distance to")
        out[i] = np.sqrt(((mine - x) ** 2).sum(axis=1)).min()
    return out


def grey_pixels(images: Any) -> np.ndarray:
    """Images in [-1, 1] (N, C, H, W) as grey rows in [0, 1] scaled so that the Euclidean distance is the
    root mean square difference."""
    grey = (images.float().mean(dim=1) + 1) / 2
    return grey.flatten(1).numpy() / np.sqrt(grey[0].numel())


def summary(distance: np.ndarray, reference_nearest: dict[str, float], labels: Sequence[str]) -> dict:
    """Mean, median, and the share nearer than the nearest new real image of the identity."""
    closer = [d < reference_nearest[label] for d, label in zip(distance, labels, strict=True)]
    return {
        "mean": float(distance.mean()),
        "median": float(np.median(distance)),
        "closer": float(np.mean(closer)),
    }


def measure(
    judge: str | Path,
    target: str | Path,
    sets: dict[str, str | Path],
    *,
    train_per_identity: int,
    judge_shots: int,
    size: int = 32,
    channels: int = 1,
) -> dict[str, Any]:
    """{source: {"images": n, "judge": {...}, "pixels": {...}}} for the new real images and each set."""
    from rgsd_lightning.backbones import FeatureExtractor
    from rgsd_lightning.evaluation.quality import embed, load_images

    if judge_shots <= train_per_identity:
        raise ValueError(f"judge_shots ({judge_shots}) must exceed train_per_identity ({train_per_identity})")
    extractor = FeatureExtractor.from_export(judge).eval()
    records = read_identity_folders(target, train_per_identity=train_per_identity)
    train = [r for r in records if r.split == "train"]
    new_real = [r for group in by_identity(records).values() for r in group[judge_shots:]]
    if not new_real:
        raise ValueError(f"{target}: no identity has more than judge_shots={judge_shots} images")

    def spaces(group: Sequence[IdentityRecord]) -> dict[str, np.ndarray]:
        images = load_images(group, size, channels)
        return {"judge": embed(extractor, images), "pixels": grey_pixels(images)}  # unit features already

    anchors, anchor_labels = spaces(train), [r.identity for r in train]
    sources = {REFERENCE: new_real}
    for name, folder in sets.items():
        synthetic = read_manifest(manifest_path(folder))
        unknown = sorted({r.identity for r in synthetic} - set(anchor_labels))
        if unknown:
            raise ValueError(f"synthetic set {folder}: identities {unknown[:5]} are not target identities")
        sources[f"synthetic: {name}"] = synthetic
    distances = {}
    for name, group in sources.items():
        feats, labels = spaces(group), [r.identity for r in group]
        distances[name] = (
            labels,
            {s: nearest_distance(feats[s], labels, anchors[s], anchor_labels) for s in feats},
        )
    ref_labels, ref = distances[REFERENCE]
    nearest_real = {
        space: {label: float(ref[space][np.asarray(ref_labels) == label].min()) for label in set(ref_labels)}
        for space in ref
    }
    results: dict[str, Any] = {}
    for name, (labels, by_space) in distances.items():
        row: dict[str, Any] = {"images": len(labels)}
        for space, d in by_space.items():
            row[space] = summary(d, nearest_real[space], labels)
            row[space]["ratio"] = row[space]["mean"] / float(ref[space].mean())
        results[name] = row
    return results


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    body = [
        "# Novelty: synthetic images against the training images\n\n",
        md_environment(report["environment"]),
        f"\nCommand: `{report['command']}`\n\n",
        f"Target {s['target']}, {s['train_per_identity']} training image(s) per identity; judge "
        f"{s['judge']}; new real images: each identity's images after the first {s['judge_shots']} (the "
        "judge's training images). Distance of each image to the nearest training image of its identity: "
        "judge = unit judge features, Euclidean; pixels = grey image at the generator side, RMS difference. "
        "ratio: mean over the new real images' mean; nearer: share of images nearer to a training image "
        "than the identity's nearest new real image.\n\n",
    ]
    headers = ["source", "images"]
    for space in ("judge", "pixels"):
        headers += [f"{space}: mean", f"{space}: median", f"{space}: ratio", f"{space}: nearer %"]
    table = []
    for name, row in report["results"].items():
        cells = [name, row["images"]]
        for space in ("judge", "pixels"):
            r = row[space]
            cells += [
                f"{r['mean']:.3f}",
                f"{r['median']:.3f}",
                f"{r['ratio']:.2f}",
                f"{100 * r['closer']:.1f}",
            ]
        table.append(cells)
    return "".join(body) + md_table(headers, table)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks novelty", description=__doc__.split("\n")[0])
    p.add_argument("--target", default="../shared/data/orl_faces", help="identity folders of the target")
    p.add_argument("--run", default="runs/utility/faces_common_random", help="study run folder")
    p.add_argument("--judge", default="judge", help="the judge's stage in the run (its export)")
    p.add_argument("--sets", nargs="+", default=["k3_gen_rl_full"], help="synthetic-set stages of the run")
    p.add_argument("--train-per-identity", type=int, default=3)
    p.add_argument("--judge-shots", type=int, default=5, help="images per identity the judge trained on")
    p.add_argument("--size", type=int, default=32, help="generator side")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="novelty_faces_k3")
    args = p.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    judge = Path(args.run) / args.judge / "export" / "backbone"
    if not judge.is_dir():
        raise FileNotFoundError(f"judge export not found: {judge} (run the study first)")
    settings["judge"] = str(judge)
    sets = {name: set_folder(args.run, name) for name in args.sets}
    report = report_header("novelty", False, command_line("novelty", argv), settings)
    report["results"] = measure(
        judge,
        args.target,
        sets,
        train_per_identity=args.train_per_identity,
        judge_shots=args.judge_shots,
        size=args.size,
        channels=args.channels,
    )
    publish(args.out, args.name, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
