"""Run reports: ``rgsd report RUN`` (and the end of ``rgsd demo`` / ``rgsd pipeline``).

A run folder holds the merged pipeline spec (``pipeline.yaml``) and one folder per stage. Its ``report:``
block lists sections (``rgsd_lightning.report.sections``: results tables over seeds, generator quality in a
judge's feature space, sample grids, reward curves, the feature-space plot, the privacy audit, timings);
:func:`make_report` renders them into ``<name>.md``, ``<name>.html`` and ``<name>.json``. Every number and
picture is computed from the run's artifacts; nothing is typed in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rgsd_lightning.pipeline.runner import SPEC_NAME, StageResult
from rgsd_lightning.pipeline.spec import expand_entries, read_spec, resolve_vars, stage_names, substitute_vars
from rgsd_lightning.report.render import Row, results_table, write_report
from rgsd_lightning.report.sections import KINDS, RunContext, Section

__all__ = ["Row", "Section", "make_report", "results_table", "write_report"]

DEFAULT_SECTIONS: list[dict[str, Any]] = [{"kind": "run"}]


def make_report(
    run: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    name: str = "report",
    spec: dict[str, Any] | None = None,
) -> Path:
    """Render the report of a run folder; returns the markdown path.

    Args:
        run: the run folder (holding ``pipeline.yaml`` unless ``spec`` is given).
        out: folder of the report files and figures (default: the run folder).
        name: file-name stem (``<name>.md``, ``.html``, ``.json``; figures ``<name>_<section>.png``).
        spec: the merged pipeline spec (default: read from the run folder).
    """
    run = Path(run)
    if spec is None:
        path = run / SPEC_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{run} is not a pipeline run folder: {SPEC_NAME} is missing")
        spec = read_spec(path)
    out = Path(out) if out is not None else run
    out.mkdir(parents=True, exist_ok=True)
    names = stage_names(spec)
    results = {n: r for n in names if (r := StageResult.from_marker(run / n)) is not None}
    ctx = RunContext(run, names, results, out, name)
    report = spec.get("report") or {}
    variables = resolve_vars(spec)
    sections: list[Section] = []
    entries = report.get("sections") or DEFAULT_SECTIONS
    for entry, local, where in expand_entries(entries, variables, "report.sections", "sections"):
        entry = substitute_vars(entry, local, where)
        kind = entry.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{where}: unknown section kind {kind!r} (known: {sorted(KINDS)})")
        try:
            sections.append(KINDS[kind](ctx, entry))
        except KeyError as err:  # a stage it needs has not finished: say so, keep the rest
            sections.append(Section(entry.get("title", kind), f"Not available yet: {err.args[0]}."))
    title = str(substitute_vars(report.get("title", f"Report of {run}"), variables, "report.title"))
    data = {"run": str(run), "sections": [{"title": s.title, **s.data} for s in sections]}
    return write_report(out, title, [(s.title, s.body) for s in sections], name=name, data=data)
