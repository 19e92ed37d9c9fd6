"""``python -m benchmarks verdict``: the README's utility table and the issue's checks, from study results.

Reads ``benchmarks/results/utility_faces.json`` and ``utility_reid.json`` (written by ``python -m benchmarks
utility``) and their recognizer-budget runs (``faces_recognizer_budget_k1.json`` and
``faces_recognizer_budget.json`` for 1 and 3 shots, ``reid_recognizer_budget.json`` - the same rows,
recognizers trained 3x longer; ``reid_recognizer_budget_60.json`` the ReID deciding rows at 6x,
``reid_seed_noise_budget.json`` at 3x over 9 seeds), and prints, as markdown, the headline table (mean ± std
over seeds, in %) and the checks of the downstream issue: the floor (every row with selection at or above
"real only") and the goal ("+ Random Erasing + RL synthetic + selection" at least one point above "+ Random
Erasing"; "goal, filtered": the same with the reward-filtered, "goal, windowed" with the windowed-RL, "goal,
copy-free" with the copy-free synthetic set, "goal, from prior images" with the RL generator's samples started
from noised prior images, run on the 16-seed 1-shot and the 8-seed 3-shot 36-epoch rows only). Each check
shows its margin in points, from the unrounded means: for the floor the lowest selection row minus "real only"
(met at >= 0), for a goal its row minus "+ Random Erasing" (met at >= +1). A row a study has not run yet shows
"-" and counts as not met; "n/a": a row the study has by design not (the ReID study has no windowed-RL or
copy-free rows, its budget run no cold-start row; the seed-noise files ``seed_noise_faces.json`` and
``seed_noise_faces_k1.json`` hold only the rows that decide their setting's checks, as do
``faces_recognizer_budget_k1_yale.json``, the 1-shot rows on a second target, and
``faces_recognizer_budget_k3_prior.json``, the 3-shot 36-epoch rows over 8 seeds with the set from prior
images). ``seed_noise_faces_k1_resampled.json`` and ``faces_recognizer_budget_k3_resampled.json`` hold the
1-shot and 3-shot deciding rows retrained after the sampler fix, 8 seeds each (the 3-shot setting reads
``faces_recognizer_budget_k3_sdedit90.json``, those rows reused plus the set from prior images at strength
0.9); the settings measured before it - when every recognizer epoch replayed the first epoch's batches - are
marked ‡ (:data:`SAMPLER_FIXED` names the studies run after it). A fourth table sets each retrained row
against the same row and seeds before the fix (:data:`REFITS`; the ReID runs, rebuilt whole, against their
earlier results kept as ``utility_reid_replayed.json`` and ``reid_recognizer_budget_replayed.json``).
``reid_synthetic_norm.json`` holds the ReID study's rows with selection beside the same rows with the
synthetic samples forwarded apart in BatchNorm (``synthetic_norm: real``), ``reid_synthetic_norm_budget.json``
the same at 30 epochs: their settings' selection columns read those (:data:`VARIANTS`), the third table has
both, and the rows whose dropped synthetic samples are left out of the training forward (``synthetic_norm:
kept``); ``reid_guidance_budget.json`` the 30-epoch deciding rows with the RL generator sampled at
guidance 4 instead of the study's 2 (its selection columns, as a variant), ``reid_guidance.json`` and
``reid_guidance_budget_60.json`` the same rows at 10 and 60 epochs. ``reid_seed_noise.json`` holds
the ReID study's deciding rows over 6 seeds,
``faces_common_random.json`` the faces study's over 8 seeds with common random numbers (synthetic images added
on top of the K real ones, chain rebuilt). The settings measured after the sampler fix but before common
random numbers (be9fc92: a synthetic row's real batches and their augmentations are now its real-only row's)
are marked § (:data:`COMMON_RANDOM` names the studies run with them); ``utility_reid_shared_stream.json``,
``reid_synthetic_norm_shared_stream.json`` and ``reid_recognizer_budget_shared_stream.json`` (and the same for
``reid_synthetic_norm_budget`` and ``reid_cold_long``) keep the ReID results from before them. ``--study
NAME`` prints one results file's rows with their paired differences against its real-only rows (or the stages
given with ``--against``); ``--with OTHER ...`` adds the rows of other results files (a study's rows that ran
in the study it extends; a seed both files hold must have the same value, so only the same runs merge).

A second table gives each check as a paired comparison over seeds: the mean of the per-seed differences
(the rows share recognizer seeds), its 95 % Student-t interval, and whether the interval settles the check.
A third asks the issue's question directly for every real-only recipe a study ran (no augmentation, Random
Erasing, and where a study has them photometric jitter and both): what the RL set with selection adds on
top of the recipe - and, where a study ran them, the RL generator's sets started from prior images (SDEdit)
- paired over seeds, with the best real-only recipe of each setting marked. Rows beyond the first table's
columns (the photometric and from-prior-images ones) count towards the floor where a study ran them; the
no-generator control's rows do not (a diagnostic, not a synthetic set of the method).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLUMNS = {  # column -> stage suffix of the studies' downstream rows
    "real only": "real",
    "+ Random Erasing": "erasing",
    "+ cold-start synthetic": "cold",
    "+ RL synthetic": "rl",
    "+ RL synthetic + selection": "rl_selection",
    "+ Random Erasing + RL synthetic + selection": "erasing_rl_selection",
    "+ RL synthetic, reward-filtered, + selection": "rl_filtered_selection",
    "+ Random Erasing + RL synthetic, reward-filtered, + selection": "erasing_rl_filtered_selection",
    "+ windowed-RL synthetic + selection": "rl_windowed_selection",
    "+ Random Erasing + windowed-RL synthetic + selection": "erasing_rl_windowed_selection",
    "+ copy-free synthetic + selection": "private_selection",
    "+ Random Erasing + copy-free synthetic + selection": "erasing_private_selection",
    "+ Random Erasing + RL synthetic from prior images + selection": "erasing_sdedit80_selection",
}
GOALS = {  # check -> the column that must beat "+ Random Erasing" by one point
    "goal": "+ Random Erasing + RL synthetic + selection",
    "goal, filtered": "+ Random Erasing + RL synthetic, reward-filtered, + selection",
    "goal, windowed": "+ Random Erasing + windowed-RL synthetic + selection",
    "goal, copy-free": "+ Random Erasing + copy-free synthetic + selection",
    "goal, from prior images": "+ Random Erasing + RL synthetic from prior images + selection",
}
REAL_RECIPES = {  # real-only recipe -> its stage suffix
    "none": "real",
    "Random Erasing": "erasing",
    "photometric jitter": "photometric",
    "Random Erasing + photometric jitter": "erasing_photometric",
}
SETS = {  # synthetic set of a study's "<recipe>_<set>_selection" rows -> its name in the third table
    "rl": "RL",
    "sdedit60": "RL from prior images, strength 0.6",
    "sdedit80": "RL from prior images, strength 0.8",
    "sdedit90": "RL from prior images, strength 0.9",
    "sdedit80utk": "RL from UTKFace images, strength 0.8",
    "rl_realnorm": "RL, synthetic samples apart in BatchNorm",
    "rl_keptnorm": "RL, dropped synthetic samples out of BatchNorm",
    "rl_g4": "RL, sampled at guidance 4",
    "lowfreq": "control: training image + prior images' low frequencies",
}


def _recipe(name: str, synthetic: str) -> tuple[str, str, str, str]:
    """(recipe, its stage suffix, the suffix of recipe + synthetic set + selection, the set's name)."""
    stage = REAL_RECIPES[name]
    prefix = "" if stage == "real" else f"{stage}_"
    return name, stage, f"{prefix}{synthetic}_selection", SETS[synthetic]


RECIPE_SETS = (  # (real-only recipe, synthetic set) of the third table's rows, in its order
    ("none", "rl"),
    ("Random Erasing", "rl"),
    ("photometric jitter", "rl"),
    ("Random Erasing + photometric jitter", "rl"),
    ("Random Erasing + photometric jitter", "sdedit60"),
    ("Random Erasing + photometric jitter", "sdedit80"),
    ("Random Erasing + photometric jitter", "lowfreq"),
    ("none", "sdedit80"),
    ("none", "sdedit90"),
    ("none", "lowfreq"),
    ("Random Erasing", "sdedit80"),
    ("Random Erasing", "sdedit90"),
    ("Random Erasing", "sdedit80utk"),
    ("Random Erasing", "lowfreq"),
    ("none", "rl_realnorm"),
    ("Random Erasing", "rl_realnorm"),
    ("none", "rl_keptnorm"),
    ("Random Erasing", "rl_keptnorm"),
    ("none", "rl_g4"),
    ("Random Erasing", "rl_g4"),
)
RECIPES = tuple(_recipe(name, synthetic) for name, synthetic in RECIPE_SETS)
CONTROLS = ("lowfreq",)  # sets made without the generator: diagnostics, outside the floor
EXTRA_SELECTION = [  # floor rows, where run: the third table's beyond the first's columns, but the controls
    syn
    for (_, synthetic), (_, _, syn, _) in zip(RECIPE_SETS, RECIPES, strict=True)
    if synthetic not in CONTROLS and syn not in COLUMNS.values()
]
COLD = "+ cold-start synthetic"
FILTERED = (  # names of column groups, for the columns a setting has no rows for
    "+ RL synthetic, reward-filtered, + selection",
    "+ Random Erasing + RL synthetic, reward-filtered, + selection",
)
WINDOWED = ("+ windowed-RL synthetic + selection", "+ Random Erasing + windowed-RL synthetic + selection")
COPY_FREE = ("+ copy-free synthetic + selection", "+ Random Erasing + copy-free synthetic + selection")
FACES_ONLY = (*WINDOWED, *COPY_FREE)  # rows the ReID study has not (0.2 % near copies; its RL stays DPOK)
# run in the ORL 16-seed 1-shot and 8-seed 3-shot settings only
FROM_PRIOR = ("+ Random Erasing + RL synthetic from prior images + selection",)
# a ReID study of the deciding rows only (real only, Random Erasing, the RL set with selection with and
# without it): every other column
REID_DECIDING_ONLY = (COLD, "+ RL synthetic", *FILTERED, *FACES_ONLY, *FROM_PRIOR)
SETTINGS = (  # (row label, study, stage prefix, metric, columns the study has no rows for by design)
    ("ORL 1-shot, identification %", "utility_faces", "k1", "test/id_acc", FROM_PRIOR),
    ("ORL 3-shot, identification %", "utility_faces", "k3", "test/id_acc", FROM_PRIOR),
    ("4-dataset ReID, mAP %", "utility_reid", "all", "test/mAP", (*FACES_ONLY, *FROM_PRIOR)),
    # the recognizer-budget files: the same rows with 3x longer recognizer training
    ("ORL 1-shot, 36-epoch recognizers", "faces_recognizer_budget_k1", "k1", "test/id_acc", FROM_PRIOR),
    ("ORL 3-shot, 36-epoch recognizers", "faces_recognizer_budget", "k3", "test/id_acc", FROM_PRIOR),
    (
        "4-dataset ReID, 30-epoch recognizers",
        "reid_recognizer_budget",
        "all",
        "test/mAP",
        (COLD, *FACES_ONLY, *FROM_PRIOR),
    ),
    (  # the deciding rows at 30 epochs (where real only's test mAP peaks) over 9 seeds
        "4-dataset ReID, 30-epoch recognizers, 9 seeds",
        "reid_seed_noise_budget",
        "all",
        "test/mAP",
        REID_DECIDING_ONLY,
    ),
    (  # the deciding rows at 60 epochs, where real only fits its training images (train_fit_reid.md)
        "4-dataset ReID, 60-epoch recognizers",
        "reid_recognizer_budget_60",
        "all",
        "test/mAP",
        REID_DECIDING_ONLY,
    ),
    # the seed-noise files: the rows that decide a setting's checks, over more seeds
    (
        "ORL 3-shot, 8 seeds",
        "seed_noise_faces",
        "k3",
        "test/id_acc",
        (*FILTERED, *WINDOWED, COLD, *FROM_PRIOR),
    ),
    (
        "ORL 1-shot, 36-epoch recognizers, 16 seeds",
        "seed_noise_faces_k1",
        "k1",
        "test/id_acc",
        (COLD, "+ RL synthetic", *FILTERED, *COPY_FREE),
    ),
    (
        "ORL 3-shot, 36-epoch recognizers, 8 seeds",
        "faces_recognizer_budget_k3_prior",
        "k3",
        "test/id_acc",
        (COLD, "+ RL synthetic", *FILTERED, *WINDOWED, *COPY_FREE),
    ),
    # the 16-seed 1-shot and 8-seed 3-shot settings' rows retrained after the sampler fix (every recognizer
    # epoch its own batches), 8 seeds
    (
        "ORL 1-shot, 36-epoch recognizers, 8 seeds, sampler fixed",
        "seed_noise_faces_k1_resampled",
        "k1",
        "test/id_acc",
        (COLD, "+ RL synthetic", *FILTERED, *WINDOWED, *COPY_FREE),
    ),
    (  # the resampled run's rows (reused) and the set started from prior images at strength 0.9
        "ORL 3-shot, 36-epoch recognizers, 8 seeds, sampler fixed",
        "faces_recognizer_budget_k3_sdedit90",
        "k3",
        "test/id_acc",
        (COLD, "+ RL synthetic", *FILTERED, *WINDOWED, *COPY_FREE),
    ),
    # the ReID study's rows with selection, the synthetic samples also forwarded apart (synthetic_norm: real)
    (
        "4-dataset ReID, synthetic apart in BatchNorm",
        "reid_synthetic_norm",
        "all",
        "test/mAP",
        REID_DECIDING_ONLY,
    ),
    (
        "4-dataset ReID, 30-epoch recognizers, synthetic apart in BatchNorm",
        "reid_synthetic_norm_budget",
        "all",
        "test/mAP",
        REID_DECIDING_ONLY,
    ),
    # the deciding rows with the RL generator sampled at guidance 4 (the study's set: 2): 30 epochs over 9
    # seeds, 10 and 60 epochs over 6
    (
        "4-dataset ReID, 30-epoch recognizers, RL set at guidance 4",
        "reid_guidance_budget",
        "all",
        "test/mAP",
        REID_DECIDING_ONLY,
    ),
    (
        "4-dataset ReID, RL set at guidance 4",
        "reid_guidance",
        "all",
        "test/mAP",
        REID_DECIDING_ONLY,
    ),
    (
        "4-dataset ReID, 60-epoch recognizers, RL set at guidance 4",
        "reid_guidance_budget_60",
        "all",
        "test/mAP",
        REID_DECIDING_ONLY,
    ),
    # the ReID study's deciding rows over 6 seeds (its seeds 0-2 and 3-5), with the rows whose dropped
    # synthetic samples leave BatchNorm alone (synthetic_norm: kept) in the third table and the floor
    (
        "4-dataset ReID, 6 seeds",
        "reid_seed_noise",
        "all",
        "test/mAP",
        ("+ RL synthetic", *FILTERED, *FACES_ONLY, *FROM_PRIOR),
    ),
    # the faces study's deciding rows with common random numbers (synthetic images added on top of the K
    # real ones), generator chain rebuilt, 8 seeds
    (
        "ORL 1-shot, 8 seeds, common random numbers",
        "faces_common_random",
        "k1",
        "test/id_acc",
        (COLD, *FILTERED, *FACES_ONLY, *FROM_PRIOR),
    ),
    (
        "ORL 3-shot, 8 seeds, common random numbers",
        "faces_common_random",
        "k3",
        "test/id_acc",
        (COLD, *FILTERED, *FACES_ONLY, *FROM_PRIOR),
    ),
    # a second target for the 1-shot, 36-epoch rows: Extended Yale B (UTKFace prior), 5 seeds
    (
        "Extended Yale B 1-shot, 36-epoch recognizers",
        "faces_recognizer_budget_k1_yale",
        "k1",
        "test/id_acc",
        (COLD, "+ RL synthetic", *FILTERED, WINDOWED[0], *COPY_FREE, *FROM_PRIOR),
    ),
)

VARIANTS = {  # study -> {column's stage suffix: the suffix its rows use there}
    # the ReID rows with the synthetic samples apart in BatchNorm fill that setting's selection columns
    "reid_synthetic_norm": {
        "rl_selection": "rl_realnorm_selection",
        "erasing_rl_selection": "erasing_rl_realnorm_selection",
    },
}
VARIANTS["reid_synthetic_norm_budget"] = VARIANTS["reid_synthetic_norm"]  # the same rows, 30 epochs
VARIANTS["reid_guidance_budget"] = {  # the RL generator's set sampled at guidance 4
    "rl_selection": "rl_g4_selection",
    "erasing_rl_selection": "erasing_rl_g4_selection",
}
VARIANTS["reid_guidance"] = VARIANTS["reid_guidance_budget"]  # the same rows, 10 epochs
VARIANTS["reid_guidance_budget_60"] = VARIANTS["reid_guidance_budget"]  # the same rows, 60 epochs

COMMON_RANDOM = frozenset(
    {
        "utility_reid",
        "reid_synthetic_norm",
        "reid_recognizer_budget",
        "reid_recognizer_budget_60",
        "reid_seed_noise_budget",
        "reid_synthetic_norm_budget",
        "reid_seed_noise",
        "faces_common_random",
        "reid_guidance_budget",
        "reid_guidance",
        "reid_guidance_budget_60",
    }
)
"""Studies whose synthetic rows ran with common random numbers (be9fc92: the synthetic picks and their
augmentations on streams of their own, so a synthetic row sees its real-only row's real batches); the other
studies after the sampler fix are marked §."""

SAMPLER_FIXED = COMMON_RANDOM | {  # and the studies after the sampler fix, before common random numbers
    "seed_noise_faces_k1_resampled",
    "faces_recognizer_budget_k3_resampled",
    "faces_recognizer_budget_k3_sdedit90",
}
"""Studies whose recognizers ran after the sampler fix (eb4ddd7); the others' replayed epoch 0's batches."""

REFITS = (  # (setting label, study before the sampler fix, the same rows retrained after it, prefix, metric)
    (
        "ORL 1-shot, 36-epoch recognizers",
        "seed_noise_faces_k1",
        "seed_noise_faces_k1_resampled",
        "k1",
        "test/id_acc",
    ),
    (
        "ORL 3-shot, 36-epoch recognizers",
        "faces_recognizer_budget_k3_prior",
        "faces_recognizer_budget_k3_resampled",
        "k3",
        "test/id_acc",
    ),
    # the ReID runs were rebuilt whole (generator chain included) into their own files; the replayed-batch
    # results are kept beside them as *_replayed.json
    ("4-dataset ReID, mAP %", "utility_reid_replayed", "utility_reid", "all", "test/mAP"),
    (
        "4-dataset ReID, 30-epoch recognizers, mAP %",
        "reid_recognizer_budget_replayed",
        "reid_recognizer_budget",
        "all",
        "test/mAP",
    ),
)


PAIRED_CAPTION = (
    "The same checks as paired differences over seeds (each row minus its reference trained with the same "
    'recognizer seed: for the floor the lowest selection column minus "real only", for a goal its column '
    'minus "+ Random Erasing"): mean [95 % Student-t interval] in points, and "met" / "missed" '
    "where the interval lies wholly at or above / below the check's threshold (0 for the floor, +1 for a "
    'goal), "unresolved" where it holds the threshold.\n'
)


def stage_stats(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every table row of a study report by stage: {stage: {"mean": {...}, "std": {...}}}."""
    out: dict[str, dict[str, Any]] = {}
    for section in report.get("sections", []):
        for row in section.get("rows", []) or []:
            if "stage" in row and any(k.startswith("test/") for k in row.get("mean") or {}):
                out.setdefault(row["stage"], row)  # a results table row (not a selection-precision row)
    return out


def cell(stats: dict[str, dict[str, Any]], stage: str, metric: str) -> tuple[float, float] | None:
    row = stats.get(stage)
    if row is None or metric not in (row.get("mean") or {}):
        return None
    return 100 * float(row["mean"][metric]), 100 * float((row.get("std") or {}).get(metric, 0.0))


def seed_values(row: dict[str, Any] | None, metric: str) -> dict[str, float] | None:
    """A row's per-seed values in %, keyed by seed: the copy's suffix ("_s3") where the report names each
    run's copy (``copies``), its position ("#3") in reports written before it did. None without runs."""
    runs = (row or {}).get("runs") or []
    if not runs or any(metric not in r for r in runs):
        return None
    copies = row.get("copies")
    if copies is not None and len(copies) == len(runs):
        keys = [str(name)[len(row["stage"]) :] for name in copies]
    else:
        keys = [f"#{i}" for i in range(len(runs))]
    return {key: 100 * float(r[metric]) for key, r in zip(keys, runs, strict=True)}


def seed_pairs(a: dict[str, float] | None, b: dict[str, float] | None) -> list[tuple[float, float]]:
    """The (a, b) values of the seeds both rows have. Where either row is keyed by position (a report written
    before reports named each run's copy), the runs pair by position if both rows have as many, else none:
    which run is which seed is then unknown."""
    if a is None or b is None:
        return []
    if any(k.startswith("#") for k in (*a, *b)):
        return list(zip(a.values(), b.values(), strict=True)) if len(a) == len(b) else []
    return [(a[k], b[k]) for k in a if k in b]


def paired(
    a: dict[str, float] | None, b: dict[str, float] | None, threshold: float, level: float = 0.95
) -> dict[str, Any] | None:
    """Mean of the per-seed differences a - b over the seeds both rows have, with its two-sided Student-t
    confidence interval, and where the interval lies against ``threshold``: "met" (wholly at or above it),
    "missed" (wholly below it) or "unresolved". None with fewer than 2 common seeds, or position-keyed rows
    of different lengths (which run is which seed is then unknown)."""
    from scipy.stats import t

    pairs = seed_pairs(a, b)
    n = len(pairs)
    if n < 2:
        return None
    diffs = [x - y for x, y in pairs]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    status = "met" if low >= threshold else "missed" if high < threshold else "unresolved"
    return {"mean": mean, "low": low, "high": high, "n": n, "status": status}


def verdict(results: Path) -> dict[str, Any]:
    """The table cells and the checks, per setting."""
    out: dict[str, Any] = {}
    for label, study, prefix, metric, absent in SETTINGS:
        path = results / f"{study}.json"
        stats = stage_stats(json.loads(path.read_text())) if path.is_file() else {}
        columns = {col: VARIANTS.get(study, {}).get(suffix, suffix) for col, suffix in COLUMNS.items()}
        cells = {col: cell(stats, f"{prefix}_{suffix}", metric) for col, suffix in columns.items()}
        real, erasing = cells["real only"], cells["+ Random Erasing"]
        extra = {s: cell(stats, f"{prefix}_{s}", metric) for s in EXTRA_SELECTION}  # keyed by suffix
        found = {**cells, **extra}
        selection_columns = [col for col in COLUMNS if col.endswith("selection") and col not in absent]
        selection_columns += [s for s, c in extra.items() if c is not None]
        selection = [found[col] for col in selection_columns]
        floor = real is not None and all(c is not None and c[0] >= real[0] for c in selection)
        complete = real is not None and selection and all(c is not None for c in selection)
        margins = {"floor": min(c[0] for c in selection) - real[0] if complete else None}
        suffixes = {**columns, **{s: s for s in EXTRA_SELECTION}}
        values = {col: seed_values(stats.get(f"{prefix}_{s}"), metric) for col, s in suffixes.items()}
        lowest = min(selection_columns, key=lambda col: found[col][0]) if complete else None
        tests = {"floor": paired(values[lowest], values["real only"], 0.0) if complete else None}
        out[label] = {"cells": cells, "floor": floor, "absent": list(absent), "study": study}
        out[label]["replayed"] = study not in SAMPLER_FIXED
        out[label]["shared_stream"] = study in SAMPLER_FIXED and study not in COMMON_RANDOM
        for check, column in GOALS.items():
            both = cells[column]
            met = erasing is not None and both is not None and both[0] >= erasing[0] + 1.0
            out[label][check] = None if column in absent else met
            margins[check] = both[0] - erasing[0] if erasing is not None and both is not None else None
            tests[check] = paired(values[column], values["+ Random Erasing"], 1.0)
        out[label]["margins"] = margins
        out[label]["paired"] = tests
        out[label]["recipes"] = recipes(stats, prefix, metric)
    return out


def recipes(stats: dict[str, dict[str, Any]], prefix: str, metric: str) -> list[dict[str, Any]]:
    """What each synthetic set with selection adds on top of each real-only recipe the study ran: the
    recipe's mean, the mean with the synthetic set, their paired difference against +1 point, and whether
    the recipe is the setting's best real-only one (highest mean)."""
    out = []
    for name, real, synthetic, set_name in RECIPES:
        base, both = cell(stats, f"{prefix}_{real}", metric), cell(stats, f"{prefix}_{synthetic}", metric)
        if base is None or both is None:
            continue
        a = seed_values(stats.get(f"{prefix}_{synthetic}"), metric)
        gain = paired(a, seed_values(stats.get(f"{prefix}_{real}"), metric), 1.0)
        out.append(
            {
                "recipe": name,
                "stage": real,
                "set": set_name,
                "real": base,
                "synthetic": both,
                "paired": gain,
                "best": False,
            }
        )
    if out:
        best = max(out, key=lambda r: r["real"][0])["stage"]
        for r in out:
            r["best"] = r["stage"] == best
    return out


def mark(met: bool | None, margin: float | None) -> str:
    """A check's cell: met / missed, with its margin in points where both rows exist."""
    if met is None:
        return "n/a"
    word = "met" if met else "missed"
    return word if margin is None else f"{word} ({margin:+.2f})"


OUTSIDE_MARK = " †"
OUTSIDE_NOTE = (
    "† the setting's best real-only recipe is outside these columns (the third table has it and what the "
    "synthetic set adds on top of it).\n"
)


REPLAYED_MARK = " ‡"
REPLAYED_NOTE = (
    "‡ measured before the sampler fix of 2026-12-03 (eb4ddd7): each recognizer epoch replayed the first "
    "epoch's P x K batches (the same identities, images and synthetic samples; only the augmentation "
    "differed).\n"
)


SHARED_MARK = " §"
SHARED_NOTE = (
    "§ measured before common random numbers (be9fc92): a synthetic row's synthetic picks and augmentations "
    "drew from the stream of its real ones, so its real batches and their augmentations differed from those "
    "of the real-only rows it is compared with (noisier paired differences; the real-only rows themselves "
    "are unaffected).\n"
)


def shown_label(label: str, entry: dict[str, Any]) -> str:
    """A setting's label with its mark where its recognizers ran before the sampler fix (‡) or, after it,
    before common random numbers (§)."""
    mark = REPLAYED_MARK if entry.get("replayed") else SHARED_MARK if entry.get("shared_stream") else ""
    return label + mark


def notes(table: dict[str, Any], outside: bool) -> str:
    """The footnotes the table's marks need (a blank line before them), or nothing."""
    lines = [OUTSIDE_NOTE] if outside else []
    lines += [REPLAYED_NOTE] if any(entry.get("replayed") for entry in table.values()) else []
    lines += [SHARED_NOTE] if any(entry.get("shared_stream") for entry in table.values()) else []
    return "\n" + "\n".join(lines) if lines else ""


def best_outside(entry: dict[str, Any]) -> bool:
    """Whether the setting's best real-only recipe is one the first table has no column for."""
    return any(r["best"] and r["stage"] not in COLUMNS.values() for r in entry.get("recipes", []))


def markdown(table: dict[str, Any]) -> str:
    checks = ["floor", *GOALS]
    head = ["setting", *COLUMNS, *checks]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(COLUMNS) + ":---:|" * len(checks)]
    for label, entry in table.items():
        values = [c for c in entry["cells"].values() if c is not None]
        best = max(v[0] for v in values) if values else None
        cells = []
        for col, c in entry["cells"].items():
            if col in entry["absent"]:
                cells.append("n/a")
            elif c is None:
                cells.append("-")
            else:
                text = f"{c[0]:.1f} ± {c[1]:.1f}"
                cells.append(f"**{text}**" if c[0] == best else text)
        marks = [mark(entry[check], entry["margins"][check]) for check in checks]
        shown = shown_label(label, entry) + (OUTSIDE_MARK if best_outside(entry) else "")
        lines.append("| " + " | ".join([shown, *cells, *marks]) + " |")
    outside = any(best_outside(entry) for entry in table.values())
    return "\n".join(lines) + "\n" + notes(table, outside)


HEADLINE = (  # the first table's columns the headline keeps
    "real only",
    "+ Random Erasing",
    "+ RL synthetic + selection",
    "+ Random Erasing + RL synthetic + selection",
)
HEADLINE_CAPTION = (
    "The settings measured with the current protocol (recognizers after the sampler fix, synthetic rows with "
    "common random numbers) and the default recipe: mean ± std over seeds in %; floor: the setting's lowest "
    'row with selection (the full tables name every one) minus "real only"; goal: "+ Random Erasing + RL '
    'synthetic + selection" minus "+ Random Erasing"; each the mean of the per-seed differences in points '
    '[95 % Student-t interval], "met" / "missed" / "unresolved" against 0 (floor) and +1 (goal).\n'
)


def current(table: dict[str, Any]) -> dict[str, Any]:
    """The settings measured with the current protocol (neither ‡ nor §) with the default recipe (no
    :data:`VARIANTS` study) that have a real-only row."""
    return {
        label: entry
        for label, entry in table.items()
        if not entry.get("replayed")
        and not entry.get("shared_stream")
        and entry.get("study") not in VARIANTS
        and entry["cells"].get("real only") is not None
    }


def _interval(p: dict[str, Any] | None) -> str:
    return "-" if p is None else f"{p['mean']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}] {p['status']}"


def headline_markdown(table: dict[str, Any]) -> str:
    """The README's verdict table: :func:`current` settings, the four deciding columns, the paired floor and
    goal."""
    head = ["setting", "seeds", *HEADLINE, "floor", "goal"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(HEADLINE) + ":---:|:---:|"]
    for label, entry in current(table).items():
        tests = entry["paired"]
        seeds = {str(p["n"]) for p in (tests["floor"], tests["goal"]) if p is not None}
        cells = []
        for col in HEADLINE:
            c = entry["cells"][col]
            cells.append("-" if c is None else f"{c[0]:.1f} ± {c[1]:.1f}")
        checks = [_interval(tests["floor"]), _interval(tests["goal"])]
        seed_counts = "/".join(sorted(seeds, key=int)) or "-"
        lines.append("| " + " | ".join([label, seed_counts, *cells, *checks]) + " |")
    return "\n".join(lines) + "\n"


def paired_markdown(table: dict[str, Any]) -> str:
    """The checks as paired differences over seeds: mean [95 % interval] and where the interval lies."""
    checks = ["floor", *GOALS]
    lines = ["| setting | seeds | " + " | ".join(checks) + " |", "|---|---:|" + ":---:|" * len(checks)]
    for label, entry in table.items():
        tests = entry["paired"]
        seeds = {str(p["n"]) for p in tests.values() if p is not None}
        cells = []
        for check in checks:
            p = tests[check]
            if entry[check] is None:
                cells.append("n/a")
            else:
                cells.append(_interval(p))
        seed_counts = "/".join(sorted(seeds, key=int)) or "-"
        lines.append("| " + " | ".join([shown_label(label, entry), seed_counts, *cells]) + " |")
    return "\n".join(lines) + "\n" + notes(table, False)


RECIPES_CAPTION = (
    "What a synthetic set with selection adds on top of each real-only recipe a study ran (mean ± std over "
    "seeds in %; the gain paired over seeds, mean [95 % Student-t interval] in points, against the goal's +1 "
    "point; **bold**: the setting's best real-only recipe). RL: the RL generator's set; from prior images: "
    "the same generator, every sample started from a noised image of the prior corpus (SDEdit, "
    "``init_images``) at the strength given; control: no generator, the training image with those start "
    "images' low frequencies (``python -m benchmarks lowfreq_control``).\n"
)


def recipes_markdown(table: dict[str, Any]) -> str:
    """One line per (setting, real-only recipe) that has both rows."""
    lines = [
        "| setting | real-only recipe | recipe | synthetic set | + syn + sel | gain |",
        "|---|---|---:|---|---:|:---:|",
    ]
    for label, entry in table.items():
        for r in entry["recipes"]:
            recipe = f"**{r['recipe']}**" if r["best"] else r["recipe"]
            p = r["paired"]
            gain = _interval(p)
            real, syn = (f"{c[0]:.1f} ± {c[1]:.1f}" for c in (r["real"], r["synthetic"]))
            lines.append(f"| {shown_label(label, entry)} | {recipe} | {real} | {r['set']} | {syn} | {gain} |")
    return "\n".join(lines) + "\n" + notes(table, False)


REFIT_CAPTION = (
    "The rows retrained after the sampler fix against the same rows before it, on the seeds both have "
    "(identification % on faces, mAP % on ReID, mean over those seeds; change in points). The ReID runs were "
    "rebuilt whole, their generator chains included, so their synthetic rows compare different sets, and "
    "their synthetic rows were retrained since with common random numbers (the after column).\n"
)


def refits(results: Path) -> list[dict[str, Any]]:
    """Per retrained row: its means before and after the sampler fix over the seeds both runs have."""
    out = []
    for label, before, after, prefix, metric in REFITS:
        paths = [results / f"{study}.json" for study in (before, after)]
        if not all(path.is_file() for path in paths):
            continue
        old, new = (stage_stats(json.loads(path.read_text())) for path in paths)
        for stage in new:
            pairs = seed_pairs(seed_values(old.get(stage), metric), seed_values(new.get(stage), metric))
            if not stage.startswith(f"{prefix}_") or not pairs:
                continue
            mean_a, mean_b = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
            out.append(
                {"setting": label, "stage": stage, "seeds": len(pairs), "before": mean_a, "after": mean_b}
            )
    return out


def refits_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| setting | row | seeds | before | after | change |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        change = r["after"] - r["before"]
        cells = [
            r["setting"],
            r["stage"],
            str(r["seeds"]),
            f"{r['before']:.1f}",
            f"{r['after']:.1f}",
            f"{change:+.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def merged_stats(
    report: dict[str, Any], others: Sequence[dict[str, Any]], metric: str
) -> dict[str, dict[str, Any]]:
    """:func:`stage_stats` of ``report`` with the rows of ``others`` (the reports of studies it shares stages
    with, e.g. the one its config extends) added: per stage the row with the most runs. Where two reports
    both have a seed of a stage, its ``metric`` must be the same in both (the same run, or a bit-exact rerun
    of it); anything else is a ValueError naming the stage and the seed, since those rows are not the same
    runs and cannot be paired as one."""
    stats = stage_stats(report)
    for other in others:
        for stage, row in stage_stats(other).items():
            mine = stats.get(stage)
            if mine is None:
                stats[stage] = row
                continue
            a, b = seed_values(mine, metric) or {}, seed_values(row, metric) or {}
            for seed in a.keys() & b.keys():
                if not math.isclose(a[seed], b[seed], rel_tol=1e-9, abs_tol=1e-12):
                    raise ValueError(
                        f"{stage}{seed}: {metric} is {a[seed]:.6f} in one report and {b[seed]:.6f} in "
                        "another: not the same run, so the reports cannot be merged"
                    )
            if len(b) > len(a):
                stats[stage] = row
    return stats


def study_pairs(
    report: dict[str, Any],
    metric: str,
    against: Sequence[str] | None = None,
    others: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Every results row of one study report with its mean and its paired difference against each
    reference stage (default: the report's real-only recipes, the stages ending in "_real" or "_erasing"),
    threshold 0: the figures the README quotes for rows outside the verdict's tables. ``others``: reports
    whose rows join this one's (:func:`merged_stats`)."""
    stats = merged_stats(report, others, metric)
    refs = list(against) if against else [s for s in stats if s.endswith(("_real", "_erasing"))]
    missing = [r for r in refs if r not in stats]
    if missing:
        raise ValueError(f"reference stages not in the report: {missing} (it has {sorted(stats)})")
    out = []
    for stage, row in stats.items():
        values = seed_values(row, metric)
        if values is None:
            continue
        vs = {
            ref: None if ref == stage else paired(values, seed_values(stats[ref], metric), 0.0)
            for ref in refs
        }
        out.append({"stage": stage, "seeds": len(values), "mean": cell(stats, stage, metric), "vs": vs})
    return out


def study_pairs_markdown(rows: list[dict[str, Any]]) -> str:
    refs = list(rows[0]["vs"]) if rows else []
    lines = ["| row | seeds | mean ± std | " + " | ".join(f"- {ref}" for ref in refs) + " |"]
    lines.append("|---|---:|---:|" + "---:|" * len(refs))
    for r in rows:
        cells = [r["stage"], str(r["seeds"]), f"{r['mean'][0]:.2f} ± {r['mean'][1]:.2f}"]
        for ref in refs:
            t = r["vs"].get(ref)
            cells.append("" if t is None else f"{t['mean']:+.2f} [{t['low']:+.2f}, {t['high']:+.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def full_markdown(table: dict[str, Any], refit_rows: list[dict[str, Any]]) -> str:
    """Every table with its caption: the headline, the checks, the paired checks, the recipes, the refits."""
    return "\n".join(
        [
            HEADLINE_CAPTION,
            headline_markdown(table),
            markdown(table),
            PAIRED_CAPTION,
            paired_markdown(table),
            RECIPES_CAPTION,
            recipes_markdown(table),
            REFIT_CAPTION,
            refits_markdown(refit_rows),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print the tables (``--headline``: the current-protocol table only; ``--out``: also write them as
    ``verdict.json`` / ``verdict.md``), or with ``--study`` one study's rows paired against its references."""
    p = argparse.ArgumentParser(prog="python -m benchmarks verdict", description=__doc__.split("\n")[0])
    p.add_argument("--results", default="benchmarks/results", help="folder of utility_{faces,reid}.json")
    shown = p.add_mutually_exclusive_group()  # the headline is printed only; --out writes every table
    shown.add_argument("--headline", action="store_true", help="only the settings of the current protocol")
    shown.add_argument("--out", help="also write verdict.json and verdict.md (every table) into this folder")
    p.add_argument("--study", help="print this results file's rows paired against references instead")
    p.add_argument("--metric", default="test/mAP", help="--study: the metric (test/id_acc on faces)")
    p.add_argument("--against", nargs="+", help="--study: reference stages (default: *_real, *_erasing)")
    p.add_argument(
        "--with",
        dest="others",
        nargs="+",
        default=[],
        help="--study: results files whose rows join the study's (a seed in both must hold the same value)",
    )
    args = p.parse_args(argv)
    if args.study:
        read = lambda name: json.loads((Path(args.results) / f"{name}.json").read_text())  # noqa: E731
        others = [read(name) for name in args.others]
        print(study_pairs_markdown(study_pairs(read(args.study), args.metric, args.against, others)), end="")
        return 0
    table = verdict(Path(args.results))
    if args.headline:
        print(HEADLINE_CAPTION + "\n" + headline_markdown(table), end="")
        return 0
    refit_rows = refits(Path(args.results))
    text = full_markdown(table, refit_rows)
    if args.out:
        from benchmarks.common import publish

        title = "# Utility verdict: the downstream issue's checks from the studies' results\n\n"
        publish(args.out, "verdict", {"settings": table, "refits": refit_rows}, title + text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
