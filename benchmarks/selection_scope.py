"""Does head-scope lookahead selection pick what full-scope selection picks? (issue 15, item 4)

    python -m benchmarks selection_scope --threads 1 [--out benchmarks/results] [--work runs/selection_scope]
    python -m benchmarks selection_scope --quick --out DIR        # toy sizes (the tests)

On the demo's downstream setting (``experiments/toy/reid_selection.yaml``: a small ReID recognizer trained
on P x K batches of real + cold-start synthetic images, half of each identity's slots synthetic - the
layout of the utility study's ``+ synthetic + selection`` rows), three variants x seeds
(``benchmarks/configs/selection_scope.yaml``): selection with ``scope: full`` (virtual step on every
parameter), with ``scope: head`` (neck + classifier on detached backbone features, 1.0x a plain step in
``speed_cpu.md`` vs 2.0x for full), and no selection.

Agreement: in the full-scope runs a :class:`ScopeProbe` computes, on every training batch and at the same
weights, both scopes' Δl and picks (without touching the training). Per batch: top-k agreement
(|K_full ∩ K_head| / k), Jaccard of the kept sets, and Spearman's rank correlation of the two Δl over the
synthetic samples; averaged over batches (and reported per training third), with the chance level of two
random k-of-n picks. The judge (a recognizer trained on every real image of the identities) says which
synthetic images show their identity: selection precision of each scope's picks on the same batches.
Downstream: test mAP / Rank-1 of each variant (mean ± std over seeds).

Writes ``<name>.json`` and ``<name>.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import command_line, find_file, md_environment, md_table, report_header

STAGES = Path(__file__).resolve().parent / "configs" / "selection_scope.yaml"
SETTINGS = ("seeds", "recognizer_epochs", "batches_per_epoch", "p", "per_identity")  # recorded vars
DEMO_STAGES = ("prior", "down_real_s0", "judge", "cold_start", "generate_cold")
ROWS = ("full", "head", "none")
PROBE_FILE = "scope_probe.json"


# ============================================================================================== maths
def ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of a 1-D tensor (average ranks for ties), float64."""
    v = values.double()
    order = torch.argsort(v, stable=True)
    r = torch.empty_like(v)
    r[order] = torch.arange(len(v), dtype=torch.float64)
    for value in torch.unique(v):  # ties share their mean rank
        tied = v == value
        if int(tied.sum()) > 1:
            r[tied] = r[tied].mean()
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (NaN when either is constant or n < 2)."""
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(
            f"spearman needs two 1-D tensors of one length, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra @ rb) / denom) if denom > 0 else float("nan")


def jaccard(a: set[int], b: set[int]) -> float:
    """|a ∩ b| / |a ∪ b| (1 for two empty sets)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def chance_overlap(n: int, k: int) -> dict[str, float]:
    """Expected top-k agreement and (approximate) Jaccard of two independent random k-of-n picks."""
    if not 0 < k <= n:
        raise ValueError(f"need 0 < k <= n, got k={k}, n={n}")
    inter = k * k / n
    return {"topk_agreement": inter / k, "jaccard": inter / (2 * k - inter)}


# ============================================================================================== the probe
class ScopeProbe(L.Callback):
    """On every training batch with synthetic samples, both scopes' Δl and picks at the current weights.

    Runs before the training step and changes nothing: the virtual steps are functional (``lookahead_select``
    clones buffers and forks the RNG) and the extra backbone forward of the head scope runs with the
    BatchNorm buffers saved and restored. Writes ``scope_probe.json`` (one entry per batch) into the run
    folder at the end of training.

    Args:
        enabled: probe (False: the callback does nothing; lets one stage file serve every variant).
    """

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled
        self.entries: list[dict[str, Any]] = []

    @torch.no_grad()
    def _head_features(self, module: Any, images: torch.Tensor) -> torch.Tensor:
        saved = {n: b.clone() for n, b in module.named_buffers()}
        try:
            with torch.random.fork_rng():
                return module.net.backbone(images).detach()
        finally:
            for n, b in module.named_buffers():
                b.copy_(saved[n])

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.enabled or batch.get("is_synthetic") is None:
            return
        from rgsd_lightning.modules.recognizer import _full_scope_losses, _head_scope_losses
        from rgsd_lightning.selection import lookahead_select

        is_syn = torch.as_tensor(batch["is_synthetic"]).bool()
        if not bool(is_syn.any()):
            return
        cfg = pl_module.selection
        options = dict(
            lr=cfg.lr,
            k=cfg.k,
            keep_ratio=None if cfg.k is not None else cfg.keep_ratio,
            step_on=cfg.step_on,
            rule=cfg.rule,
        )
        images, labels = batch["image"], batch["label"]
        full = lookahead_select(
            pl_module, _full_scope_losses, {"image": images, "label": labels}, is_syn, **options
        )
        head_inputs = {"features": self._head_features(pl_module, images), "label": labels}
        head = lookahead_select(
            pl_module,
            _head_scope_losses,
            head_inputs,
            is_syn,
            params=pl_module.head_parameter_names(),
            **options,
        )
        syn = torch.nonzero(is_syn.cpu()).flatten()
        index = torch.as_tensor(batch["index"]).cpu() if "index" in batch else syn
        self.entries.append(
            {
                "step": int(trainer.global_step),
                "epoch": int(trainer.current_epoch),
                "index": index[syn].tolist(),
                "delta_full": full.delta.cpu()[syn].tolist(),
                "delta_head": head.delta.cpu()[syn].tolist(),
                "keep_full": full.keep.cpu()[syn].tolist(),
                "keep_head": head.keep.cpu()[syn].tolist(),
            }
        )

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.enabled:
            return
        from rgsd_lightning.io import atomic_write_json, run_dir

        directory = run_dir(trainer)
        if trainer.is_global_zero:
            atomic_write_json(Path(directory) / PROBE_FILE, {"entries": self.entries})


