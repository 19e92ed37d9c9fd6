"""``python -m benchmarks utility --config benchmarks/configs/utility_faces.yaml [--quick] [--out DIR]``.

The paper's claim tested at CPU scale on real data: synthetic data from a generator adapted from a broader
prior, refined by the reward and selected by lookahead, improves a recognizer trained on scarce real data.

Paths in, tables out. The config names a prior dataset (the generator's pre-training), a target dataset
(the scarce identities), the shot settings, the seeds, the rows and the stage sizes
(``benchmarks/utility_config.py``). Every stage is one resumable LightningCLI run in
``<work>/<stage>/`` (``rgsd_lightning.pipeline``): a rerun after an interruption skips finished stages;
the long generator stages (prior, cold start) save ``last.ckpt`` every 500 steps and resume from it, the
short ones (recognizers, RL; generation keeps the images already written) start again. What is shared
between rows and seeds is listed in ``benchmarks/utility_stages.py`` and in the report. Results:
``<out>/<name>.json`` and ``<out>/<name>.md`` (``<name>_quick`` with ``--quick``), rewritten after every
shot setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.utility_config import ROWS, StudyConfig, load_config
from benchmarks.utility_report import aggregate, render_markdown
from benchmarks.utility_stages import (
    PAIRS_NAME,
    judge_stage,
    make_pair_file,
    prior_stage,
    row_stages,
    setting_label,
    target_records,
    write_prior_manifest,
)
from rgsd_lightning.data.records import atomic_write_json, atomic_write_text, read_manifest
from rgsd_lightning.pipeline import Stage, StageResult, run_stage

SHARING = (
    "Shared work: the prior is pre-trained once per study; the judge is trained once per target on every "
    "real image of the target identities; per shot setting the cold start, each RL variant and each "
    "synthetic set are built once and shared by all seeds and rows (the seeds vary only the downstream "
    "recognizer: initialisation, batch sampling, augmentation); the reward's feature extractor and the "
    "audit's feature space are the first seed's real-only recognizer."
)
QUALITY_CAPTION = (
    "Fidelity: share of samples the judge (trained on every real image of the target identities) assigns "
    "to their intended identity (nearest prototype). Diversity: mean pairwise feature distance within an "
    "identity; syn/real compares it with the real images. FID/KID: torchmetrics with the judge as feature "
    "extractor (unit features; real reference = every real image). sem/cov/exp: mean raw reward components "
    "recorded in the set's manifest (baseline recognizer's space; cov and exp are leave-one-out credits per "
    "image, so their means sit near 0, and exp is 0 when an identity has a single real image: its real "
    "spread is undefined). Near copies: share of images the privacy audit flags as near copies of a real "
    "training image."
)


# ------------------------------------------------------------------------------------------ stage runner
class StageRunner:
    """Runs stages in order (skipping finished ones), wiring references and timing wall + CPU seconds."""

    def __init__(self, work: Path, announce: Callable[[str], None] = print) -> None:
        self.work = work
        self.announce = announce
        self.refs: dict[str, dict[str, str | None]] = {}
        self.results: dict[str, StageResult] = {}
        self.timing: list[dict[str, Any]] = []

    def run(self, stage: Stage) -> StageResult:
        """Run (or skip) one stage; its times go to ``<stage>/timing.json``."""
        if stage.name in self.results:
            return self.results[stage.name]
        self.announce(f"[utility] {stage.name}: {stage.describe} ...")
        wall, cpu = time.perf_counter(), time.process_time()
        result = run_stage(stage, self.work, self.refs)
        timing_file = self.work / stage.name / "timing.json"
        if result.status == "ran":
            timing = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
            atomic_write_json(timing_file, timing)
        elif timing_file.is_file():
            timing = json.loads(timing_file.read_text())
        else:
            timing = {"wall_s": 0.0, "cpu_s": 0.0}
        status = "ran" if result.status == "ran" else "reused"  # reused: finished by an earlier invocation
        self.timing.append({"name": stage.name, "status": status, **timing})
        self.results[stage.name] = result
        self.refs[stage.name] = {
            "export": str(result.export) if result.export else None,
            "output": str(result.output) if result.output else None,
            "folder": str(result.folder),
        }
        self.announce(f"[utility] {stage.name}: {result.status} ({timing['wall_s']:.0f} s wall)")
        return result


# ------------------------------------------------------------------------------------------ the study
def _cached(path: Path, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()`` cached in ``path`` under ``key`` (recomputed when the key changes)."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["value"]
    value = compute()
    atomic_write_json(path, {"key": key, "value": value})
    return value


def _import_externals(cfg: StudyConfig, shot: int | None, work: Path) -> dict[str, Path]:
    """Import each external set for a shot setting (manifest + card in the work folder)."""
    from rgsd_lightning.commands.import_synthetic import import_synthetic

    out: dict[str, Path] = {}
    known = {r.identity for r in target_records(cfg, shot)["train"]}
    for ext in cfg.external:
        folder = Path(ext.folder)
        dest = work / f"{setting_label(shot)}_ext_{ext.name}"
        if not (dest / "manifest.jsonl").is_file():
            if (folder / "manifest.jsonl").is_file():  # already a synthetic set: take its records
                from rgsd_lightning.data.records import write_manifest

                records = [r for r in read_manifest(folder / "manifest.jsonl") if r.identity in known]
                if not records:
                    raise ValueError(f"external set {ext.name}: no images of the target's identities")
                write_manifest(dest / "manifest.jsonl", records)
                card = (
                    json.loads((folder / "card.json").read_text()) if (folder / "card.json").is_file() else {}
                )
                card.pop("audit", None)  # audited again below, against this setting's real images
                atomic_write_json(dest / "card.json", card)
            else:
                import_synthetic(
                    folder, dest, identity_map=ext.identity_map, known_identities=known, unknown=ext.unknown
                )
        out[ext.name] = dest
    return out


def _audit_external(dest: Path, real, extractor: str | None) -> None:
    """Privacy-audit an imported set once (the summary lands in its card.json)."""
    card = json.loads((dest / "card.json").read_text())
    if card.get("audit"):
        return
    from rgsd_lightning.evaluation.privacy import audit_synthetic_set

    audit_synthetic_set(dest, real, extractor=extractor)


def _row_metrics(cfg: StudyConfig, result: StageResult, evaluator: Any) -> dict[str, float]:
    """The metrics of one downstream recognizer (faces: its test metrics; ReID: recomputed per source)."""
    if cfg.task == "face":
        m = result.metrics
        out = {}
        if "test/id_acc" in m:
            out["identification"] = m["test/id_acc"]
        if f"test/{PAIRS_NAME}/accuracy" in m:
            out["verification"] = m[f"test/{PAIRS_NAME}/accuracy"]
        return out
    return _cached(result.folder / "reid_metrics.json", str(result.export), lambda: evaluator(result.export))


def collect_setting(
    cfg: StudyConfig, shot: int | None, runner: StageRunner, judge: Any, evaluator: Any, externals: dict
) -> dict[str, Any]:
    """Aggregate one shot setting: rows (mean ± std over seeds) and the quality of its synthetic sets."""
    label = setting_label(shot)
    row_keys = [r for r in ROWS if r in cfg.rows] + [f"ext_{e.name}" for e in cfg.external]
    rows: dict[str, Any] = {}
    for key in row_keys:
        per_seed = {}
        for seed in cfg.seeds:
            result = runner.results.get(f"{label}_{key}_s{seed}")
            if result is not None:
                per_seed[seed] = _row_metrics(cfg, result, evaluator)
        spec = ROWS.get(key)
        group, method = (
            (spec.group, spec.method) if spec else ("External synthetic", f"+ {key[4:]} synthetic")
        )
        rows[key] = {"group": group, "method": method, "per_seed": per_seed, "stats": aggregate(per_seed)}
    sets: dict[str, Any] = {}
    folders = {s: runner.results.get(f"{label}_gen_{s}") for s in cfg.generator_sets()}
    folders = {s: Path(r.output) for s, r in folders.items() if r is not None and r.output}
    folders.update({f"ext_{n}": p for n, p in externals.items()})
    for name, folder in folders.items():
        try:
            from rgsd_lightning.evaluation.quality import set_summary

            manifest = (folder / "manifest.jsonl").read_bytes()
            quality = _cached(
                folder / "quality.json",
                judge.key + ":" + hashlib.sha256(manifest).hexdigest()[:16],
                lambda folder=folder: judge.judge.score(read_manifest(folder / "manifest.jsonl")),
            )
            card = json.loads((folder / "card.json").read_text())
            sets[name] = {**quality, **set_summary(card)}
        except (ValueError, FileNotFoundError, RuntimeError) as err:
            sets[name] = {"error": str(err)}
    if cfg.task == "face":
        title = f"{shot}-shot: {shot} real training image(s) per identity"
        caption = (
            f"Accuracy in % on the held-out images of the target identities, mean ± std over "
            f"{len(cfg.seeds)} seed(s). Identification: closed-set, nearest CosFace class weight. "
            f"Verification: 10-fold accuracy on the fixed pair list `{label}_pairs.json` "
            f"({cfg.num_pairs} pairs)."
        )
    else:
        title = "ReID: every training image" if shot is None else f"ReID: <= {shot} images per identity"
        caption = (
            f"mAP and Rank-1 in % on query/gallery (Market-1501 protocol), mean ± std over {len(cfg.seeds)} "
            "seed(s); per source, queries and gallery are restricted to that source's camera pair."
        )
    info = judge.describe()
    judge_line = (
        f"Judge reference: {info['num_real_images']} real images of {info['num_identities']} identities; "
        f"its nearest-prototype accuracy on them {100 * info['real_fidelity']:.1f}%, real diversity "
        f"{info['real_diversity'] if info['real_diversity'] is None else round(info['real_diversity'], 3)}."
    )
    return {
        "title": title,
        "caption": caption,
        "rows": rows,
        "sets": sets,
        "judge": info,
        "judge_line": judge_line,
    }


@dataclasses.dataclass
class _JudgeHandle:
    judge: Any
    key: str

    def describe(self) -> dict[str, Any]:
        return self.judge.describe()


def _make_judge(cfg: StudyConfig, export: Path) -> _JudgeHandle:
    from rgsd_lightning.backbones import FeatureExtractor
    from rgsd_lightning.evaluation.quality import Judge
    from rgsd_lightning.provenance import folder_fingerprint

    real = target_records(cfg, None)["train"]
    judge = Judge(
        FeatureExtractor.from_export(export), real, cfg.image_size, cfg.channels, cfg.kid_subset_size
    )
    return _JudgeHandle(judge, str(folder_fingerprint(export)))


def run_study(
    cfg: StudyConfig,
    *,
    quick: bool = False,
    out: str | Path = "benchmarks/results",
    work: str | Path | None = None,
    command: str = "",
    announce: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) the study and write ``<out>/<name>.json`` + ``.md``; returns the report dict."""
    from benchmarks.common import environment
    from benchmarks.utility_reid import ReIDEvaluator

    work = Path(work) if work else cfg.resolved_work_dir(quick)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "study_config.json", dataclasses.asdict(cfg))
    runner = StageRunner(work, announce)
    name = cfg.name + ("_quick" if quick else "")
    env = environment()
    pairs = {}
    if cfg.task == "face":
        pairs = {s: make_pair_file(cfg, s, work / f"{setting_label(s)}_pairs.json") for s in cfg.shots}
    manifest = work / "prior_data" / "manifest.jsonl"
    if not manifest.is_file():
        write_prior_manifest(cfg, manifest)
    runner.run(prior_stage(cfg, manifest))
    judge_result = runner.run(judge_stage(cfg, pairs.get(cfg.shots[0])))
    judge = _make_judge(cfg, Path(judge_result.export))
    evaluator = ReIDEvaluator.from_config(cfg) if cfg.task == "reid" else None
    report: dict[str, Any] = {
        "name": name,
        "task": cfg.task,
        "command": command,
        "config": dataclasses.asdict(cfg),
        "environment": env,
        "description": _description(cfg),
        "sharing": SHARING,
        "quality_caption": QUALITY_CAPTION,
        "reid_sources": dict(cfg.reid_sources),
        "settings": {},
        "work_dir": str(work),
    }
    for shot in cfg.shots:
        label = setting_label(shot)
        externals = _import_externals(cfg, shot, work)
        for stage in row_stages(cfg, shot, pairs.get(shot), externals):
            runner.run(stage)
        baseline = runner.results[f"{label}_real_s{cfg.seeds[0]}"].export
        train = target_records(cfg, shot)["train"]
        for dest in externals.values():
            _audit_external(dest, train, str(baseline))
        report["settings"][label] = collect_setting(cfg, shot, runner, judge, evaluator, externals)
        _write(report, runner, out, name, env)
    announce(f"[utility] results: {Path(out) / (name + '.md')}")
    return report


