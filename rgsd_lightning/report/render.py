"""Report rendering: results tables (paper Table 1 layout, mean ± std over seeds); md, html and json files."""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rgsd_lightning.io import atomic_write_json, atomic_write_text


@dataclass
class Row:
    """One line of a results table: the metrics of one run, or of several runs (seeds) as mean ± std."""

    group: str
    method: str
    metrics: dict[str, float]
    spread: dict[str, float] | None = None
    runs: int = 1

    @classmethod
    def over_runs(cls, group: str, method: str, runs: Sequence[dict[str, float]]) -> Row:
        """Mean (``metrics``) and sample standard deviation (``spread``, with 2+ runs) of each metric."""
        if not runs:
            raise ValueError(f"row {method!r}: no runs to aggregate")
        keys = sorted({k for r in runs for k in r})
        values = {k: np.array([r[k] for r in runs if k in r], dtype=np.float64) for k in keys}
        mean = {k: float(v.mean()) for k, v in values.items()}
        spread = {k: float(v.std(ddof=1)) for k, v in values.items() if len(v) > 1}
        return cls(group, method, mean, spread or None, len(runs))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    """A markdown table; columns from ``numeric_from`` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(rows: Sequence[Row], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table in the layout of the paper's Table 1 (values in %, one decimal; ``mean ± std``)."""
    body = []
    for r in rows:
        cells = []
        for key, _ in columns:
            v = r.metrics.get(key)
            sd = (r.spread or {}).get(key)
            cell = "n/a" if v is None else f"{100 * v:.1f}"
            cells.append(cell if v is None or sd is None else f"{cell} ± {100 * sd:.1f}")
        body.append([r.group, r.method, *cells])
    return markdown_table(["Type", "Method", *(title for _, title in columns)], body, numeric_from=2)


def write_report(
    directory: str | os.PathLike,
    title: str,
    sections: Sequence[tuple[str, str]],
    *,
    name: str = "report",
    data: dict[str, Any] | None = None,
) -> Path:
    """Write ``<name>.md``, ``<name>.html`` (and ``<name>.json`` with ``data``); returns the md path.

    Bodies are markdown: tables, bullet lists, paragraphs and ``![caption](file.png)`` images.
    """
    directory = Path(directory)
    md = [f"# {title}", ""]
    for heading, body in sections:
        md += [f"## {heading}", "", body.strip(), ""]
    md_path = directory / f"{name}.md"
    atomic_write_text(md_path, "\n".join(md))
    atomic_write_text(directory / f"{name}.html", _to_html(title, sections))
    if data is not None:
        atomic_write_json(directory / f"{name}.json", json.loads(json.dumps(data, default=str)))
    return md_path


def _to_html(title: str, sections: Sequence[tuple[str, str]]) -> str:
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}td{text-align:right}img{max-width:100%}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    for heading, body in sections:
        out.append(f"<h2>{html.escape(heading)}</h2>")
        out.append(_md_block_to_html(body))
    out.append("</body></html>")
    return "\n".join(out)


def _md_block_to_html(body: str) -> str:
    parts: list[str] = []
    table: list[list[str]] = []
    for line in body.strip().splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                table.append(cells)
            continue
        if table:
            head, *rest = table
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest]
            parts.append("</table>")
            table = []
        if line.startswith("!["):
            cap, src = line[2:].split("](", 1)
            parts.append(
                f"<figure><img src='{html.escape(src.rstrip(')'))}'><figcaption>{html.escape(cap)}"
                "</figcaption></figure>"
            )
        elif line.startswith("- "):
            parts.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            parts.append(f"<p>{html.escape(line)}</p>")
    return "\n".join(parts)
