"""The paper's recipes at their real shapes, on CPU, one step per stage (issue 14 case 6).

    python -m benchmarks paper_shapes --out benchmarks/results [--work DIR] [--name paper_shapes]

Nothing is downloaded. The command builds, with random weights:

* a diffusers folder shaped like ``facebook/DiT-XL-2-256``: ``transformer/`` (DiT-XL/2: 28 layers, 16 heads
  x 72 = hidden 1152, patch 2, 32x32x4 latents, 1000 classes, learned-sigma head of 8 output channels),
  ``vae/`` (an ``AutoencoderKL`` with the architecture of ``stabilityai/sd-vae-ft-ema``, scaling factor
  0.18215) and ``scheduler/`` (the DiT schedule: 1000 linear betas 1e-4..0.02);
* timm ``resnet50`` weights as the local "ImageNet" backbone file of the recognizer recipes;
* tiny fixture data: toy persons in the Market-1501 layout (2 training identities x 4 images of 128x64,
  2 test identities), toy faces in identity folders (2 x 4 images of 128x128) and an insightface ``.bin``
  of 20 face pairs.

Then it runs, through the pipeline machinery (``load_pipeline`` / ``run_pipeline``, one stage at a time),
every stage of ``experiments/market1501/pipeline.yaml`` (ReID baseline, cold start, RewardDPOK, generation,
ReID with synthetic data and lookahead selection) and the CosFace baseline and the cold start of
``experiments/casia/pipeline.yaml``, each for one optimisation step, with the recipes' own settings except
the overrides listed in :data:`COMMON` and :data:`OVERRIDES` (data, sizes of batches and of the data,
steps, CPU, no worker processes, no sample grids). Precision is each recipe's own (``bf16-mixed`` for the
generator stages, ``32-true`` for the recognizers; a ``16-mixed`` recipe would run as ``bf16-mixed``, which
is what Lightning does with it on CPU, and the report would say so).

On a shared machine run it with ``OMP_WAIT_POLICY=PASSIVE`` (as the slow test does): OpenMP threads that
spin while their partner thread is descheduled multiply the CPU time of every stage several times over.

Every stage runs in its own (forked) process; the report gives its wall time, CPU time and peak resident
memory (``ru_maxrss``), plus checks of what each stage wrote (the shapes and the label space the tiny
models cannot exercise). ``DIR/<name>.json`` + ``DIR/<name>.md``. A ``--work`` folder is reused for the
fixtures (built once); its stage folders are removed first, so every stage runs from scratch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import RSSMeter, environment, md_environment, md_table, mib, write_report
from benchmarks.paper_fixtures import build_fixtures, count_parameters, fixture_paths

REPO = Path(__file__).resolve().parents[1]
MARKET = REPO / "experiments" / "market1501" / "pipeline.yaml"
CASIA = REPO / "experiments" / "casia" / "pipeline.yaml"
CASIA_STAGES = ("baseline", "cold_start")  # the face recipe's recognizer and cold start

# dotted keys set in every stage (paths are filled in by run_paper_shapes)
COMMON: dict[str, Any] = {
    "trainer.accelerator": "cpu",
    "trainer.devices": 1,
    "trainer.enable_progress_bar": False,
    "trainer.enable_model_summary": False,
    "data.init_args.num_workers": 0,
    "data.init_args.pin_memory": False,
}
_RECOGNIZER = {
    "trainer.max_epochs": 1,
    "trainer.limit_train_batches": 1,  # one step; validation every 10 (ReID) / 2 (faces) epochs: none
    "data.init_args.batch_size": 8,  # evaluation batches
}
_GENERATOR = {
    "trainer.max_steps": 1,
    "trainer.val_check_interval": 1,  # the recipes' 2000 exceeds the fixture's batches per epoch
    "trainer.limit_val_batches": 0,
    "data.init_args.batch_size": 1,
    "model.init_args.grid.identities": 0,
}
OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "market1501": {
        "baseline": {**_RECOGNIZER, "data.init_args.p": 2},  # K = 4 as in the recipe
        "cold_start": dict(_GENERATOR),
        "reward_dpok": {
            "trainer.max_epochs": 1,
            "data.init_args.batches_per_epoch": 1,  # one rollout
            "data.init_args.p": 1,  # 1 identity x 2 samples, 2 steps (the last one deterministic)
            "data.init_args.batch_size": 4,  # memory-bank construction
            "model.init_args.samples_per_identity": 2,
            "model.init_args.sampler.steps": 2,
            "model.init_args.update.policy_steps": 1,
            "model.init_args.update.micro_batch": 2,
            "model.init_args.update.grad_accum": 1,
            "model.init_args.grid.identities": 0,
        },
        "generate": {
            "data.init_args.generate_per_identity": 1,  # 2 identities: 2 images
            "data.init_args.batch_size": 2,
            "model.init_args.sampler.steps": 2,
        },
        "ours": {**_RECOGNIZER, "data.init_args.p": 2},  # 1 of K = 4 slots synthetic (fraction 0.25)
    },
    "casia": {
        "baseline": {**_RECOGNIZER, "data.init_args.p": 2, "data.init_args.k": 2},
        "cold_start": dict(_GENERATOR),
    },
}


# ------------------------------------------------------------------------------------------ stages
def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def cpu_precision(precision: Any) -> tuple[Any, str | None]:
    """The precision a recipe's setting runs with on CPU, and a note when it is a substitute."""
    if str(precision) in ("16-mixed", "16", "16-true"):
        return "bf16-mixed", f"{precision} -> bf16-mixed (no float16 autocast on CPU)"
    return precision, None


