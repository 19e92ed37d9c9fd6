"""``python -m benchmarks train_fit``: how well a study's recognizers fit their own training images.

A diagnostic for an augmentation that costs accuracy. A regulariser such as Random Erasing helps a
recognizer that fits its training data and generalises poorly; it costs one that cannot yet fit it. Per
finished recognizer stage of a run folder:

* the export's features of the stage's real training images (the datamodule its ``stage.json`` records,
  the recognizer's test transform);
* their leave-one-out rank-1: the share of training images whose nearest other training image (cosine)
  has their identity. Images of identities with a single training image are not queries;
* beside it, the stage's test metric and its number of epochs.

Stages are grouped into rows by name without the ``_s<seed>`` suffix, and each row gets the mean and std
over seeds. Writes ``<out>/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import command_line, md_environment, md_table, publish, report_header

SEED = re.compile(r"^(?P<row>.+)_s(?P<seed>\d+)$")


def leave_one_out_rank1(features: np.ndarray, labels: Sequence[str]) -> float:
    """Share of rows whose nearest other row (cosine similarity) has the same label; rows whose label
    no other row has are not queries. Raises when no row is a query."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != len(labels):
        raise ValueError(f"features {x.shape} do not match {len(labels)} labels")
    if not np.isfinite(x).all():
        raise ValueError("features hold NaN or infinite values")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    same = labels[:, None] == labels[None, :]
    queries = same.sum(axis=1) > 1  # the diagonal counts once
    if not queries.any():
        raise ValueError("no label has two rows: leave-one-out rank-1 needs an identity with two images")
    hits = labels[sim.argmax(axis=1)] == labels
    return float(hits[queries].mean())


def stage_fit(folder: str | Path, metric: str) -> dict[str, Any]:
    """{"fit", "metric", "epochs", "images"} of one finished recognizer stage folder."""
    import torch

    from rgsd_lightning.backbones import load_embedding_net
    from rgsd_lightning.data.datamodule import IdentityDataModule
    from rgsd_lightning.data.images import load_image
    from rgsd_lightning.evaluation.quality import embed

    folder = Path(folder)
    marker = folder / "stage.json"
    if not marker.is_file():
        raise FileNotFoundError(f"not a finished stage (no stage.json): {folder}")
    stage = json.loads(marker.read_text())
    spec, export = stage.get("spec"), stage.get("export")
    if not spec or not export:
        raise ValueError(f"{marker}: no recorded settings or no export (not a recognizer stage?)")
    if metric not in stage.get("metrics", {}):
        raise ValueError(f"{marker}: no {metric!r} among its metrics {sorted(stage.get('metrics', {}))}")
    data = {k: v for k, v in spec["data"]["init_args"].items() if not k.startswith("synthetic")}
    dm = IdentityDataModule(**data)
    records = dm.split_records("train")
    transform = dm.recognizer_transform(train=False)
    net, _ = load_embedding_net(export)
    features = embed(net, torch.stack([transform(load_image(r.path, dm.mode)) for r in records]))
    return {
        "fit": leave_one_out_rank1(features, [r.identity for r in records]),
        "metric": float(stage["metrics"][metric]),
        "epochs": spec.get("trainer", {}).get("max_epochs"),
        "images": len(records),
    }


def rows(run: str | Path, names: Sequence[str], metric: str) -> dict[str, dict[str, Any]]:
    """{row: {"seeds", "fit", "metric" (per-seed lists), "epochs"}} for the seed stages of ``names``."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        match = SEED.match(name)
        if match is None:
            raise ValueError(f"stage {name!r} has no _s<seed> suffix")
        result = stage_fit(Path(run) / name, metric)
        row = out.setdefault(match["row"], {"seeds": [], "fit": [], "metric": [], "epochs": result["epochs"]})
        row["seeds"].append(int(match["seed"]))
        row["fit"].append(result["fit"])
        row["metric"].append(result["metric"])
    return out


def _mean_std(values: Sequence[float]) -> str:
    v = 100 * np.asarray(values)
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def markdown(report: dict[str, Any]) -> str:
    metric = report["settings"]["metric"]
    body = [
        "# Training fit: how well recognizers fit their own training images\n\n",
        md_environment(report["environment"]),
        f"\nCommand: `{report['command']}`\n\n",
        "fit: leave-one-out rank-1 among the stage's real training images (cosine nearest other training "
        f"image, test transform), in %; {metric}: the stage's test score in %; mean ± std over seeds.\n\n",
    ]
    table = [
        [run, row, r["epochs"], len(r["seeds"]), _mean_std(r["fit"]), _mean_std(r["metric"])]
        for run, by_row in report["results"].items()
        for row, r in by_row.items()
    ]
    return "".join(body) + md_table(["run", "row", "epochs", "seeds", "fit %", f"{metric} %"], table)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks train_fit", description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="study run folders")
    p.add_argument("--stages", nargs="+", required=True, help="stage names or globs ('all_real_s?')")
    p.add_argument("--metric", default="test/mAP", help="the test metric reported beside the fit")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="train_fit_reid")
    args = p.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    report = report_header("train_fit", False, command_line("train_fit", argv), settings)
    report["results"] = {}
    for run in args.runs:
        names = list(  # in the order of the patterns, each pattern's matches sorted
            dict.fromkeys(
                f.name for pattern in args.stages for f in sorted(Path(run).glob(pattern)) if f.is_dir()
            )
        )
        if not names:
            raise FileNotFoundError(f"{run}: no stage folder matches {args.stages}")
        report["results"][run] = rows(run, names, args.metric)
    publish(args.out, args.name, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
