"""Run independent stages of a pipeline side by side, each in a worker process of its own.

A stage depends on the stages its config names in ``${stage.export}`` / ``${stage.output}`` /
``${stage.folder}`` references (:func:`stage_dependencies`); every other pair of stages is independent (the
seeds of a row, the rows of a study, the RL variants of a cold start). :func:`run_parallel` keeps ``jobs``
worker processes busy with stages whose dependencies have finished, in pipeline order. Small CPU models
use a core far better as one single-threaded process each than as one process with several threads, so
``jobs=2`` on a 2-core machine about halves the wall time of a study of many small stages.

Each worker is a fresh interpreter (``spawn``) that runs whole stages with :func:`run_stage`: the same
folders, the same ``stage.json`` markers and the same resume as the sequential runner, so a run may be
interrupted and resumed with any number of jobs. When a stage fails, no further stage starts; the ones
already running finish (and are kept), then the first error is raised.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from rgsd_lightning.pipeline.runner import StageResult, done_line, run_stage
from rgsd_lightning.pipeline.spec import Stage

_REF = re.compile(r"\$\{([A-Za-z0-9_]+)\.(?:export|output|folder)\}")
# loggers whose level the workers copy from the parent (a quiet parent gets quiet workers)
_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


def stage_dependencies(stages: Sequence[Stage]) -> dict[str, set[str]]:
    """For each stage, the earlier stages its config references (``${name.export|output|folder}``).

    A reference to a later stage or to no stage of the pipeline is not a dependency (running the stage
    fails on it with the sequential runner's message).
    """
    deps: dict[str, set[str]] = {}
    for stage in stages:
        named = set(_REF.findall(repr(stage.config)))
        deps[stage.name] = {n for n in named if n in deps}  # only stages before this one
    return deps


def _init_worker(threads: int | None, levels: dict[str, int], filters: list[Any]) -> None:
    """A worker's set-up: its torch threads, and the parent's logger levels and warning filters."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    warnings.filters[:] = filters


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
        threads: torch threads per worker (None: the CPU count divided by ``jobs``, at least 1).
        only: run only these stages (the finished others still feed the ones that run).
        force: re-run these stages even when finished.
        announce: where progress lines go (default: print).

    Returns:
        The results of every stage that ran or was finished before, in pipeline order.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    announce = announce or (lambda line: print(line, flush=True))
    output = Path(output)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    order = {s.name: i for i, s in enumerate(stages)}
    deps = stage_dependencies(stages)
    results: dict[str, StageResult] = {}
    pending = [s for s in stages if not only or s.name in only]
    for stage in stages:
        if only and stage.name not in only:
            done = StageResult.from_marker(output / stage.name)
            if done is not None:
                results[stage.name] = done
    to_run = {s.name for s in pending}
    running: dict[Future, tuple[Stage, str]] = {}
    error: BaseException | None = None
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_init_worker, initargs=(threads, levels, list(warnings.filters))
    ) as pool:
        while pending or running:
            while error is None and len(running) < jobs:
                ready = next((s for s in pending if not deps[s.name] & (to_run - set(results))), None)
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
                running[pool.submit(run_stage, ready, output, refs, forced)] = (ready, label)
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