def prepare_stages(
    dataset: str, fixtures: dict[str, Path], output: Path
) -> tuple[list[Any], dict[str, dict[str, Any]]]:
    """The recipe's stages with the overrides applied; also the overrides per stage (for the report)."""
    from rgsd_lightning.pipeline import load_pipeline

    with contextlib.chdir(REPO):  # stage configs are named relative to the repository root
        _, stages = load_pipeline(MARKET if dataset == "market1501" else CASIA)
    if dataset == "casia":
        stages = [s for s in stages if s.name in CASIA_STAGES]
    data_root = fixtures["market"] if dataset == "market1501" else fixtures["faces"]
    applied: dict[str, dict[str, Any]] = {}
    for stage in stages:
        sets: dict[str, Any] = {**COMMON, "data.init_args.root": str(data_root)}
        model = stage.config["model"]["init_args"]
        if "pretrained_path" in (model.get("net") or {}):
            sets["model.init_args.net.pretrained_path"] = str(fixtures["weights"])
        if "pretrained" in model:
            sets["model.init_args.pretrained"] = str(fixtures["dit"])
        if dataset == "casia" and stage.name == "baseline":
            lfw = {"kind": "bin", "path": str(fixtures["bin"]), "name": "lfw"}
            sets["data.init_args.verification"] = [lfw]
        precision, note = cpu_precision(stage.config.get("trainer", {}).get("precision", "32-true"))
        sets["trainer.precision"] = precision
        sets.update(OVERRIDES[dataset].get(stage.name, {}))
        for key, value in sets.items():
            _set(stage.config, key, value)
        applied[stage.name] = {"overrides": sets, "precision_substitute": note}
    return stages, applied


