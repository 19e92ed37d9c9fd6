"""The run report: results table, sample grids, reward curves, feature-space plot, privacy audit.

Every number and picture is computed from the run's artifacts (stage metrics, synthetic sets, the
baseline recognizer's export); nothing is typed in. ``write_report`` produces ``report.md`` and a
self-contained-enough ``report.html`` (images referenced next to it).
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rgsd_lightning.backbones import FeatureExtractor  # noqa: E402
from rgsd_lightning.callbacks.images import image_grid, save_png, to_uint8  # noqa: E402
from rgsd_lightning.callbacks.plots import save_figure  # noqa: E402
from rgsd_lightning.data.images import load_image  # noqa: E402
from rgsd_lightning.data.records import IdentityRecord, atomic_write_text, read_manifest  # noqa: E402
from rgsd_lightning.data.transforms import generator_transform  # noqa: E402


@dataclass
class Row:
    """One line of the results table: the metrics of one run, or of several runs (seeds) as mean ± std."""

    group: str
    method: str
    metrics: dict[str, float]
    spread: dict[str, float] | None = None

    @classmethod
    def over_runs(cls, group: str, method: str, runs: Sequence[dict[str, float]]) -> Row:
        """Mean (``metrics``) and sample standard deviation (``spread``, with 2+ runs) of each metric."""
        if not runs:
            raise ValueError(f"row {method!r}: no runs to aggregate")
        keys = sorted({k for r in runs for k in r})
        values = {k: np.array([r[k] for r in runs if k in r], dtype=np.float64) for k in keys}
        mean = {k: float(v.mean()) for k, v in values.items()}
        spread = {k: float(v.std(ddof=1)) for k, v in values.items() if len(v) > 1}
        return cls(group, method, mean, spread or None)


def results_table(rows: Sequence[Row], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table in the layout of the paper's Table 1 (values in %, one decimal; ``mean ± std``)."""
    head = "| Type | Method | " + " | ".join(title for _, title in columns) + " |"
    sep = "|---|---|" + "---:|" * len(columns)
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _ in columns:
            v = r.metrics.get(key)
            sd = (r.spread or {}).get(key)
            cell = "n/a" if v is None else f"{100 * v:.1f}"
            cells.append(cell if v is None or sd is None else f"{cell} ± {100 * sd:.1f}")
        lines.append(f"| {r.group} | {r.method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _by_identity(records: Sequence[IdentityRecord]) -> dict[str, list[IdentityRecord]]:
    out: dict[str, list[IdentityRecord]] = {}
    for r in records:
        out.setdefault(r.identity, []).append(r)
    return out


def comparison_grid(
    real: Sequence[IdentityRecord],
    sets: Sequence[Sequence[IdentityRecord]],
    identities: Sequence[str],
    path: str | os.PathLike,
    *,
    per_cell: int = 3,
    size: int = 32,
    mode: str = "RGB",
) -> Path:
    """Rows = identities; columns = ``per_cell`` real images, then ``per_cell`` from each synthetic set."""
    transform = generator_transform(size, 1 if mode == "L" else 3, hflip=False)
    groups = [_by_identity(real)] + [_by_identity(s) for s in sets]
    rows = []
    for identity in identities:
        row = []
        for group in groups:
            recs = group.get(identity, [])[:per_cell]
            imgs = [transform(load_image(r.path, mode)) for r in recs]
            row += imgs + [-torch.ones(1 if mode == "L" else 3, size, size)] * (per_cell - len(imgs))
        rows.append(row)
    grid = image_grid(rows, pad=2)
    path = Path(path)
    save_png(to_uint8(grid.unsqueeze(0))[0], path)
    return path


@torch.no_grad()
def embed(
    extractor: FeatureExtractor, records: Sequence[IdentityRecord], size: int, mode: str = "RGB"
) -> np.ndarray:
    """Features of image files as the reward sees them (generator square geometry, then the recognizer)."""
    transform = generator_transform(size, 1 if mode == "L" else 3, hflip=False)
    feats = []
    for i in range(0, len(records), 64):
        batch = torch.stack([transform(load_image(r.path, mode)) for r in records[i : i + 64]])
        feats.append(extractor(batch).cpu().numpy())
    return np.concatenate(feats) if feats else np.zeros((0, 1))


def feature_plot(
    extractor: FeatureExtractor,
    groups: dict[str, Sequence[IdentityRecord]],
    identities: Sequence[str],
    path: str | os.PathLike,
    *,
    size: int = 32,
    mode: str = "RGB",
) -> Path:
    """2-D PCA of real and synthetic features per identity (the paper's Figure 4; colour = identity,
    marker = source)."""
    markers = ["o", "s", "^", "D", "v"]
    keep = set(identities)
    feats, meta = [], []
    for gi, (name, records) in enumerate(groups.items()):
        recs = [r for r in records if r.identity in keep]
        if recs:
            feats.append(embed(extractor, recs, size, mode))
            meta += [(gi, name, r.identity) for r in recs]
    x = np.concatenate(feats)
    x = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for gi in range(len(groups)):
        for ci, identity in enumerate(identities):
            idx = [i for i, (g, _, ident) in enumerate(meta) if g == gi and ident == identity]
            if idx:
                ax.scatter(
                    xy[idx, 0],
                    xy[idx, 1],
                    s=26 if gi == 0 else 18,
                    marker=markers[gi % len(markers)],
                    color=colours(ci % 10),
                    alpha=0.85 if gi == 0 else 0.6,
                    edgecolors="k" if gi == 0 else "none",
                    linewidths=0.4,
                )
    for gi, name in enumerate(groups):
        ax.scatter([], [], marker=markers[gi % len(markers)], color="grey", label=name)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("recognizer features, PCA (colour = identity)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def audit_summary(card_path: str | os.PathLike) -> str:
    """A short markdown list from a synthetic set's card.json privacy audit."""
    card = json.loads(Path(card_path).read_text())
    audit = card.get("audit")
    if not audit:
        return "No privacy audit was recorded for this set."
    lines = [
        f"- images audited: {audit['num_images']}; flagged as near copies of a real training image: "
        f"{audit['num_flagged']} ({100 * audit['fraction_flagged']:.1f}%)"
    ]
    for space in ("pixel", "feature"):
        syn = audit.get("synthetic_nn", {}).get(space)
        same = audit.get("baseline", {}).get(space, {}).get("same_identity")
        if syn and same and syn.get("q50") is not None and same.get("q50") is not None:
            lines.append(
                f"- {space} space: median similarity of a synthetic image to its nearest real image "
                f"{syn['q50']:.3f}, of a real image to its nearest other real image of the same identity "
                f"{same['q50']:.3f}"
            )
    return "\n".join(lines)


def write_report(directory: str | os.PathLike, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write ``report.md`` and ``report.html`` from (heading, markdown body) sections; returns the md path.

    Bodies may hold markdown tables, bullet lists and ``![caption](file.png)`` images.
    """
    directory = Path(directory)
    md = [f"# {title}", ""]
    for heading, body in sections:
        md += [f"## {heading}", "", body.strip(), ""]
    md_path = directory / "report.md"
    atomic_write_text(md_path, "\n".join(md))
    atomic_write_text(directory / "report.html", _to_html(title, sections))
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


def read_set(directory: str | os.PathLike) -> list[IdentityRecord]:
    """The records of a synthetic set folder (empty when it has no manifest)."""
    path = Path(directory) / "manifest.jsonl"
    return read_manifest(path) if path.is_file() else []


def find_file(root: str | os.PathLike, name: str) -> Path | None:
    """The first file called ``name`` below ``root`` (e.g. a stage's reward_history.json)."""
    hits = sorted(Path(root).rglob(name))
    return hits[0] if hits else None


def load_json(path: str | os.PathLike) -> Any:
    """JSON from a file."""
    return json.loads(Path(path).read_text())
