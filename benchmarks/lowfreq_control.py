"""``python -m benchmarks lowfreq_control``: the non-generative control of a set generated from images.

A set generated from start images (SDEdit, ``SyntheticGenerator(init_images=...)``) takes its lighting from
the low frequencies of each start image and its identity from the generator. Does the generator matter, or
would moving the start image's low frequencies onto the training image do the same? This writes, for every
image of such a set, a training image of its identity with its low frequencies replaced by those of the same
start image:

    out = clip(T * (blur(S) + eps) / (blur(T) + eps), 0, 1)

(T the training image, S the start image, grey in [0, 1], blur a Gaussian of ``--sigma`` pixels: a
quotient-image relighting without a model). With several training images per identity
(``--train-per-identity``) an identity's images take them in turn, in seed order. The result is a synthetic
set (manifest + PNGs) with the same identities, seeds and start images, for the same downstream rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from benchmarks.lighting_spread import load_grey, set_folder
from rgsd_lightning.data.listing import name_excluded
from rgsd_lightning.data.records import IdentityRecord, read_manifest, write_manifest
from rgsd_lightning.data.sources import read_identity_folders
from rgsd_lightning.data.synthetic_set import image_path, manifest_path
from rgsd_lightning.io import atomic_folder, atomic_write_json

EPS = 0.02
"""Added to both blurred images: keeps the quotient finite in black regions (pixels in [0, 1])."""


def transfer_low_frequencies(train: np.ndarray, start: np.ndarray, sigma: float) -> np.ndarray:
    """``train`` (grey, in [0, 1]) with its low frequencies (a ``sigma``-px Gaussian) from ``start``."""
    if train.shape != start.shape or train.ndim != 2:
        raise ValueError(f"expected two grey images of one shape, got {train.shape} and {start.shape}")
    ratio = (gaussian_filter(start, sigma, mode="nearest") + EPS) / (
        gaussian_filter(train, sigma, mode="nearest") + EPS
    )
    return np.clip(train * ratio, 0.0, 1.0)


def training_images_in_turn(rows: Sequence[IdentityRecord], train: dict[str, list[str]]) -> list[str]:
    """Each row's training image: the rows of an identity, in seed order, take its training images in turn."""
    chosen = [""] * len(rows)
    used: Counter[str] = Counter()
    for i in sorted(range(len(rows)), key=lambda i: (rows[i].identity, int(rows[i].extra["seed"]))):
        paths = train[rows[i].identity]
        chosen[i] = paths[used[rows[i].identity] % len(paths)]
        used[rows[i].identity] += 1
    return chosen


def build(
    source: str | Path,
    target: str | Path,
    out: str | Path,
    *,
    exclude: Sequence[str] = (),
    train_per_identity: int = 1,
    sigma: float = 2.0,
) -> int:
    """Write the control set of the set ``source`` into ``out`` (atomically); returns its image count."""
    rows = read_manifest(manifest_path(source))
    missing = [r.path for r in rows if "init_image" not in r.extra]
    if missing:
        raise ValueError(f"{source}: {len(missing)} images have no init_image (not generated from images)")
    records = read_identity_folders(
        target,
        train_per_identity=train_per_identity,
        exclude=(lambda name: name_excluded(name, exclude)) if exclude else None,
    )
    train: dict[str, list[str]] = {}
    for r in records:
        if r.split == "train":
            train.setdefault(r.identity, []).append(r.path)
    unknown = sorted({r.identity for r in rows} - set(train))
    if unknown:
        raise ValueError(f"{source}: identities {unknown[:5]} have no training image in {target}")
    with Image.open(rows[0].path) as first:
        size = first.size[0]
    written = []
    with atomic_folder(out) as tmp:
        for r, train_image in zip(rows, training_images_in_turn(rows, train), strict=True):
            seed = int(r.extra["seed"])
            image = transfer_low_frequencies(
                load_grey(train_image, size), load_grey(r.extra["init_image"], size), sigma
            )
            rel = image_path(r.identity, seed)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image * 255).round().astype(np.uint8)).save(tmp / rel)
            extra = {
                "seed": seed,
                "init_image": r.extra["init_image"],
                "train_image": train_image,
                "control_of": str(source),
            }
            written.append(IdentityRecord(str(tmp / rel), r.identity, source="synthetic", extra=extra))
        write_manifest(tmp / "manifest.jsonl", written)
        atomic_write_json(
            tmp / "card.json",
            {
                "kind": "lowfreq_control",
                "source": str(source),
                "sigma": sigma,
                "train_per_identity": train_per_identity,
                "num_images": len(written),
            },
        )
    return len(written)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks lowfreq_control", description=__doc__.split("\n")[0]
    )
    p.add_argument("--run", required=True, help="study run folder holding the set stage")
    p.add_argument("--set", required=True, help="the generated-from-images set stage (e.g. k1_gen_sdedit40)")
    p.add_argument("--target", required=True, help="identity folders of the target")
    p.add_argument("--exclude", nargs="*", default=[], help="file-name patterns to leave out of the target")
    p.add_argument("--train-per-identity", type=int, default=1)
    p.add_argument("--sigma", type=float, default=2.0, help="Gaussian blur (pixels) of the low frequencies")
    p.add_argument("--out", required=True, help="folder of the control set")
    args = p.parse_args(argv)
    source = set_folder(args.run, args.set)
    n = build(
        source,
        args.target,
        args.out,
        exclude=args.exclude,
        train_per_identity=args.train_per_identity,
        sigma=args.sigma,
    )
    print(json.dumps({"control_set": args.out, "images": n, "source": str(source)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
