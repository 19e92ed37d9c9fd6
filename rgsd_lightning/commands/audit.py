"""``rgsd audit``: check a synthetic set for near copies of the real training images.

Reads the real TRAINING images of a dataset with the library's parsers, runs
:func:`rgsd_lightning.evaluation.privacy.audit_synthetic_set` and prints a short summary; the per-image
results go into the set's ``manifest.jsonl``, the summary into its ``card.json`` (``"audit"``) and the
closest pairs into ``audit_pairs.png``. ``--drop`` then removes the flagged images from the manifest.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

from rgsd_lightning.commands.parser import run_command
from rgsd_lightning.data.records import IdentityRecord

Format = Literal["market1501", "cuhk03np", "identity_folders", "manifest", "toy_market", "toy_faces"]
FORMATS = get_args(Format)
Threshold = float | Literal["none", "off"] | None
"""A similarity bar, or ``none`` / ``off`` (or ``null``) to switch the criterion off."""


def read_real_training(
    root: str,
    fmt: str,
    cuhk03_variant: str | None = None,
    train_per_identity: int | None = None,
    split_seed: int | None = None,
) -> list[IdentityRecord]:
    """The real training records of the dataset at ``root`` in layout ``fmt`` (and the split options)."""
    from rgsd_lightning.data import records, sources, synthetic_set

    if fmt in ("market1501", "toy_market"):
        return sources.read_market1501(root)["train"]
    if fmt == "cuhk03np":
        if cuhk03_variant is None:
            raise ValueError("--format cuhk03np needs --cuhk03-variant labeled|detected")
        return sources.read_cuhk03np(root, cuhk03_variant)["train"]
    if fmt in ("identity_folders", "toy_faces"):
        recs = sources.read_identity_folders(root, train_per_identity=train_per_identity, seed=split_seed)
        return [r for r in recs if r.split == "train"]
    if fmt == "manifest":
        path = synthetic_set.manifest_path(root)
        recs = [r for r in records.read_manifest(path) if r.split == "train" and r.source == "real"]
        if not recs:
            raise ValueError(f"{path}: no real records of the train split")
        return recs
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def format_summary(summary: dict, synthetic_dir: Path, dropped: list[str] | None = None) -> str:
    """A few human-readable lines about an audit summary."""
    th = summary["thresholds"]
    lines = [
        f"audited {summary['num_images']} synthetic images against {summary['num_real_images']} real "
        f"training images ({summary['num_real_identities']} identities)",
        f"near copies: {summary['num_flagged']} ({100 * summary['fraction_flagged']:.2f}%)  by criterion: "
        + ", ".join(f"{k} {v}" for k, v in summary["flagged_by"].items() if th.get(k) is not None),
        "similarity bars: "
        + ", ".join(
            f"{k} {_fmt(th.get(k))}" for k in ("pixel", "pixel_relative", "feature", "feature_relative")
        ),
    ]
    for space, stats in summary["synthetic_nn"].items():
        base = summary["baseline"][space]["same_identity"]
        lines.append(
            f"{space}: synthetic->nearest real median {_fmt(stats.get('q50'))} max {_fmt(stats.get('max'))}; "
            f"real->nearest same-identity real median {_fmt(base.get('q50'))} q99 {_fmt(base.get('q99'))}"
        )
    worst = [w for w in summary["worst_identities"] if w["fraction_flagged"] > 0][:5]
    if worst:
        lines.append(
            "worst identities: "
            + ", ".join(f"{w['identity']} ({100 * w['fraction_flagged']:.0f}%)" for w in worst)
        )
    lines.append(f"card: {synthetic_dir / 'card.json'} ('audit')")
    if summary.get("grid"):
        lines.append(f"closest pairs: {synthetic_dir / summary['grid']}")
    if dropped is not None:
        lines.append(f"dropped {len(dropped)} flagged images from {synthetic_dir / 'manifest.jsonl'}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "off" if value is None else f"{value:.3f}"


def _bar(value: Threshold) -> float | None:
    return None if isinstance(value, str) else value


def command(
    synthetic: str,
    real: str,
    format: Format = "market1501",
    cuhk03_variant: Literal["labeled", "detected"] | None = None,
    train_per_identity: int | None = None,
    split_seed: int | None = None,
    extractor: str | None = None,
    pixel_threshold: Threshold = 0.95,
    feature_threshold: Threshold = None,
    relative_alpha: Threshold = 0.5,
    baseline_quantile: float = 0.99,
    batch_size: int = 256,
    device: str | None = None,
    grid_pairs: int = 16,
    no_manifest: bool = False,
    drop: bool = False,
    move_rejected: bool = False,
) -> int:
    """Audit a synthetic set for near copies of real training images (pixel space and, with --extractor, a
    recognizer's feature space). Writes the per-image results into the set's manifest.jsonl, a summary into
    card.json ('audit') and the closest pairs into audit_pairs.png.

    Args:
        synthetic: synthetic set folder (manifest.jsonl + images/).
        real: real dataset root (or manifest file for --format manifest).
        format: real dataset layout.
        cuhk03_variant: cuhk03np: which boxes.
        train_per_identity: identity folders: the first k images of each identity are the training split
            (default: all).
        split_seed: identity folders: draw the k training images with this seed.
        extractor: recognizer export folder for the feature space (default: pixels only).
        pixel_threshold: absolute pixel similarity bar ('none': off).
        feature_threshold: absolute feature similarity bar (default none; ~0.5 for an SSCD-type copy
            detector).
        relative_alpha: relative criterion: distance below alpha x the baseline distance ('none': off).
        baseline_quantile: baseline quantile of the relative bar.
        batch_size: images decoded at a time.
        device: device of the extractor (e.g. cpu, cuda).
        grid_pairs: pairs shown in audit_pairs.png.
        no_manifest: do not write the results into manifest.jsonl.
        drop: remove the flagged images from the manifest.
        move_rejected: with --drop: move them to rejected/.
    """
    from rgsd_lightning.data.synthetic_set import drop_flagged
    from rgsd_lightning.evaluation.privacy import NearCopyThresholds, audit_synthetic_set

    synthetic_dir = Path(synthetic)
    try:
        if move_rejected and not drop:
            raise ValueError("--move-rejected only makes sense with --drop")
        thresholds = NearCopyThresholds(
            pixel=_bar(pixel_threshold),
            feature=_bar(feature_threshold),
            relative_alpha=_bar(relative_alpha),
            baseline_quantile=baseline_quantile,
        )
        records = read_real_training(real, format, cuhk03_variant, train_per_identity, split_seed)
        result = audit_synthetic_set(
            synthetic_dir,
            records,
            extractor=extractor,
            thresholds=thresholds,
            batch_size=batch_size,
            device=device,
            update_manifest=not no_manifest,
            grid_pairs=grid_pairs,
        )
        dropped = drop_flagged(synthetic_dir, result, move_files=move_rejected) if drop else None
    except (ValueError, FileNotFoundError, OSError, TypeError) as err:
        print(f"rgsd audit: error: {err}", file=sys.stderr)
        return 1
    print(format_summary(result.summary, synthetic_dir, dropped))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``rgsd audit`` with ``argv`` (without the command name); returns the exit code."""
    return run_command(command, argv, "rgsd audit")


if __name__ == "__main__":
    raise SystemExit(main())