def run_isolated(fn: Callable[[], None]) -> dict[str, Any]:
    """Run ``fn`` in a forked child process: its wall time, peak resident memory and CPU time.

    A stage in its own process has the peak a user running that stage alone needs (in one process the
    previous stage's objects are still alive while the next one loads). The parent never runs torch
    kernels itself, so forking is safe for OpenMP. Without ``os.fork`` (not Linux) ``fn`` runs in this
    process and the peak is the resident high-water mark above the start (``RSSMeter``).
    """
    start = time.perf_counter()
    if not hasattr(os, "fork"):
        meter = RSSMeter()
        meter.reset()
        before = resource_time()
        fn()
        row = {"ok": True, "peak_rss_bytes": meter.absolute_peak(), "memory_method": meter.method}
        row["cpu_s"] = round(resource_time() - before, 1)
        meter.stop()
    else:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: run, report through the exit status, never return into the caller
            code = 0
            try:
                fn()
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status, usage = os.wait4(pid, 0)
        row = {
            "ok": os.waitstatus_to_exitcode(status) == 0,
            "peak_rss_bytes": int(usage.ru_maxrss) * 1024,  # KiB on Linux
            "memory_method": "child_process_maxrss",
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        }
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def resource_time() -> float:
    """User + system CPU seconds of this process so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_stages(dataset: str, stages: list[Any], output: Path) -> dict[str, dict[str, Any]]:
    """Run each stage through ``run_pipeline(only=[stage])`` in its own process (:func:`run_isolated`)."""
    from rgsd_lightning.pipeline import run_pipeline

    def stage_fn(name: str) -> Callable[[], None]:
        def run() -> None:
            with contextlib.chdir(REPO):
                run_pipeline(output, stages, only=[name], force=[name], announce=_announce(dataset))

        return run

    rows: dict[str, dict[str, Any]] = {}
    for stage in stages:
        row = run_isolated(stage_fn(stage.name))
        marker = _read_json(output / stage.name / "stage.json")
        row.update(
            status=marker.get("status", "failed"),
            precision=stage.config["trainer"]["precision"],
            metrics={k: round(v, 4) for k, v in marker.get("metrics", {}).items()},
        )
        rows[stage.name] = row
        if not row["ok"]:
            raise RuntimeError(f"{dataset} stage {stage.name!r} failed (traceback above)")
    return rows


def _announce(dataset: str):
    return lambda line: print(f"[paper_shapes] {dataset} {line}", flush=True)


# ------------------------------------------------------------------------------------------ checks
def check_outputs(output: Path, dataset: str) -> dict[str, Any]:
    """Facts of what the stages wrote: export geometry, label space, synthetic images, metrics."""
    from PIL import Image

    checks: dict[str, Any] = {}
    cold = _read_json(output / "cold_start" / "export" / "generator" / "generator.json")
    labels = _read_json(output / "cold_start" / "export" / "generator" / "labels.json")
    checks["cold_start"] = {
        "image_size": cold.get("image_size"),
        "latent": cold.get("latent"),
        "vae_scale_factor": cold.get("vae_scale_factor"),
        "num_identities": len(labels.get("identities", [])),
        "transformer_out_channels": _read_json(
            output / "cold_start" / "export" / "generator" / "transformer" / "config.json"
        ).get("out_channels"),
    }
    if dataset != "market1501":
        checks["baseline"] = {"metrics": sorted(_read_json(output / "baseline" / "metrics.json"))}
        return checks
    rl = output / "reward_dpok" / "export" / "generator"
    files = sorted((output / "reward_dpok").rglob("reward_history.json"))
    history = [json.loads(p.read_text()) for p in files]
    last = history[-1][-1] if history and history[-1] else {}
    checks["reward_dpok"] = {
        "export": (rl / "labels.json").is_file(),
        "transitions": last.get("train/buffer_size"),
        "logp_check": last.get("train/logp_check"),  # rollout vs recompute under bf16, at XL shapes
        "all_finite": bool(last) and all(math.isfinite(v) for v in last.values()),
    }
    synthetic = output / "generate" / "synthetic"
    rows = [json.loads(line) for line in (synthetic / "manifest.jsonl").read_text().splitlines() if line]
    sizes = sorted({Image.open(synthetic / r["path"]).size for r in rows})
    checks["generate"] = {
        "images": len(rows),
        "image_sizes": [list(s) for s in sizes],
        "rewards_recorded": all({"sem", "cov", "exp", "total"} <= set(r) for r in rows),
        "audited": all("sim_pixel" in r for r in rows),
    }
    for name in ("baseline", "ours"):
        checks[name] = {"metrics": sorted(_read_json(output / name / "metrics.json"))}
    return checks


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


# ------------------------------------------------------------------------------------------ report
def run_paper_shapes(out: str | os.PathLike, work: str | os.PathLike, name: str, command: str) -> dict:
    """Build the fixtures, run both recipes, write ``<out>/<name>.json`` and ``.md``; returns the report."""
    work = Path(work)
    report: dict[str, Any] = {"command": command, "results": {}, "errors": {}}
    start = time.perf_counter()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    shutil.rmtree(work / "runs", ignore_errors=True)  # stages resume from what they find: start afresh
    fixtures = fixture_paths(work / "fixtures")
    built = run_isolated(lambda: build_fixtures(work / "fixtures"))
    if not built["ok"]:
        raise RuntimeError("building the fixtures failed (traceback above)")
    report["fixtures"] = {**built, "dit_parameters": count_parameters(fixtures["dit"] / "transformer")}
    for dataset in ("market1501", "casia"):
        output = work / "runs" / dataset
        try:
            stages, applied = prepare_stages(dataset, fixtures, output)
            rows = run_stages(dataset, stages, output)
            for stage, row in rows.items():
                row.update(applied[stage])
            report["results"][dataset] = {"stages": rows, "checks": check_outputs(output, dataset)}
        except Exception:  # recorded and turned into a non-zero exit status
            report["errors"][dataset] = traceback.format_exc()
            print(report["errors"][dataset], flush=True)
    rows = [report["fixtures"]] + [r for res in report["results"].values() for r in res["stages"].values()]
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    report["total_cpu_s"] = round(sum(r["cpu_s"] for r in rows), 1)
    report["load_average_at_start"] = load
    report["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    report["environment"] = environment()  # after the children: the parent runs no torch kernel first
    write_report(out, name, report, render(report))
    return report


def render(report: dict[str, Any]) -> str:
    """The markdown of a report."""
    out = io.StringIO()
    out.write("# The paper's recipes at their real shapes, on CPU (one step per stage)\n\n")
    out.write(md_environment(report["environment"]))
    out.write(f"\nCommand: `{report['command']}`\n\n")
    fx = report.get("fixtures", {})
    out.write(
        f"Fixtures (random DiT-XL/2 folder with {fx.get('dit_parameters', 0) / 1e6:.0f} M transformer "
        f"parameters, sd-vae-ft-ema-shaped VAE, resnet50 weights, toy data): {fx.get('seconds')} s, peak RSS "
        f"{mib(fx.get('peak_rss_bytes', 0))} MiB. Whole run: {report.get('total_seconds')} s wall, "
        f"{report.get('total_cpu_s')} s CPU (user + system, all processes); load average at the start "
        f"{_load(report.get('load_average_at_start'))}; OMP_WAIT_POLICY={report.get('omp_wait_policy')}.\n\n"
    )
    rows = []
    for dataset, result in report["results"].items():
        for stage, row in result["stages"].items():
            rows.append(
                [
                    f"{dataset} / {stage}",
                    row["precision"],
                    f"{row['seconds']:.1f}",
                    f"{row['cpu_s']:.1f}",
                    mib(row["peak_rss_bytes"]),
                ]
            )
    headers = ["stage", "precision", "wall s", "CPU s", "peak RSS (MiB)"]
    out.write(md_table(headers, rows))
    out.write(
        "\nEach stage runs in its own process (forked; `run_pipeline(only=[stage])`); peak RSS is that "
        "process's resident high-water mark (`ru_maxrss`), about 0.5 GiB of it the imported libraries. "
        "Wall times depend on the machine and its load (on a machine of its own a stage's wall time is at "
        "most about its CPU time): this is a shape and configuration check with a memory census, not a "
        "speed benchmark.\n"
    )
    for dataset, result in report["results"].items():
        checks = json.dumps(result["checks"], indent=1)
        out.write(f"\n## {dataset}: what the stages wrote\n\n```json\n{checks}\n```\n")
        subs = {k: r["precision_substitute"] for k, r in result["stages"].items()}
        subs = {k: v for k, v in subs.items() if v}
        out.write(f"\nPrecision substitutes: {subs or 'none (every recipe precision runs on CPU)'}.\n")
    out.write("\n## Overrides of the recipes (every stage also gets the data root and local weights)\n\n")
    out.write(f"Common: `{json.dumps(COMMON)}`\n\n")
    for dataset, stages in OVERRIDES.items():
        for stage, sets in stages.items():
            out.write(f"- {dataset} / {stage}: `{json.dumps(sets)}`\n")
    for dataset, error in report["errors"].items():
        out.write(f"\n## {dataset}: FAILED\n\n```\n{error}```\n")
    return out.getvalue()


def _load(values: Any) -> str:
    return "unknown" if not values else " / ".join(f"{v:.1f}" for v in values)


@contextlib.contextmanager
def _work_dir(path: str | None) -> Iterator[Path]:
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="paper_shapes_") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks paper_shapes --out DIR [--work DIR] [--name NAME]``."""
    title = __doc__.split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m benchmarks paper_shapes", description=title)
    parser.add_argument("--out", required=True, help="output folder for <name>.json and <name>.md")
    parser.add_argument("--work", default=None, help="fixtures and runs (default: a temporary folder)")
    parser.add_argument("--name", default="paper_shapes", help="report file stem")
    args = parser.parse_args(argv)
    command = "python -m benchmarks paper_shapes " + " ".join(argv if argv is not None else [])
    with _work_dir(args.work) as work:
        report = run_paper_shapes(args.out, work, args.name, command)
    print(Path(args.out) / f"{args.name}.md")
    return 1 if report["errors"] else 0
