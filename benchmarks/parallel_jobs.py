"""``python -m benchmarks parallel_jobs``: a study's wall time run as one process vs as parallel stages.

Runs the same study pipeline (default: the faces study's ``--quick`` overlay) from scratch once per mode
``JOBSxTHREADS`` - ``1x2`` is one process with two torch threads (what ``python -m benchmarks utility``
does on a 2-core machine), ``2x1`` two worker processes of one thread each (``--jobs 2 --threads 1``),
``2xauto`` two workers whose stages get the CPUs they share (``--jobs 2``: a stage alone gets both) - each
in a fresh folder under ``--work`` and as a subprocess of its own, and writes ``parallel_jobs.json/.md``:
wall time per mode, the speed-up over the first mode, the summed stage times, and how far the modes' test
metrics are apart (thread counts change float summation order, so they agree only approximately).
``--estimate STUDY...`` instead estimates finished studies' wall time with 1 and 2 jobs from the CPU seconds
their stages recorded (:func:`list_schedule`; ``parallel_jobs_estimate.json/.md``).
"""

from __future__ import annotations

import argparse
import heapq
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, md_environment, md_table, report_header, write_report


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m benchmarks parallel_jobs``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks parallel_jobs", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--config", default="benchmarks/configs/utility_faces.yaml", help="study pipeline")
    p.add_argument("--full", action="store_true", help="the full study instead of its --quick overlay")
    p.add_argument("--modes", nargs="+", default=["1x2", "2x1", "2xauto"], help="JOBSxTHREADS per run")
    p.add_argument("--work", default="runs/bench/parallel_jobs", help="scratch run folders (replaced)")
    p.add_argument("--out", default="benchmarks/results", help="folder of parallel_jobs.json / .md")
    p.add_argument(
        "--estimate",
        nargs="+",
        metavar="STUDY",
        help="instead: estimate these finished studies' wall time with 1 and 2 jobs from the CPU seconds "
        "their stages recorded (a list schedule in the runner's order; writes parallel_jobs_estimate.*)",
    )
    return p


def list_schedule(
    names: Sequence[str], deps: dict[str, set[str]], seconds: dict[str, float], jobs: int
) -> float:
    """Wall seconds of the stages ``names`` on ``jobs`` workers under the runner's rule: whenever a worker is
    free it takes the first stage of ``names`` (the runner's :func:`start_order`) whose dependencies have
    all finished."""
    pending, done, running, now = list(names), set(), [], 0.0
    while pending or running:
        while len(running) < jobs:
            ready = next((n for n in pending if deps[n] <= done), None)
            if ready is None:
                break
            pending.remove(ready)
            heapq.heappush(running, (now + seconds[ready], ready))
        if not running:
            raise ValueError(f"stages {pending[:3]} depend on stages that never run")
        now, name = heapq.heappop(running)
        done.add(name)
    return now


def estimate(configs: Sequence[str]) -> list[dict[str, Any]]:
    """Per study: its stages' summed CPU minutes and the list-schedule wall minutes with 1 and 2 jobs."""
    from rgsd_lightning.pipeline import load_pipeline
    from rgsd_lightning.pipeline.parallel import stage_dependencies, start_order

    rows = []
    for config in configs:
        output, stages = load_pipeline(config)
        names = [s.name for s in stages]
        missing = [n for n in names if not (output / n / "stage.json").is_file()]
        if missing:
            raise ValueError(f"{config}: {len(missing)} stages have not finished, e.g. {missing[:3]}")
        seconds = {}
        for n in names:
            marker = json.loads((output / n / "stage.json").read_text())
            seconds[n] = float(marker.get("cpu_seconds") or marker["seconds"])
        deps = stage_dependencies(stages)
        order = start_order(stages, deps)
        wall = {jobs: list_schedule(order, deps, seconds, jobs) / 60 for jobs in (1, 2)}
        rows.append(
            {
                "study": Path(config).stem,
                "stages": len(names),
                "cpu_min": sum(seconds.values()) / 60,
                "wall_min_1": wall[1],
                "wall_min_2": wall[2],
            }
        )
    return rows


def parse_mode(mode: str) -> tuple[int, int | None]:
    """``"2x1"`` -> (jobs 2, threads 1); ``"2xauto"`` -> (2, None: the runner's per-stage choice);
    ValueError naming the mode otherwise."""
    try:
        jobs_text, threads_text = mode.lower().split("x")
        jobs = int(jobs_text)
        threads = None if threads_text == "auto" else int(threads_text)
    except ValueError:
        raise ValueError(f"mode must be JOBSxTHREADS such as 2x1 or 2xauto, got {mode!r}") from None
    if jobs < 1 or (threads is not None and threads < 1):
        raise ValueError(f"mode {mode!r}: jobs and threads must be >= 1")
    if jobs == 1 and threads is None:
        raise ValueError(f"mode {mode!r}: one job needs a thread count")
    return jobs, threads