def _description(cfg: StudyConfig) -> str:
    return (
        f"Prior `{cfg.prior.path}` ({cfg.prior.format}); target `{cfg.target.path}` ({cfg.target.format}); "
        f"generator {cfg.image_size}x{cfg.image_size}x{cfg.channels} DiT preset `{cfg.prior_stage.preset}` "
        f"({cfg.prior_stage.steps} prior steps, {cfg.cold.steps} cold-start steps, {cfg.rl.rollouts} RL "
        f"rollouts of {cfg.rl.identities}x{cfg.rl.samples_per_identity}); {cfg.generate.per_identity} "
        f"synthetic images per identity; recognizer `{cfg.recognizer.architecture}` at "
        f"{'x'.join(map(str, cfg.recognizer.input_size))}, {cfg.recognizer.steps} steps, synthetic share "
        f"{cfg.recognizer.synthetic_fraction} of each identity's K slots; seeds {cfg.seeds}."
    )


def _write(report: dict[str, Any], runner: StageRunner, out: str | Path, name: str, env: dict) -> None:
    from benchmarks.common import md_environment

    report["stages"] = list(runner.timing)
    report["total_wall_s"] = sum(s["wall_s"] for s in runner.timing)
    report["total_cpu_s"] = sum(s["cpu_s"] for s in runner.timing)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / f"{name}.json", report)
    atomic_write_text(folder / f"{name}.md", render_markdown(report, md_environment(env)))


# ------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m benchmarks utility``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks utility", description=__doc__.split("\n\n")[1])
    p.add_argument("--config", required=True, help="study YAML (benchmarks/configs/utility_*.yaml)")
    p.add_argument("--quick", action="store_true", help="the config's quick sizes (<= 10 min on 2 cores)")
    p.add_argument("--out", default="benchmarks/results", help="folder of the result JSON + markdown")
    p.add_argument("--work", default=None, help="stage folder (default runs/utility/<name>[_quick])")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study from the command line; returns the exit code."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = load_config(args.config, quick=args.quick, overrides=args.set)
    except (ValueError, FileNotFoundError) as err:
        print(f"utility: error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    import lightning  # noqa: F401  (imported first: it sets its loggers' levels on import)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    command = "python -m benchmarks utility " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    run_study(cfg, quick=args.quick, out=args.out, work=args.work, command=command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
