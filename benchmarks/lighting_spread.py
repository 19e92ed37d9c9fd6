"""``python -m benchmarks lighting_spread``: do synthetic sets vary lighting as the test images do?

A diagnostic for targets whose test images differ from the training ones in lighting (Extended Yale B). Per
image, on the grey image resized to ``size``: its mean level (brightness), its standard deviation (RMS
contrast), and its left-half minus right-half mean (how far the light comes from one side). Per source, the
spread of each statistic within an identity (standard deviation over the identity's images), averaged over
the identities:

* the held-out real test images of the target (the variation a recognizer must cope with);
* the training image under ``transforms.PhotometricJitter`` (the real-only augmentation);
* each synthetic set of a study run, plus each statistic's mean distance to the identity's training image.

Which images train is decided as the study's datamodule decides it (``sources.read_identity_folders`` with
the same ``train_per_identity`` and ``exclude``). Writes ``<out>/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common import command_line, md_environment, md_table, publish, report_header
from rgsd_lightning.data.listing import name_excluded
from rgsd_lightning.data.records import IdentityRecord, read_manifest
from rgsd_lightning.data.sources import read_identity_folders
from rgsd_lightning.data.synthetic_set import manifest_path
from rgsd_lightning.data.transforms import PhotometricJitter

STATS = ("brightness", "contrast", "left-right")


def lighting_stats(image: np.ndarray) -> np.ndarray:
    """(brightness, RMS contrast, left-half minus right-half mean) of a grey (H, W) image in [0, 1]; the
    middle column of an odd width belongs to neither half."""
    if image.ndim != 2:
        raise ValueError(f"expected a grey (H, W) image, got shape {image.shape}")
    half = image.shape[1] // 2
    left, right = image[:, :half], image[:, image.shape[1] - half :]
    return np.array([image.mean(), image.std(), left.mean() - right.mean()])


def spread(stats_by_identity: dict[str, np.ndarray]) -> np.ndarray:
    """Each statistic's standard deviation within an identity (population, over its images), averaged over
    the identities with at least two images."""
    per_identity = [s.std(axis=0) for s in stats_by_identity.values() if len(s) >= 2]
    if not per_identity:
        raise ValueError("no identity has two images to measure a spread")
    return np.mean(per_identity, axis=0)


def load_grey(path: str | Path, size: int) -> np.ndarray:
    """An image file as grey (size, size) floats in [0, 1] (bicubic, as the recognizers' transforms)."""
    with Image.open(path) as img:
        grey = img.convert("L").resize((size, size), Image.BICUBIC)
    return np.asarray(grey, dtype=np.float64) / 255.0


def _grey_by_identity(records: Sequence[IdentityRecord], size: int) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for r in records:
        out.setdefault(r.identity, []).append(load_grey(r.path, size))
    return out


def _stats_by_identity(images: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.stack([lighting_stats(x) for x in group]) for name, group in images.items()}


def measure(
    target: str | Path,
    sets: dict[str, str | Path],
    *,
    train_per_identity: int = 1,
    exclude: Sequence[str] = (),
    size: int = 32,
    photometric: float = 0.4,
    draws: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """The rows of the report: {source: {"spread": [...], "distance": [...] or None, "identities": n}}."""
    records = read_identity_folders(
        target,
        train_per_identity=train_per_identity,
        exclude=(lambda name: name_excluded(name, exclude)) if exclude else None,
    )
    train_images = _grey_by_identity([r for r in records if r.split == "train"], size)
    train = _stats_by_identity(train_images)
    test = _stats_by_identity(_grey_by_identity([r for r in records if r.split == "test"], size))
    rows: dict[str, Any] = {"test images (real, held out)": {"spread": spread(test), "identities": len(test)}}
    torch.manual_seed(seed)
    jitter = PhotometricJitter(photometric)
    jittered = {
        name: [jitter(torch.from_numpy(x)[None])[0].numpy() for x in group for _ in range(draws)]
        for name, group in train_images.items()
    }
    rows[f"training image + photometric jitter {photometric}"] = {
        "spread": spread(_stats_by_identity(jittered)),
        "identities": len(jittered),
    }
    for name, folder in sets.items():
        synthetic = _stats_by_identity(_grey_by_identity(read_manifest(manifest_path(folder)), size))
        unknown = sorted(set(synthetic) - set(train))
        if unknown:
            raise ValueError(f"synthetic set {folder}: identities {unknown[:5]} are not target identities")
        distance = np.mean(
            [np.abs(s - train[k].mean(axis=0)).mean(axis=0) for k, s in synthetic.items()], axis=0
        )
        rows[f"synthetic: {name}"] = {
            "spread": spread(synthetic),
            "distance": distance,
            "identities": len(synthetic),
        }
    return rows


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    body = [
        "# Lighting spread: synthetic sets against the target's test images\n\n",
        md_environment(report["environment"]),
        f"\nCommand: `{report['command']}`\n\n",
        f"Target {s['target']} ({s['train_per_identity']} training image(s) per identity), grey images at "
        f"{s['size']}x{s['size']}. Spread: standard deviation within an identity, averaged over identities; "
        "distance: a synthetic image's mean absolute difference from its identity's training image.\n\n",
    ]
    headers = ["source", "identities", *(f"spread: {k}" for k in STATS), *(f"distance: {k}" for k in STATS)]
    table = []
    for name, row in report["results"].items():
        dist = row.get("distance")
        cells = [f"{v:.3f}" for v in row["spread"]] + (
            [f"{v:.3f}" for v in dist] if dist is not None else ["-"] * 3
        )
        table.append([name, row["identities"], *cells])
    return "".join(body) + md_table(headers, table)


def set_folder(run: str | Path, stage: str) -> Path:
    """The synthetic set a generation stage of a run wrote: its ``stage.json`` output (which points into the
    original run for a stage the run reused), else ``<run>/<stage>/synthetic``, else ``<run>/<stage>`` (a
    set written into the run folder outside the pipeline, e.g. by ``lowfreq_control``)."""
    marker = Path(run) / stage / "stage.json"
    output = json.loads(marker.read_text()).get("output") if marker.is_file() else None
    if output:
        return Path(output)
    nested = Path(run) / stage / "synthetic"
    return nested if nested.is_dir() else Path(run) / stage


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks lighting_spread", description=__doc__.split("\n")[0]
    )
    p.add_argument("--target", default="../shared/data/CroppedYale", help="identity folders of the target")
    p.add_argument("--run", default="runs/utility/faces_recognizer_budget_k1_yale", help="study run folder")
    p.add_argument(
        "--sets",
        nargs="+",
        default=[
            "k1_gen_cold",
            "k1_gen_rl_full",
            "k1_gen_rl_windowed",
            "k1_gen_rl_full_unguided",
            "k1_gen_sdedit60",
            "k1_gen_sdedit80",
            "lowfreq_utk",
        ],
        help="synthetic-set stages of the run",
    )
    p.add_argument("--exclude", nargs="*", default=["*_Ambient*"], help="file-name patterns to leave out")
    p.add_argument("--train-per-identity", type=int, default=1)
    p.add_argument("--size", type=int, default=32, help="side of the grey image the statistics are taken on")
    p.add_argument("--photometric", type=float, default=0.4, help="jitter strength of the real-only row")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="lighting_spread_yale")
    args = p.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    sets = {name: set_folder(args.run, name) for name in args.sets}
    report = report_header("lighting_spread", False, command_line("lighting_spread", argv), settings)
    report["results"] = measure(
        args.target,
        sets,
        train_per_identity=args.train_per_identity,
        exclude=args.exclude,
        size=args.size,
        photometric=args.photometric,
    )
    publish(args.out, args.name, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