def stage_records(run: Path) -> dict[str, dict[str, Any]]:
    """Seconds and test metrics of every finished stage of a run folder (from its ``stage.json``)."""
    out = {}
    for marker in sorted(run.glob("*/stage.json")):
        data = json.loads(marker.read_text())
        out[marker.parent.name] = {"seconds": float(data["seconds"]), "metrics": data.get("metrics") or {}}
    return out


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run: speed-up over the first run and the largest test-metric gap to it (over shared stages)."""
    first = runs[0]
    rows = []
    for run in runs:
        gaps = [
            abs(value - first["stages"][name]["metrics"][key])
            for name, stage in run["stages"].items()
            if name in first["stages"]
            for key, value in stage["metrics"].items()
            if key in first["stages"][name]["metrics"]
        ]
        rows.append(
            {
                "mode": run["mode"],
                "wall_s": run["wall_s"],
                "speedup": first["wall_s"] / run["wall_s"],
                "stages": len(run["stages"]),
                "stage_seconds": sum(s["seconds"] for s in run["stages"].values()),
                "max_metric_gap": max(gaps) if gaps else None,
            }
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The results file."""
    rows = [
        [
            f"`{r['mode']}`",
            f"{r['wall_s'] / 60:.1f}",
            f"{r['speedup']:.2f}x",
            r["stages"],
            f"{r['stage_seconds'] / 60:.1f}",
            "-" if r["max_metric_gap"] is None else f"{100 * r['max_metric_gap']:.1f}",
        ]
        for r in report["results"]
    ]
    headers = [
        "mode (jobs x threads)",
        "wall min",
        "speed-up",
        "stages",
        "stage min (sum)",
        "max gap (points)",
    ]
    return (
        "# A study as one process vs as parallel stages\n\n"
        + md_environment(report["environment"])
        + f"\nCommand: `{report['command']}`; study `{report['settings']['study']}`.\n\n"
        + md_table(headers, rows)
        + "\nEach mode runs the study from scratch in a fresh folder (`auto`: each stage's threads are the "
        "CPUs it shares with the stages beside it when it starts). Stage min (sum): the stages' own wall "
        "times added up (with two jobs two stages share the machine, so each takes longer than alone). Max "
        "gap: the largest difference of any test metric from the first mode's, in points (other thread "
        "counts sum floats in another order).\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run every mode; write the report; returns the exit code."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.estimate:
        rows = estimate(args.estimate)
        command = "python -m benchmarks parallel_jobs --estimate " + " ".join(args.estimate)
        report = {**report_header("parallel_jobs_estimate", False, command, {}), "results": rows}
        table = md_table(
            ["study", "stages", "stage CPU min", "1 job: wall min", "2 jobs: wall min"],
            [
                [
                    r["study"],
                    r["stages"],
                    f"{r['cpu_min']:.1f}",
                    f"{r['wall_min_1']:.1f}",
                    f"{r['wall_min_2']:.1f}",
                ]
                for r in rows
            ],
        )
        text = (
            "# A study's wall time with 1 and 2 jobs, estimated\n\n"
            + md_environment(report["environment"])
            + f"\nCommand: `{command}`.\n\n"
            + table
            + "\nA list schedule of the CPU seconds each finished stage recorded (one torch thread each), in "
            "the runner's order (longest chain of waiting stages first), a stage starting when a worker is "
            "free and the stages it references have finished. An estimate, not a run: the recorded times "
            "include whatever else ran on the machine.\n"
        )
        print(text, end="")
        write_report(args.out, "parallel_jobs_estimate", report, text)
        return 0
    modes = [(m, *parse_mode(m)) for m in args.modes]
    runs = []
    for mode, jobs, threads in modes:
        folder = Path(args.work) / mode
        shutil.rmtree(folder, ignore_errors=True)
        command = [sys.executable, "-m", "benchmarks", "utility", "--config", args.config]
        command += [] if args.full else ["--quick"]
        command += ["--set", f"output={folder}", "--out", str(folder / "report")]
        command += ["--jobs", str(jobs)] + ([] if threads is None else ["--threads", str(threads)])
        print(f"[parallel_jobs] {mode}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        runs.append({"mode": mode, "wall_s": time.perf_counter() - start, "stages": stage_records(folder)})
    study = Path(args.config).stem + ("" if args.full else " --quick")
    command = command_line("parallel_jobs", argv)
    report = {**report_header("parallel_jobs", not args.full, command, {"study": study})}
    report["results"] = summarise(runs)
    path = write_report(args.out, "parallel_jobs", report, markdown(report))
    print(f"[parallel_jobs] results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
