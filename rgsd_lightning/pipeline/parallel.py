"""Run independent stages of a pipeline side by side, each in a worker process of its own.

A stage depends on the stages its config names in ``${stage.export}`` / ``${stage.output}`` /
``${stage.folder}`` references (:func:`~rgsd_lightning.pipeline.spec.stage_dependencies`); every other
pair of stages is independent (the seeds of a row, the rows of a study, the RL variants of a cold start).
:func:`run_parallel` keeps ``jobs`` worker processes busy with stages whose dependencies have finished,
longest chain of dependent stages first (:func:`chain_lengths`; pipeline order among equals), so a
generator chain starts as soon as it can instead of after the recognizer rows listed before it. Small CPU
models use a core better as one single-threaded process each than as one process with several threads; a
stage that starts with nothing beside it (the prior every other stage waits for) gets every CPU
(:func:`stage_threads`). What it gains depends on the machine: ``benchmarks/results/parallel_jobs.md``.

Each worker is a fresh interpreter (``spawn``) that runs whole stages with :func:`run_stage`: the same
folders, the same ``stage.json`` markers and the same resume as the sequential runner, so a run may be
interrupted and resumed with any number of jobs. When a stage fails, no further stage starts; the ones
already running finish (and are kept), then the first error is raised. When the run itself is killed, its
workers stop too (:func:`exit_with_parent`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from rgsd_lightning.pipeline.runner import StageResult, done_line, finished_outside, run_stage, stages_to_run
from rgsd_lightning.pipeline.spec import Stage, stage_dependencies

# loggers whose level the workers copy from the parent (a quiet parent gets quiet workers)
_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


def _init_worker(levels: dict[str, int], filters: list[Any]) -> None:
    """A worker's set-up: the parent's logger levels and warning filters; it ends with the parent."""
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    warnings.filters[:] = filters
    exit_with_parent()


def exit_with_parent(grace: float = 30.0) -> None:
    """End this process when the process that started it is gone, however that one ended.

    A pool worker is not stopped by its parent's death: a run killed by ``timeout``, a scheduler's SIGTERM or
    SIGKILL would leave its running stages training on, writing into the run folder that a resumed run
    uses too. A daemon thread waits for the parent, then sends this process SIGTERM (Lightning stops at
    the next step; without a handler the process ends at once) and ends it after ``grace`` seconds if it is
    still there. The stage resumes from its last checkpoint when the run is started again.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def _watch() -> None:
        parent.join()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=_watch, name="exit-with-parent", daemon=True).start()


def _run(threads: int, stage: Stage, output: Path, refs: dict[str, Any], force: bool) -> StageResult:
    """One stage in a worker, on ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    return run_stage(stage, output, refs, force=force)


def stage_threads(cpus: int, jobs: int, running: int, ready: int) -> int:
    """Torch threads for a stage about to start: the CPUs shared by the stages that will run beside it
    (the ones running, plus the ready ones up to ``jobs``), at least 1. A stage that starts alone (the
    prior a whole study waits for) gets every CPU."""
    return max(1, cpus // max(1, min(jobs, running + ready)))


def chain_lengths(stages: Sequence[Stage], deps: dict[str, set[str]]) -> dict[str, int]:
    """For each stage, the number of stages on the longest chain of stages that wait for it (0: none does).

    The prior every stage waits for gets the longest chain, a seed of a recognizer row nothing names 0.
    """
    dependents: dict[str, list[str]] = {s.name: [] for s in stages}
    for name, needs in deps.items():
        for need in needs:
            dependents[need].append(name)
    longest: dict[str, int] = {}
    for stage in reversed(stages):  # a stage's dependents come after it in pipeline order
        longest[stage.name] = max((1 + longest[d] for d in dependents[stage.name]), default=0)
    return longest


def start_order(stages: Sequence[Stage], deps: dict[str, set[str]]) -> list[str]:
    """The stage names in the order a free worker takes them when ready: longest chain first
    (:func:`chain_lengths`), pipeline order among stages with chains of the same length."""
    chains = chain_lengths(stages, deps)
    order = {s.name: i for i, s in enumerate(stages)}
    return sorted(order, key=lambda name: (-chains[name], order[name]))


def run_parallel(
    output: str | Path,
    stages: Sequence[Stage],
    *,
    jobs: int,
    threads: int | None = None,
    only: Sequence[str] | None = None,
    force: Sequence[str] = (),
    announce: Callable[[str], None] | None = None,
) -> dict[str, StageResult]:
    """:func:`rgsd_lightning.pipeline.run_pipeline` with up to ``jobs`` stages running at once.

    Args:
        output: the run folder.
        stages: the expanded stages, in pipeline order.
        jobs: worker processes (>= 1).
        threads: torch threads of each stage (None: :func:`stage_threads` when the stage starts - the CPUs
            divided among the stages that run beside it).
        only: run only these stages, names or shell-style patterns (the finished others still feed
            the ones that run).
        force: re-run these stages even when finished.
        announce: where progress lines go (default: print).

    Returns:
        The results of every stage that ran or was finished before, in pipeline order.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    only = stages_to_run(stages, only, force)
    announce = announce or (lambda line: print(line, flush=True))
    output = Path(output)
    cpus = os.cpu_count() or 1
    order = {s.name: i for i, s in enumerate(stages)}
    deps = stage_dependencies(stages)
    results = finished_outside(output, stages, only)
    pending = [s for s in stages if not only or s.name in only]
    to_run = {s.name for s in pending}

    def _ready(stage: Stage) -> bool:  # every stage it references that this run runs has finished
        return not deps[stage.name] & (to_run - set(results))

    rank = {name: i for i, name in enumerate(start_order(stages, deps))}
    pending.sort(key=lambda s: rank[s.name])  # the first ready stage of this order starts next

    running: dict[Future, tuple[Stage, str]] = {}
    error: BaseException | None = None
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_init_worker, initargs=(levels, list(warnings.filters))
    ) as pool:
        while pending or running:
            while error is None and len(running) < jobs:
                ready = next((s for s in pending if _ready(s)), None)
                if ready is None:
                    break
                pending.remove(ready)
                label = f"[{order[ready.name] + 1}/{len(stages)}] {ready.name}"
                announce(f"{label}: {ready.describe or ready.command} ...")
                refs = {name: r.refs() for name, r in results.items()}
                forced = ready.name in force
                if not forced and StageResult.from_marker(output / ready.name) is not None:
                    results[ready.name] = run_stage(ready, output, refs)  # finished: reused here, at once
                    announce(done_line(label, results[ready.name]))
                    continue
                waiting = sum(1 for s in pending if _ready(s))
                n = threads or stage_threads(cpus, jobs, len(running), 1 + waiting)
                running[pool.submit(_run, n, ready, output, refs, forced)] = (ready, label)
            if not running:
                break  # (after an error) nothing left to wait for
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                stage, label = running.pop(future)
                try:
                    result = future.result()
                except BaseException as err:  # noqa: BLE001  (re-raised once the running stages end)
                    announce(f"{label}: failed: {err}")
                    error = error or err
                    continue
                results[stage.name] = result
                announce(done_line(label, result))
            if error is not None:
                pending.clear()
    if error is not None:
        raise error
    return {s.name: results[s.name] for s in stages if s.name in results}
