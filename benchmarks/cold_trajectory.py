"""``python -m benchmarks cold_trajectory``: coverage along a cold start. Does any point of it draw images
that cover the test images its identities' training images do not?

Every CPU generator's final samples take test images away from their identities (``coverage_*.md``). A
cold start moves from the prior (the identities' label rows fresh: any face, any identity) to the few
training images (near copies of them); new content of a person, if it ever appears, appears in between.
This reruns a finished cold-start stage from its saved ``config.yaml`` (the same data, seed, optimiser and
EMA; a constant learning rate, so stopping early does not change the steps before), exports the generator
at the given steps (an export draws no random numbers, so the rerun is the stage's own training whatever
the steps; reports written before 2026-12-05 were not: each export changed the random draws after it),
and measures each export's in-memory samples as ``python -m benchmarks coverage``
does, with the gain split into its two parts and a training-data-only filter:

* ``gained``: test images whose nearest gallery image was of another identity and becomes a sample of
  their own; ``taken``: those the samples turn wrong; the gain is their difference;
* ``fidelity``: share of samples whose nearest *training* image (recognizer space) is of their own
  identity - what a filter that knows only the training images can check;
* ``filtered``: the gain of the samples that pass that check (the best a perfect static filter on the
  training images can do with this set; selection sees even less).
* ``distance``: the samples' median distance to their identity's nearest training image over that of the
  test images (1x: as far as new real images; below: towards copies).

Writes ``<out>/<name>.json`` and ``.md``; the exports stay in ``--work`` (delete them after).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from lightning.pytorch.callbacks import Callback

from benchmarks.common import command_line, md_environment, md_table, publish, report_header, write_report
from benchmarks.coverage import Generated, Reference, without_note
from benchmarks.novelty import nearest_distance
from rgsd_lightning.evaluation.quality import nearest_rows


def fidelity_mask(
    train: np.ndarray, train_labels: Sequence[str], extra: np.ndarray, labels: Sequence[str]
) -> np.ndarray:
    """Per extra row: is its nearest training row of its own label?"""
    return np.asarray(train_labels)[nearest_rows(train, extra)] == np.asarray(labels)


def distance_ratio(
    train: np.ndarray,
    train_labels: Sequence[str],
    extra: np.ndarray,
    labels: Sequence[str],
    test: np.ndarray,
    test_labels: Sequence[str],
) -> float:
    """Median distance of the extra rows to their own identity's nearest training row, over the same median
    of the test rows: 1 where samples sit as far from the training images as new real images do, below 1
    nearer (towards copies), above 1 farther."""
    mine = nearest_distance(extra, labels, train, train_labels)
    real = nearest_distance(test, test_labels, train, train_labels)
    return float(np.median(mine) / np.median(real))


class ExportAtSteps(Callback):
    """Export the module at the given optimiser steps (0: before the first update) into
    ``root/step_NNNNN``; ``done`` maps each step to its export."""

    def __init__(self, steps: Sequence[int], root: Path) -> None:
        self.steps, self.root, self.done = sorted(set(steps)), root, {}

    def _maybe(self, trainer: Any, pl_module: Any) -> None:
        step = trainer.global_step
        if step in self.steps and step not in self.done:
            self.done[step] = pl_module.export(self.root / f"step_{step:05d}")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._maybe(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._maybe(trainer, pl_module)


def run_cold_start(stage: Path, steps: Sequence[int], work: Path) -> dict[int, Path]:
    """Rerun the cold-start stage ``stage`` (its ``config.yaml``) up to ``max(steps)``, exporting at each."""
    from rgsd_lightning.cli import build_cli

    config = yaml.safe_load((stage / "config.yaml").read_text())
    model = config["model"]["init_args"]
    if model.get("lr_scheduler") is not None or model.get("warmup_steps"):
        raise ValueError(
            f"{stage}: a learning-rate schedule would differ when stopped early; give a stage at a "
            "constant rate"
        )
    bound = config["trainer"].get("max_steps")
    if not isinstance(bound, int) or bound < 0:
        raise ValueError(f"{stage}: trainer.max_steps is {bound!r}; give a stage bounded by optimiser steps")
    if max(steps) > bound:
        raise ValueError(f"steps {max(steps)} beyond the stage's max_steps {bound}")
    if min(steps) < 0:
        raise ValueError(f"steps must be >= 0, got {min(steps)}")
    config["trainer"].update(
        max_steps=max(steps), callbacks=[], default_root_dir=str(work), enable_checkpointing=False
    )
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "config.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = build_cli(["--config", str(cfg)], run=False)
    callback = ExportAtSteps(steps, work)
    cli.trainer.callbacks.append(callback)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    missing = sorted(set(steps) - set(callback.done))
    if missing:
        raise RuntimeError(f"no export at steps {missing} (the run stopped at {cli.trainer.global_step})")
    return dict(sorted(callback.done.items()))


def measure_exports(
    exports: dict[int, Path],
    ref: Reference,
    guidances: Sequence[float],
    per_identity: int,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """One row per (step, guidance): the samples' split gain in both spaces, fidelity and filtered gain."""
    rows = []
    for step, export in exports.items():
        for guidance in guidances:
            sampled = Generated(str(export), guidance=guidance, per_identity=per_identity, device=device)
            images, names = sampled.sample(ref.size, ref.channels)
            feats = ref.spaces(images)
            keep = fidelity_mask(ref.anchors["recognizer"], ref.train_labels, feats["recognizer"], names)
            kept = [n for n, k in zip(names, keep, strict=True) if k]
            distance = distance_ratio(
                ref.anchors["recognizer"],
                ref.train_labels,
                feats["recognizer"],
                names,
                ref.queries["recognizer"],
                ref.test_labels,
            )
            rows.append(
                {
                    "step": step,
                    "guidance": guidance,
                    "images": len(names),
                    "queries": len(ref.test_labels),
                    "recognizer": ref.gain("recognizer", feats["recognizer"], names),
                    "pixels": ref.gain("pixels", feats["pixels"], names),
                    "fidelity": float(keep.mean()),
                    "filtered": ref.gain("recognizer", feats["recognizer"][keep], kept),
                    "distance": distance,
                }
            )
            print(f"step {step} w{guidance:g}: {rows[-1]['recognizer']} fidelity {rows[-1]['fidelity']:.3f}")
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Per guidance scale: the recognizer-space gain, its gained and taken parts and the fidelity (points)
    against the cold start's step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    guidances = sorted({r["guidance"] for r in rows})
    fig, axes = plt.subplots(1, len(guidances), figsize=(4 * len(guidances), 3.2), sharey=True, squeeze=False)
    for ax, guidance in zip(axes[0], guidances, strict=True):
        mine = [r for r in rows if r["guidance"] == guidance]
        steps = [r["step"] for r in mine]
        curves = {
            "gain": [100 * r["recognizer"]["gain"] for r in mine],
            "gained": [100 * r["recognizer"]["gained"] for r in mine],
            "-taken": [-100 * r["recognizer"]["taken"] for r in mine],
            "filtered gain": [100 * r["filtered"]["gain"] for r in mine],
        }
        for label, values in curves.items():
            ax.plot(steps, values, marker="o", label=label)
        ax.axhline(0.0, color="grey", lw=0.8)
        twin = ax.twinx()
        twin.plot(steps, [100 * r["fidelity"] for r in mine], color="black", ls=":", label="fidelity %")
        twin.set_ylim(0, 100)
        ax.set_title(f"guidance {guidance:g}")
        ax.set_xlabel("cold-start step")
    axes[0][0].set_ylabel("test images, points")
    twin.set_ylabel("fidelity %")
    handles = axes[0][0].get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    fig.legend(handles, [h.get_label() for h in handles], loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    pts = lambda v: f"{100 * v:+.1f}"  # noqa: E731
    table = md_table(
        [
            "step",
            "guidance",
            "images",
            "fidelity %",
            "distance",
            "1-NN % real only",
            "gained",
            "taken",
            "gain",
            "filtered: images",
            "filtered: gain",
            "pixels: gain",
        ],
        [
            [
                r["step"],
                f"{r['guidance']:g}",
                r["images"],
                f"{100 * r['fidelity']:.1f}",
                f"{r['distance']:.2f}x" if "distance" in r else "-",
                f"{100 * r['recognizer']['before']:.1f}",
                pts(r["recognizer"]["gained"]),
                pts(-r["recognizer"]["taken"]),
                pts(r["recognizer"]["gain"]),
                round(r["fidelity"] * r["images"]),
                pts(r["filtered"]["gain"]),
                pts(r["pixels"]["gain"]),
            ]
            for r in report["results"]
        ],
    )
    return "\n".join(
        [
            "# Coverage along a cold start",
            "",
            md_environment(report["environment"]),
            "",
            f"Command: `{report['command']}`",
            "",
            f"The cold-start stage `{s['stage']}` rerun from its config.yaml, its generator exported at "
            f"steps {s['steps']}; each export samples {s['per_identity']} images per identity "
            f"(DPM-Solver++, 25 steps) at each guidance scale. Target {s['target']}{without_note(s)}, "
            f"{s['train_per_identity']} training image(s) per identity (the gallery), the rest the queries; "
            f"recognizer `{s['extractor']}` (trained on the training images only). Gained / taken: points of "
            "test images whose nearest gallery image turns to / from their own identity when the samples "
            "join the gallery; gain = gained - taken. Fidelity: share of samples whose nearest training "
            "image is of their own identity. Distance: the samples' median distance to their identity's "
            "nearest training image over the test images' (1x: as far as new real images, below: nearer). "
            "Filtered: the gain of the samples with fidelity only (a filter that knows the training images "
            "alone).",
            "",
            table,
            "",
            f"![gain, gained, taken and fidelity along the cold start]({report['figure']})",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks cold_trajectory", description=__doc__.split("\n")[0]
    )
    p.add_argument("--stage", required=True, help="a finished cold-start stage folder (with config.yaml)")
    p.add_argument(
        "--steps", required=True, help="comma-separated optimiser steps to export at (0: the start)"
    )
    p.add_argument("--work", required=True, help="folder for the rerun and its exports")
    p.add_argument("--target", required=True, help="identity folders of the target")
    p.add_argument("--train-per-identity", type=int, required=True)
    p.add_argument(
        "--exclude", nargs="*", default=[], help="file-name patterns of target images to leave out"
    )
    p.add_argument("--extractor", required=True, help="recognizer export trained on the training images only")
    p.add_argument("--guidance", default="2,4", help="comma-separated guidance scales")
    p.add_argument("--per-identity", type=int, default=10)
    p.add_argument("--device", default="cpu", help="where the exports sample (e.g. cuda)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", required=True)
    args = p.parse_args(argv)
    steps = sorted({int(s) for s in args.steps.split(",")})
    guidances = [float(g) for g in args.guidance.split(",")]
    from rgsd_lightning.diffusion.generator import DiTGenerator

    exports = run_cold_start(Path(args.stage), steps, Path(args.work))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    settings["steps"] = steps
    report = report_header("cold_trajectory", False, command_line("cold_trajectory", argv), settings)
    first = DiTGenerator.from_pretrained(next(iter(exports.values())))  # the geometry its samples have
    ref = Reference.load(
        args.extractor,
        args.target,
        train_per_identity=args.train_per_identity,
        size=first.image_size,
        channels=first.channels,
        exclude=args.exclude,
    )
    report["results"] = []
    for step, export in exports.items():  # published after each step: a run cut short keeps what it measured
        report["results"] += measure_exports({step: export}, ref, guidances, args.per_identity, args.device)
        report["figure"] = plot(report["results"], Path(args.out) / f"{args.name}.png").name
        write_report(args.out, args.name, report, markdown(report))
    publish(args.out, args.name, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