# ============================================================================================== analysis
def agreement(entries: Sequence[dict[str, Any]], correct: dict[int, bool] | None = None) -> dict[str, Any]:
    """Mean top-k agreement, Jaccard and Spearman ρ over probed batches, per training third and overall.

    ``correct`` (record index -> judge verdict) adds the judge precision of each scope's picks and of all
    synthetic samples on the same batches.
    """
    if not entries:
        raise ValueError("no probed batch: the probe saw no batch with synthetic samples")
    per_batch = []
    for e in entries:
        kf = {i for i, k in zip(e["index"], e["keep_full"], strict=True) if k}
        kh = {i for i, k in zip(e["index"], e["keep_head"], strict=True) if k}
        k = max(len(kf), 1)
        row = {
            "step": e["step"],
            "n": len(e["index"]),
            "k": len(kf),
            "topk_agreement": len(kf & kh) / k,
            "jaccard": jaccard(kf, kh),
            "spearman": spearman(torch.tensor(e["delta_full"]), torch.tensor(e["delta_head"])),
        }
        if correct is not None:
            row["precision_full"] = _share(kf, correct)
            row["precision_head"] = _share(kh, correct)
            row["precision_all"] = _share(set(e["index"]), correct)
        per_batch.append(row)
    steps = sorted({r["step"] for r in per_batch})
    cut = [steps[len(steps) // 3], steps[2 * len(steps) // 3]] if len(steps) >= 3 else [steps[0], steps[0]]
    parts = {
        "first third": [r for r in per_batch if r["step"] < cut[0]],
        "middle third": [r for r in per_batch if cut[0] <= r["step"] < cut[1]],
        "last third": [r for r in per_batch if r["step"] >= cut[1]],
        "all": per_batch,
    }
    keys = ["topk_agreement", "jaccard", "spearman"]
    if correct is not None:
        keys += ["precision_full", "precision_head", "precision_all"]
    summary = {name: _means(rows, keys) for name, rows in parts.items() if rows}
    n, k = per_batch[0]["n"], per_batch[0]["k"]
    return {
        "summary": summary,
        "batches": len(per_batch),
        "n": n,
        "k": k,
        "chance": chance_overlap(n, max(k, 1)),
    }


def _share(items: set[int], correct: dict[int, bool]) -> float:
    known = [correct[i] for i in items if i in correct]
    return sum(known) / len(known) if known else float("nan")


def _means(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, float]:
    out = {"batches": len(rows)}
    for key in keys:
        values = [r[key] for r in rows if r[key] == r[key]]  # NaN-free
        out[key] = statistics.fmean(values) if values else float("nan")
    return out


# ============================================================================================== the run
SEEDS = (0, 1, 2, 3, 4, 5, 6, 7)
"""Downstream seeds per variant (``--quick``: the quick demo's)."""


def _spec(work: Path, quick: bool, seeds: Sequence[int] | None) -> dict[str, Any]:
    from rgsd_lightning.demo import demo_file
    from rgsd_lightning.pipeline import read_spec

    overrides = [f"output={work}"]
    if seeds is not None:
        overrides.append(f"vars.seeds=[{','.join(str(int(s)) for s in seeds)}]")
    spec = read_spec(demo_file(quick), overrides)
    return {**spec, "stages": spec["stages"] + read_spec(STAGES)["stages"], "report": None}


def _verdicts(results: dict[str, Any], data: Path, image_size: int) -> dict[str, bool]:
    """Judge verdict per synthetic image path of the cold-start set."""
    from rgsd_lightning.backbones import FeatureExtractor
    from rgsd_lightning.data import read_market1501
    from rgsd_lightning.data.records import read_manifest
    from rgsd_lightning.evaluation.quality import Judge

    judge = Judge(
        FeatureExtractor.from_export(results["judge"].export).eval(),
        read_market1501(data)["train"],
        image_size,
        3,
    )
    records = read_manifest(Path(results["generate_cold"].output) / "manifest.jsonl")
    return {r.path: bool(v) for r, v in zip(records, judge.verdicts(records), strict=True)}


def _record_paths(stage_folder: Path) -> list[str]:
    """Training records of a finished stage (index -> path), rebuilt from its config.yaml."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    config = yaml.safe_load((stage_folder / "config.yaml").read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    dm = parser.instantiate_classes(parser.parse_object({"data": config["data"]})).data
    return [r.path for r in dm.training_records()]


def run(
    out: Path,
    *,
    quick: bool = False,
    work: Path | None = None,
    name: str | None = None,
    seeds: Sequence[int] | None = None,
    command: str | None = None,
) -> dict:
    """Run (or resume) the stages, analyse them, write ``<name>.json/.md``; returns the report.

    ``seeds``: downstream seeds per variant (default :data:`SEEDS`, the quick demo's with ``quick``).
    """
    from rgsd_lightning.evaluation.quality import selection_precision
    from rgsd_lightning.pipeline import expand, resolve_vars, run_pipeline

    name = name or ("selection_scope_quick" if quick else "selection_scope")
    work = Path(work) if work is not None else Path("runs") / name
    started = time.perf_counter()
    spec = _spec(work, quick, seeds if seeds is not None or quick else SEEDS)
    variables = resolve_vars(spec)
    output, stages = expand(spec)
    ours = [s.name for s in stages if s.name.startswith("scope_")]
    present = {s.name for s in stages}  # the full demo starts from the shipped prior: no prior stage
    results = run_pipeline(output, stages, only=[n for n in (*DEMO_STAGES, *ours) if n in present])
    verdict_by_path = _verdicts(results, Path(output) / "data" / "target", int(variables["image_size"]))
    rows: dict[str, Any] = {}
    for row in ROWS:
        copies = [n for n in ours if n.startswith(f"scope_{row}_s")]
        runs = []
        for stage in copies:
            res = results[stage]
            entry: dict[str, Any] = {"stage": stage, "metrics": res.metrics, "seconds": res.seconds}
            selection_file = find_file(res.folder, "selection.json")
            probe_file = find_file(res.folder, PROBE_FILE)
            if selection_file is not None or probe_file is not None:
                paths = _record_paths(res.folder)
                correct = {i: verdict_by_path[p] for i, p in enumerate(paths) if p in verdict_by_path}
            if selection_file is not None:
                images = json.loads(selection_file.read_text())["images"]
                entry["selection_precision"] = selection_precision(
                    [im["seen"] for im in images],
                    [im["kept"] for im in images],
                    [verdict_by_path.get(im["path"], False) for im in images],
                )
            if probe_file is not None:
                entry["agreement"] = agreement(json.loads(probe_file.read_text())["entries"], correct)
            runs.append(entry)
        rows[row] = {"runs": runs, **_spread(runs)}
    probes = [r["agreement"] for r in rows["full"]["runs"] if "agreement" in r]
    report = {
        **report_header("selection_scope", quick, command, {k: variables[k] for k in SETTINGS}),
        "rows": rows,
        "agreement": _pool(probes),
        "seconds": time.perf_counter() - started,
    }
    report["decision"] = decide(report)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(report))
    return report


def _spread(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("test/mAP", "test/rank1"):
        values = [r["metrics"][key] for r in runs if key in r["metrics"]]
        if values:
            out[key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values,
            }
    precisions = [r["selection_precision"] for r in runs if "selection_precision" in r]
    if precisions:
        out["selection_precision"] = {
            k: statistics.fmean(p[k] for p in precisions)
            for k in ("kept_share", "precision_seen", "precision_kept")
        }
    return out


def _pool(probes: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Agreement summaries of the seeds, averaged (per training third)."""
    if not probes:
        return None
    parts = probes[0]["summary"].keys()
    pooled = {
        part: {
            key: statistics.fmean(p["summary"][part][key] for p in probes if part in p["summary"])
            for key in probes[0]["summary"][part]
        }
        for part in parts
    }
    return {
        "summary": pooled,
        "runs": len(probes),
        "n": probes[0]["n"],
        "k": probes[0]["k"],
        "chance": probes[0]["chance"],
    }


def decide(report: dict[str, Any]) -> dict[str, Any]:
    """``head`` unless full scope is measurably better downstream: its mean mAP above head's by more than
    the two rows' pooled seed standard deviation (the study cannot tell them apart otherwise)."""
    full, head = report["rows"]["full"].get("test/mAP"), report["rows"]["head"].get("test/mAP")
    if full is None or head is None:
        return {"scope": "head", "reason": "no downstream result; head is the cheaper scope"}
    diff = full["mean"] - head["mean"]
    pooled = ((full["std"] ** 2 + head["std"] ** 2) / 2) ** 0.5
    if diff > pooled:
        return {
            "scope": "full",
            "reason": f"full-scope mAP higher by {diff:.4f} > pooled std {pooled:.4f}",
            "diff": diff,
        }
    return {
        "scope": "head",
        "reason": (
            f"full-scope mAP is not above head-scope mAP by more than the pooled seed std (difference "
            f"{100 * diff:+.1f} points, pooled std {100 * pooled:.1f}): the study cannot tell them apart, "
            "so the cheaper scope"
        ),
        "diff": diff,
        "pooled_std": pooled,
    }


# ============================================================================================== output
def _pm(stat: dict[str, Any] | None, scale: float = 100.0) -> str:
    return "-" if stat is None else f"{scale * stat['mean']:.1f} ± {scale * stat['std']:.1f}"


def markdown(report: dict[str, Any]) -> str:
    """The agreement table, the downstream table and the decision."""
    s = report["settings"]
    lines = [
        "# Lookahead selection: head scope vs full scope (issue 15)",
        "",
        md_environment(report["environment"]).strip(),
        "",
        f"Command: `{report['command']}` ({report['threads']} torch thread(s)); "
        f"{report['seconds'] / 60:.0f} min. Toy ReID (`experiments/toy/reid_selection.yaml`: test_resnet, "
        f"P={s['p']} x K=4, half of each identity's slots synthetic, keep ratio 0.5), real images of the "
        "demo's target identities (3 per identity) + the demo's cold-start synthetic set, "
        f"{s['recognizer_epochs']} epochs x {s['batches_per_epoch']} batches, seeds {s['seeds']}.",
        "",
    ]
    agree = report["agreement"]
    if agree is not None:
        chance = agree["chance"]
        keys = ("topk_agreement", "jaccard", "spearman", "precision_full", "precision_head", "precision_all")
        table = [
            [part, int(v["batches"])] + [f"{v[k]:.3f}" if k in v else "-" for k in keys]
            for part, v in agree["summary"].items()
        ]
        table.append(
            [
                "chance (random picks)",
                "",
                f"{chance['topk_agreement']:.3f}",
                f"{chance['jaccard']:.3f}",
                "0",
                "",
                "",
                "",
            ]
        )
        lines += [
            "## Do the two scopes pick the same samples?",
            "",
            f"On every training batch of the full-scope runs ({agree['runs']} seeds; {agree['k']} of "
            f"{agree['n']} synthetic samples kept per batch), both scopes' Δl and picks at the same weights. "
            "Top-k agreement = |K_full ∩ K_head| / k; Jaccard of the kept sets; Spearman ρ of the two Δl "
            "over the batch's synthetic samples. Judge precision = share of the kept (or all) synthetic "
            "samples that the judge assigns to their intended identity, on the same batches.",
            "",
            md_table(
                [
                    "training part",
                    "batches per seed",
                    "top-k agreement",
                    "Jaccard",
                    "Spearman ρ",
                    "judge prec. full",
                    "judge prec. head",
                    "judge prec. all",
                ],
                table,
            ).strip(),
            "",
        ]
    down = []
    for row, label in (
        ("full", "selection, scope full"),
        ("head", "selection, scope head"),
        ("none", "no selection"),
    ):
        r = report["rows"][row]
        prec = r.get("selection_precision")
        down.append(
            [
                label,
                _pm(r.get("test/mAP")),
                _pm(r.get("test/rank1")),
                "-" if prec is None else f"{100 * prec['kept_share']:.1f}",
                "-"
                if prec is None
                else f"{100 * prec['precision_seen']:.1f} -> {100 * prec['precision_kept']:.1f}",
            ]
        )
    decision = report["decision"]
    lines += [
        "## Downstream",
        "",
        md_table(["variant", "mAP %", "Rank-1 %", "kept %", "judge precision seen -> kept %"], down).strip(),
        "",
        "Cost (`speed_cpu.md`, `selection_overhead`): full scope 2.0x a plain training step, head 1.0x.",
        "",
        f"**Default: `selection.scope: {decision['scope']}`** - {decision['reason']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks selection_scope``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks selection_scope", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="benchmarks/results", help="folder of <name>.json / .md")
    p.add_argument("--work", default=None, help="stage folders (default runs/<name>)")
    p.add_argument("--name", default=None, help="file stem (default selection_scope[_quick])")
    p.add_argument("--quick", action="store_true", help="toy sizes (the tests)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1: steadier when shared)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = command_line("selection_scope", argv)
    report = run(Path(args.out), quick=args.quick, work=args.work, name=args.name, command=command)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
