"""Pipelines: a YAML file defines a whole run (stages, overrides, report); the runner executes it resumably.

``spec`` reads and expands pipeline files (``extends`` overlays, ``vars``, ``foreach`` groups, ``seeds``);
``runner`` runs the stages as LightningCLI runs in ``<output>/<stage>/``. ``rgsd pipeline --config FILE``
and ``rgsd demo`` (``experiments/toy/pipeline.yaml``) use :func:`run_file`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rgsd_lightning.pipeline.runner import (
    SPEC_NAME,
    StageResult,
    adopt_stages,
    collect_results,
    place_stage,
    run_pipeline,
    run_stage,
    save_spec,
)
from rgsd_lightning.pipeline.spec import (
    Stage,
    expand,
    load_pipeline,
    read_spec,
    resolve_vars,
    reuse_plan,
    seed_stage,
    set_dotted,
    substitute,
    substitute_vars,
)

__all__ = [
    "SPEC_NAME",
    "Stage",
    "StageResult",
    "adopt_stages",
    "collect_results",
    "expand",
    "load_pipeline",
    "place_stage",
    "prepare",
    "read_spec",
    "resolve_vars",
    "reuse_plan",
    "run_file",
    "run_pipeline",
    "run_stage",
    "run_stages",
    "save_spec",
    "seed_stage",
    "set_dotted",
    "substitute",
    "substitute_vars",
]


def run_file(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    only: Sequence[str] | None = None,
    force: Sequence[str] = (),
    announce: Callable[[str], None] | None = None,
    jobs: int = 1,
    threads: int | None = None,
) -> tuple[Path, dict[str, StageResult]]:
    """Run (or resume) the pipeline file ``path``; its merged spec is saved in the run folder first, and
    the stages its ``reuse`` block names are taken from the other run folder (:func:`adopt_stages`).

    Returns the run folder and the results of the stages (finished ones "skipped"). ``jobs`` / ``threads``:
    see :func:`run_stages`.
    """
    spec = read_spec(path, overrides)
    output, stages = prepare(spec)
    return output, run_stages(
        output, stages, only=only, force=force, announce=announce, jobs=jobs, threads=threads
    )


def prepare(spec: dict[str, Any]) -> tuple[Path, list[Stage]]:
    """Expand a spec, save it in its run folder and adopt the stages its ``reuse`` block names."""
    output, stages = expand(spec)
    plan = reuse_plan(spec)
    save_spec(output, spec)
    if plan is not None:
        adopt_stages(output, stages, *plan)
    return output, stages


def run_stages(
    output: str | Path,
    stages: Sequence[Stage],
    *,
    only: Sequence[str] | None = None,
    force: Sequence[str] = (),
    announce: Callable[[str], None] | None = None,
    jobs: int = 1,
    threads: int | None = None,
) -> dict[str, StageResult]:
    """:func:`run_pipeline` (one stage at a time, in this process) for ``jobs=1``, else
    :func:`rgsd_lightning.pipeline.parallel.run_parallel` (up to ``jobs`` stages side by side in worker
    processes of ``threads`` torch threads each; None: the CPUs a stage shares when it starts)."""
    if jobs == 1:
        return run_pipeline(output, stages, only=only, force=force, announce=announce)
    from rgsd_lightning.pipeline.parallel import run_parallel

    return run_parallel(output, stages, jobs=jobs, threads=threads, only=only, force=force, announce=announce)
