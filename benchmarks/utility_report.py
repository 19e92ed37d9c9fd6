"""Tables of the utility study: mean ± std over seeds, the paper's row layout, markdown rendering."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from benchmarks.utility_config import ABLATION, ROWS

FACE_METRICS = (("identification", "Identification acc."), ("verification", "Verification acc. (10-fold)"))
REID_METRICS = (("mAP", "mAP"), ("rank1", "Rank-1"))


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "n", "values"}``; std is the sample standard deviation (ddof=1; 0 for one value)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals), "values": vals}


def aggregate(per_seed: Mapping[int, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Per metric, the mean ± std over the seeds that report it."""
    keys = sorted({k for metrics in per_seed.values() for k in metrics})
    return {k: mean_std([m[k] for m in per_seed.values() if k in m]) for k in keys}


def fmt_pct(stat: Mapping[str, Any] | None) -> str:
    """``95.1 ± 0.3`` (percent, one decimal), or ``n/a``."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    text = f"{100 * stat['mean']:.1f}"
    if stat.get("n", 0) > 1:
        text += f" ± {100 * stat['std']:.1f}"
    return text


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{float(value):.{digits}f}"


def metric_columns(task: str, sources: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(metric key, column title) of a task's results table (ReID: overall, then per source)."""
    if task == "face":
        return list(FACE_METRICS)
    cols = list(REID_METRICS)
    for source in sources:
        cols += [(f"{source}/mAP", f"{source} mAP"), (f"{source}/rank1", f"{source} R-1")]
    return cols


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(headers) - 2)) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def results_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """The paper-layout table (Type | Method | metrics...) of one setting's aggregated rows."""
    body = []
    for row in rows.values():
        cells = [fmt_pct(row["stats"].get(metric)) for metric, _ in columns]
        body.append([row["group"], row["method"], *cells])
    return _table(["Type", "Method", *[title for _, title in columns]], body)


def ablation_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """The paper's Figure 5 order (base DiT, + selection, + semantic, + coverage, + expansion)."""
    body = []
    for title, key in ABLATION:
        if key in rows:
            body.append([title, ROWS[key].method, *[fmt_pct(rows[key]["stats"].get(m)) for m, _ in columns]])
    if not body:
        return "No ablation rows were run.\n"
    return _table(["Step", "Row", *[t for _, t in columns]], body)


def quality_table(sets: Mapping[str, Mapping[str, Any]]) -> str:
    """Generator quality of every synthetic set: judge metrics, reward components, privacy audit."""
    body = []
    for name, q in sets.items():
        if "error" in q:
            body.append([name, "error: " + str(q["error"])[:60]] + ["n/a"] * 9)
            continue
        rewards, audit = q.get("rewards") or {}, q.get("audit") or {}
        flagged = audit.get("fraction_flagged")
        body.append(
            [
                name,
                str(q.get("num_images", "n/a")),
                "n/a" if q.get("fidelity") is None else f"{100 * q['fidelity']:.1f}",
                _num(q.get("diversity")),
                _num(q.get("diversity_ratio"), 2),
                _num(q.get("fid")),
                _num(q.get("kid"), 4),
                _num(rewards.get("sem")),
                _num(rewards.get("cov")),
                _num(rewards.get("exp")),
                "n/a" if flagged is None else f"{100 * flagged:.1f}",
            ]
        )
    headers = [
        "Set",
        "images",
        "fidelity %",
        "diversity",
        "div. syn/real",
        "FID",
        "KID",
        "sem",
        "cov",
        "exp",
        "near copies %",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def timing_table(stages: Sequence[Mapping[str, Any]]) -> str:
    """Stage | status | wall s | CPU s (CPU = process CPU time, all threads)."""
    lines = ["| stage | status | wall s | CPU s |", "|---|---|---:|---:|"]
    for s in stages:
        lines.append(f"| {s['name']} | {s['status']} | {s['wall_s']:.0f} | {s['cpu_s']:.0f} |")
    return "\n".join(lines) + "\n"


def render_markdown(report: Mapping[str, Any], env_line: str) -> str:
    """The study's markdown: per setting the results, ablation and quality tables, then the run."""
    task = report["task"]
    columns = metric_columns(task, list(report.get("reid_sources") or {}))
    parts = [f"# Utility study: {report['name']}\n\n", env_line]
    parts.append(f"\nCommand: `{report['command']}`\n\n")
    parts.append(report["description"] + "\n")
    for setting in report["settings"].values():
        parts.append(f"\n## {setting['title']}\n\n")
        parts.append(results_table(setting["rows"], columns))
        parts.append(f"\n{setting['caption']}\n")
        parts.append("\n### Ablation (paper Figure 5 order)\n\n")
        parts.append(ablation_table(setting["rows"], columns))
        parts.append("\n### Generator quality (judge feature space)\n\n")
        parts.append(quality_table(setting["sets"]))
        parts.append(f"\n{report['quality_caption']} {setting.get('judge_line', '')}\n")
    parts.append("\n## Run\n\n")
    parts.append(timing_table(report["stages"]))
    parts.append(
        f"\nTotal wall {report['total_wall_s'] / 60:.1f} min, CPU {report['total_cpu_s'] / 60:.1f} min "
        f"(stage times; a stage marked reused was finished by an earlier invocation of the same command and "
        f"shows the times recorded then).\n"
    )
    parts.append("\n" + report["sharing"] + "\n")
    return "".join(parts)
