"""``python -m benchmarks coverage``: does a synthetic set cover the real images its identities' training
images do not?

Judge fidelity asks whether a sample looks like its identity, and a set of samples that all do can still add
nothing (faces_oracle_roundtrip.md: fidelity stays flat while the downstream gain falls from +20 points to
none). A recognizer gains from samples that resemble the identity's *unseen* images. This measures that
directly: 1-nearest-neighbour identification of the target's test images with its K training images per
identity as the gallery, then with a set's images added to the gallery under their identities. The gain in
accuracy is the share of test images for which a synthetic image of the right identity is the nearest thing
(minus those a wrong-identity synthetic image takes away): a label-aware recall of the test images.

Two spaces: the features of a recognizer trained on the K real images only (the study's real-only
recognizer, which never saw a test image; unit features, Euclidean distance), and pixels (the grey image at
the generator side). Images are squared to the generator side first, as the quality table does. With
``--run``, each set can name its study row (``NAME=PATH:ROW``): the measured downstream gain (mean over
seeds of the row minus ``--base`` with the same seed) sits beside the predicted one, with Spearman's rank
correlation over the sets that have both. Writes ``<out>/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from benchmarks.common import command_line, md_environment, md_table, publish, report_header, sample_batched
from benchmarks.novelty import grey_pixels
from rgsd_lightning.data.listing import name_excluded
from rgsd_lightning.data.records import read_manifest
from rgsd_lightning.data.sources import read_identity_folders
from rgsd_lightning.data.synthetic_set import manifest_path
from rgsd_lightning.evaluation.quality import coverage_gain

SPACES = ("recognizer", "pixels")


def measured_gain(run: str | Path, row: str, base: str, metric: str) -> dict[str, Any] | None:
    """Mean over the seeds both ran of ``<row>_s<seed>`` minus ``<base>_s<seed>`` (``metric`` of their
    ``stage.json``, in points), or None when no seed of the row has finished."""
    diffs = []
    for marker in sorted(Path(run).glob(f"{row}_s*/stage.json")):
        seed = marker.parent.name[len(row) + 2 :]
        other = Path(run) / f"{base}_s{seed}" / "stage.json"
        if not seed.isdigit() or not other.is_file():
            continue
        mine, theirs = (json.loads(p.read_text()).get("metrics", {}).get(metric) for p in (marker, other))
        if mine is not None and theirs is not None:
            diffs.append(100 * (mine - theirs))
    return {"mean": float(np.mean(diffs)), "seeds": len(diffs)} if diffs else None


@dataclass(frozen=True)
class Generated:
    """A set sampled in memory from a generator export: ``per_identity`` images of each of its identities,
    seeds 0.. in label order, with the given sampler, the generator on ``device``."""

    export: str
    method: str = "dpmsolver"
    steps: int = 25
    eta: float = 0.0
    guidance: float = 2.0
    per_identity: int = 10
    device: str = "cpu"

    def sample(self, size: int, channels: int) -> tuple[Any, list[str]]:
        """The images (N, C, size, size) in [-1, 1] and their identities."""
        from rgsd_lightning.diffusion.generator import DiTGenerator

        generator = DiTGenerator.from_pretrained(self.export).to(self.device).eval()
        if (generator.image_size, generator.channels) != (size, channels):
            raise ValueError(
                f"generator {self.export} draws {generator.channels}x{generator.image_size}px images, the "
                f"measure compares {channels}x{size}px: set --size / --channels"
            )
        labels = [i for i in range(generator.num_identities) for _ in range(self.per_identity)]
        images = sample_batched(
            generator,
            labels,
            list(range(len(labels))),
            batch_size=100,
            num_steps=self.steps,
            method=self.method,
            eta=self.eta,
            guidance_scale=self.guidance,
            clip_x0=True,
        )
        return images, [generator.identities[i] for i in labels]


def parse_generated(specs: Sequence[str], per_identity: int, device: str = "cpu") -> dict[str, Generated]:
    """``NAME=EXPORT`` or ``NAME=EXPORT@METHOD:STEPS:ETA:GUIDANCE`` -> {name: Generated} (sampled on
    ``device``)."""
    out: dict[str, Generated] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        export, _, sampler = rest.partition("@")
        parts = sampler.split(":") if sampler else []
        if not sep or not name or not export or len(parts) not in (0, 4):
            raise ValueError(f"--generate entry {spec!r}: expected NAME=EXPORT[@METHOD:STEPS:ETA:GUIDANCE]")
        if parts:
            method, steps, eta, guidance = parts
            sampler = (method, int(steps), float(eta), float(guidance))
            out[name] = Generated(export, *sampler, per_identity=per_identity, device=device)
        else:
            out[name] = Generated(export, per_identity=per_identity, device=device)
    return out


@dataclass(frozen=True)
class Reference:
    """The real side of the measure: the target's training images (the gallery) and test images (the
    queries) of ``train_per_identity`` per identity, in the recognizer's features and in grey pixels."""

    extractor: Any
    train_labels: list[str]
    test_labels: list[str]
    anchors: dict[str, np.ndarray]
    queries: dict[str, np.ndarray]
    size: int
    channels: int

    @classmethod
    def load(
        cls,
        extractor_dir: str | Path,
        target: str | Path,
        *,
        train_per_identity: int,
        size: int = 32,
        channels: int = 1,
        exclude: Sequence[str] = (),
    ) -> Reference:
        """Read the target (file names matching ``exclude`` left out), split it and embed both parts."""
        from rgsd_lightning.backbones import FeatureExtractor
        from rgsd_lightning.evaluation.quality import load_images

        extractor = FeatureExtractor.from_export(extractor_dir).eval()
        skip = (lambda name: name_excluded(name, exclude)) if exclude else None
        records = read_identity_folders(target, train_per_identity=train_per_identity, exclude=skip)
        train = [r for r in records if r.split == "train"]
        test = [r for r in records if r.split != "train"]
        if not test:
            raise ValueError(f"{target}: no test image at train_per_identity={train_per_identity}")
        ref = cls(extractor, [r.identity for r in train], [r.identity for r in test], {}, {}, size, channels)
        ref.anchors.update(ref.spaces(load_images(train, size, channels)))
        ref.queries.update(ref.spaces(load_images(test, size, channels)))
        return ref

    def spaces(self, images: Any) -> dict[str, np.ndarray]:
        """Images (N, C, size, size) in [-1, 1] in both spaces."""
        from rgsd_lightning.evaluation.quality import embed

        return {"recognizer": embed(self.extractor, images), "pixels": grey_pixels(images)}

    def gain(self, space: str, feats: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
        """:func:`coverage_gain` of rows ``feats`` (in ``space``) labelled ``labels``."""
        return coverage_gain(
            self.anchors[space], self.train_labels, feats, labels, self.queries[space], self.test_labels
        )


def measure(
    extractor_dir: str | Path,
    target: str | Path,
    sets: dict[str, str | Path | Generated],
    *,
    train_per_identity: int,
    size: int = 32,
    channels: int = 1,
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """{set: {"images": n, "queries": m, <space>: coverage_gain(...)}} for every set (a set folder, or a
    set sampled in memory) and both spaces."""
    from rgsd_lightning.evaluation.quality import load_images

    ref = Reference.load(
        extractor_dir,
        target,
        train_per_identity=train_per_identity,
        size=size,
        channels=channels,
        exclude=exclude,
    )
    known = set(ref.train_labels)
    results: dict[str, Any] = {}
    for name, source in sets.items():
        if isinstance(source, Generated):
            images, labels = source.sample(size, channels)
            feats = ref.spaces(images)
        else:
            synthetic = read_manifest(manifest_path(source))
            feats, labels = (
                ref.spaces(load_images(synthetic, size, channels)),
                [r.identity for r in synthetic],
            )
        unknown = sorted(set(labels) - known)
        if unknown:
            raise ValueError(f"synthetic set {name}: identities {unknown[:5]} are not target identities")
        results[name] = {"images": len(labels), "queries": len(ref.test_labels)}
        for space in SPACES:
            results[name][space] = ref.gain(space, feats[space], labels)
    return results


def parse_sets(specs: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    """``NAME=PATH`` or ``NAME=PATH:ROW`` -> {name: (path, row or None)}."""
    out: dict[str, tuple[str, str | None]] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"--sets entry {spec!r}: expected NAME=PATH or NAME=PATH:ROW")
        path, _, row = rest.partition(":")
        out[name] = (path, row or None)
    return out


def without_note(settings: dict[str, Any]) -> str:
    """ " (without PATTERNS)" for a report whose settings left target files out, else ""."""
    patterns = settings.get("exclude") or []
    return f" (without {', '.join(patterns)})" if patterns else ""


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    headers = ["set", "images"]
    for space in SPACES:
        headers += [f"{space}: 1-NN % real only", f"{space}: with the set", f"{space}: gain"]
    headers += ["recognizer: gained", "recognizer: taken", "measured gain (points)"]
    table = []
    for name, row in report["results"].items():
        cells = [name, row["images"]]
        for space in SPACES:
            r = row[space]
            cells += [f"{100 * r['before']:.1f}", f"{100 * r['after']:.1f}", f"{100 * r['gain']:+.1f}"]
        r = row["recognizer"]
        cells += [f"{100 * r['gained']:+.1f}", f"{-100 * r['taken']:+.1f}"]
        m = row.get("measured")
        cells.append(f"{m['mean']:+.2f} ({m['seeds']} seeds)" if m else "n/a")
        table.append(cells)
    lines = [
        "# Coverage: do the sets cover the test images the training images do not?\n\n",
        md_environment(report["environment"]).rstrip(),
        f"\n\nCommand: `{report['command']}`\n\n",
        f"Target {s['target']}{without_note(s)}, {s['train_per_identity']} training image(s) per identity "
        "(the gallery), the "
        f"rest the queries; recognizer {s['extractor']} (trained on the training images only). 1-NN: share "
        "of the test images whose nearest gallery image has their identity, before and after the set's "
        "images join the gallery; gained / taken: test images a sample of their own identity becomes nearest "
        "to / a sample of another identity takes from theirs (gain = gained - taken). Measured gain: the "
        "set's study row minus "
        f"{s['base'] or 'n/a'} with the same seed, mean over seeds ({s['metric']}, run {s['run']}).\n\n",
        md_table(headers, table),
    ]
    for space, corr in report.get("spearman", {}).items():
        lines.append(f"\n\nSpearman's rho, predicted ({space}) vs measured gain over {corr['sets']} sets: ")
        lines.append(f"{corr['rho']:+.2f}")
    return "".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks coverage", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help="identity folders of the target")
    p.add_argument("--train-per-identity", type=int, required=True)
    p.add_argument(
        "--exclude", nargs="*", default=[], help="file-name patterns of target images to leave out"
    )
    p.add_argument("--extractor", required=True, help="recognizer export trained on the training images only")
    p.add_argument("--sets", nargs="*", default=[], help="NAME=PATH or NAME=PATH:ROW (PATH: a set folder)")
    p.add_argument(
        "--generate",
        nargs="*",
        default=[],
        help="NAME=EXPORT[@METHOD:STEPS:ETA:GUIDANCE]: a set sampled in memory (default dpmsolver:25:0:2)",
    )
    p.add_argument("--per-identity", type=int, default=10, help="images per identity of a --generate set")
    p.add_argument("--device", default="cpu", help="where --generate sets are sampled (e.g. cuda)")
    p.add_argument("--run", default=None, help="study run folder of the rows (for the measured gain)")
    p.add_argument("--base", default=None, help="the row the measured gain is against (e.g. k3_real)")
    p.add_argument("--metric", default="test/id_acc")
    p.add_argument("--size", type=int, default=32, help="generator side")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", required=True)
    args = p.parse_args(argv)
    if (args.run is None) != (args.base is None):
        p.error("--run and --base go together")
    sets = parse_sets(args.sets)
    generated = parse_generated(args.generate, args.per_identity, args.device)
    if not sets and not generated:
        p.error("give --sets or --generate")
    clash = sorted(set(sets) & set(generated))
    if clash:
        p.error(f"set names {clash} appear in both --sets and --generate")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    report = report_header("coverage", False, command_line("coverage", argv), settings)
    report["results"] = measure(
        args.extractor,
        args.target,
        {**{name: path for name, (path, _) in sets.items()}, **generated},
        train_per_identity=args.train_per_identity,
        size=args.size,
        channels=args.channels,
        exclude=args.exclude,
    )
    if args.run:
        for name, (_, row) in sets.items():
            if row:
                report["results"][name]["measured"] = measured_gain(args.run, row, args.base, args.metric)
        both = [r for r in report["results"].values() if r.get("measured")]
        if len(both) >= 3:
            report["spearman"] = {}
            for space in SPACES:
                rho = stats.spearmanr([r[space]["gain"] for r in both], [r["measured"]["mean"] for r in both])
                report["spearman"][space] = {"rho": float(rho.statistic), "sets": len(both)}
    publish(args.out, args.name, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
