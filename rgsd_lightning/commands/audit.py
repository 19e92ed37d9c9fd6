"""``rgsd audit``: check a synthetic set for near copies of the real training images.

Reads the real TRAINING images of a dataset with the library's parsers, runs
:func:`rgsd_lightning.evaluation.privacy.audit_synthetic_set` and prints a short summary; the per-image
results go into the set's ``manifest.jsonl``, the summary into its ``card.json`` (``"audit"``) and the
closest pairs into ``audit_pairs.png``. ``--drop`` then removes the flagged images from the manifest.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rgsd_lightning.data.records import IdentityRecord

FORMATS = ("market1501", "cuhk03np", "identity_folders", "manifest", "toy_market", "toy_faces")


def _threshold(text: str) -> float | None:
    """A similarity threshold, or ``none`` / ``off`` to switch the criterion off."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rgsd audit``."""
    p = argparse.ArgumentParser(
        prog="rgsd audit",
        description="Audit a synthetic set for near copies of real training images (pixel space and, "
        "with --extractor, a recognizer's feature space). Writes the per-image results into the set's "
        "manifest.jsonl, a summary into card.json ('audit') and the closest pairs into audit_pairs.png.",
    )
    p.add_argument("--synthetic", required=True, help="synthetic set folder (manifest.jsonl + images/)")
    p.add_argument("--real", required=True, help="real dataset root (or manifest file for --format manifest)")
    p.add_argument("--format", default="market1501", choices=FORMATS, help="real dataset layout")
    p.add_argument("--cuhk03-variant", choices=("labeled", "detected"), help="cuhk03np: which boxes")
    p.add_argument(
        "--train-per-identity",
        type=int,
        help="identity folders: the first k images of each identity are the training split (default: all)",
    )
    p.add_argument(
        "--split-seed", type=int, help="identity folders: draw the k training images with this seed"
    )
    p.add_argument(
        "--extractor", help="recognizer export folder for the feature space (default: pixels only)"
    )
    p.add_argument(
        "--pixel-threshold", type=_threshold, default=0.95, help="absolute pixel similarity bar ('none': off)"
    )
    p.add_argument(
        "--feature-threshold",
        type=_threshold,
        default=None,
        help="absolute feature similarity bar (default none; ~0.5 for an SSCD-type copy detector)",
    )
    p.add_argument(
        "--relative-alpha",
        type=_threshold,
        default=0.5,
        help="relative criterion: distance below alpha x the baseline distance ('none': off)",
    )
    p.add_argument(
        "--baseline-quantile", type=float, default=0.99, help="baseline quantile of the relative bar"
    )
    p.add_argument("--batch-size", type=int, default=256, help="images decoded at a time")
    p.add_argument("--device", default=None, help="device of the extractor (e.g. cpu, cuda)")
    p.add_argument("--grid-pairs", type=int, default=16, help="pairs shown in audit_pairs.png")
    p.add_argument("--no-manifest", action="store_true", help="do not write the results into manifest.jsonl")
    p.add_argument("--drop", action="store_true", help="remove the flagged images from the manifest")
    p.add_argument("--move-rejected", action="store_true", help="with --drop: move them to rejected/")
    return p


def read_real_training(args: argparse.Namespace) -> list[IdentityRecord]:
    """The real training records named by ``--real`` / ``--format`` (and the split options)."""
    from rgsd_lightning.data import records, sources

    fmt, root = args.format, args.real
    if fmt in ("market1501", "toy_market"):
        return sources.read_market1501(root)["train"]
    if fmt == "cuhk03np":
        if args.cuhk03_variant is None:
            raise ValueError("--format cuhk03np needs --cuhk03-variant labeled|detected")
        return sources.read_cuhk03np(root, args.cuhk03_variant)["train"]
    if fmt in ("identity_folders", "toy_faces"):
        recs = sources.read_identity_folders(
            root, train_per_identity=args.train_per_identity, seed=args.split_seed
        )
        return [r for r in recs if r.split == "train"]
    if fmt == "manifest":
        path = Path(root)
        path = path / "manifest.jsonl" if path.is_dir() else path
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rgsd audit`` with ``argv`` (without the command name); returns the exit code."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from rgsd_lightning.evaluation.privacy import NearCopyThresholds, audit_synthetic_set, drop_flagged

    synthetic_dir = Path(args.synthetic)
    try:
        if args.move_rejected and not args.drop:
            raise ValueError("--move-rejected only makes sense with --drop")
        thresholds = NearCopyThresholds(
            pixel=args.pixel_threshold,
            feature=args.feature_threshold,
            relative_alpha=args.relative_alpha,
            baseline_quantile=args.baseline_quantile,
        )
        real = read_real_training(args)
        result = audit_synthetic_set(
            synthetic_dir,
            real,
            extractor=args.extractor,
            thresholds=thresholds,
            batch_size=args.batch_size,
            device=args.device,
            update_manifest=not args.no_manifest,
            grid_pairs=args.grid_pairs,
        )
        dropped = drop_flagged(synthetic_dir, result, move_files=args.move_rejected) if args.drop else None
    except (ValueError, FileNotFoundError, OSError, TypeError) as err:
        print(f"rgsd audit: error: {err}", file=sys.stderr)
        return 1
    print(format_summary(result.summary, synthetic_dir, dropped))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
