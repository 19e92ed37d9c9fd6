"""RL modes on the toy demo: DPOK (the paper's method), windowed DPOK and DRaFT-K, per wall-second.

``python -m benchmarks rl_modes [--quick] [--work DIR] [--out DIR] [--threads N]``

The demo's prior, baseline recognizer, judge and cold start (``experiments/toy/pipeline.yaml``), then one RL
stage per mode from the same cold start (``benchmarks/configs/rl_modes.yaml`` names each recipe in full) and
a synthetic set of every generator (cold start included). Reported per mode:

* **reward gain** on the synthetic set (the same identities, seeds and sampler for every generator),
  in the RL reward's space (the baseline recognizer, bank = the scarce real training images): the raw
  components (semantic consistency, coverage and expansion group values) and their λ-weighted sum (the
  raw composite), minus the cold start's;
* **generator quality** in the judge's space (a recognizer trained on every real target image;
  ``evaluation.quality.Judge``, as the demo report): fidelity, intra-identity spread ratio vs real, FID;
* **wall seconds** of the RL stage and the median round time split into rollout sampling, reward and
  update (from the per-round timings the stage logs), as ratios to DPOK's round;
* diversity during RL (spread ratio, k-NN coverage/precision, in the reward space) at the start and end.

Writes ``rl_modes.json``, ``rl_modes.md``, ``rl_modes.png`` (raw reward, spread ratio and coverage against
wall seconds, one line per mode) and ``rl_modes_curves_<mode>.png`` (every RL curve of a mode) into
``--out`` (``rl_modes_quick*`` with ``--quick``); stage folders go to ``--work`` (default
``runs/rl_modes``; a demo run folder is reused: finished stages are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.common import environment, md_environment, md_table
from rgsd_lightning.demo import demo_file
from rgsd_lightning.io import atomic_write_text, save_figure
from rgsd_lightning.pipeline import expand, read_spec, resolve_vars, run_pipeline
from rgsd_lightning.pipeline.spec import set_dotted
from rgsd_lightning.report.sections import RunContext, judge_sentence
from rgsd_lightning.rl.curves import plot_reward_curves, running_mean

STAGES = Path(__file__).resolve().parent / "configs" / "rl_modes.yaml"
BASE_STAGES = ("prior", "down_real", "judge", "cold_start")
BASELINE = "down_real_s0"  # the demo's seed-0 real-only recognizer: the reward's feature space
MODES = {"dpok": "DPOK (paper)", "windowed": "windowed DPOK", "draft": "DRaFT-K"}
SETS = {"cold": "cold start", **MODES}
QUICK_VARS = {"dpok_rollouts": 2, "windowed_rollouts": 4, "draft_rollouts": 3, "fast_steps": 4}
RAW_KEYS = ("sem", "cov_group", "exp_group", "raw")


def build_spec(work: Path, quick: bool, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The demo's vars and base stages, then this benchmark's stages and vars."""
    demo = read_spec(demo_file(quick), [f"output={work}"])
    ours = read_spec(STAGES)
    extra = dict(ours.get("vars") or {})
    if quick:
        extra.update(QUICK_VARS)
    base = [dict(s) for s in demo["stages"] if s.get("name") in BASE_STAGES]
    for stage in base:
        if stage["name"] == "down_real":
            stage["seeds"] = [0]  # only the baseline copy
    spec = {**demo, "vars": {**demo["vars"], **extra}, "stages": base + ours["stages"], "report": None}
    for item in overrides:
        key, _, text = item.partition("=")
        set_dotted(spec, key, yaml.safe_load(text))
    return spec


# ------------------------------------------------------------------------------------------ scoring
@torch.no_grad()
def reward_scores(ctx: RunContext, rl_stage: str, set_stage: str) -> dict[str, float]:
    """Raw reward components and diversity of a synthetic set in the RL reward's space (see module)."""
    from rgsd_lightning.evaluation.quality import embed, load_images
    from rgsd_lightning.rewards import CompositeReward, MemoryBank
    from rgsd_lightning.rewards.diversity import knn_precision_coverage, spread_ratio
    from rgsd_lightning.rl.draft import raw_reward

    dm = ctx.datamodule(rl_stage)
    extractor = ctx.extractor(BASELINE)
    bank = MemoryBank.from_extractor(extractor, dm.reference_dataloader(), dm.num_identities)
    lambdas = _lambdas(ctx, rl_stage)
    reward = CompositeReward(bank, lambdas=lambdas)
    names = list(dm.identities)
    records = [r for r in ctx.synthetic(set_stage) if r.identity in names]
    images = load_images(records, int(dm.hparams.image_size), int(dm.hparams.channels))
    feats = torch.from_numpy(embed(extractor, images)).float()
    labels = torch.tensor([names.index(r.identity) for r in records])
    comps = {**reward.components(feats, labels), **reward.group_values(feats, labels)}
    comps["raw"] = raw_reward(comps, lambdas)
    out = {k: float(comps[k].mean()) for k in RAW_KEYS}
    out["spread_ratio"] = spread_ratio(feats, labels, bank.features, bank.identities)
    out.update(knn_precision_coverage(feats, labels, bank.features, bank.identities))
    return out


def _lambdas(ctx: RunContext, rl_stage: str) -> list[float]:
    config = yaml.safe_load((ctx.run / rl_stage / "config.yaml").read_text())
    reward = config["model"]["init_args"].get("reward") or {}
    return list(reward.get("lambdas", (1.0, 0.75, 0.25)))


def _history(ctx: RunContext, stage: str) -> list[dict[str, float]]:
    hits = sorted(Path(ctx.require(stage).folder).rglob("reward_history.json"))
    return json.loads(hits[0].read_text()) if hits else []


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def round_split(history: list[dict[str, float]]) -> dict[str, float]:
    """Median seconds of a round and of its parts over the rounds after the first (warm-up)."""
    rounds = history[1:] or history
    out = {}
    for part in ("rollout_s", "reward_s", "update_s"):
        out[part] = statistics.median(h[f"train/time_{part}"] for h in rounds)
    out["round_s"] = statistics.median(
        sum(h[f"train/time_{p}"] for p in ("rollout_s", "reward_s", "update_s")) for h in rounds
    )
    return out


def trend(history: list[dict[str, float]], key: str) -> dict[str, float]:
    """Mean of ``key`` over the first and the last tenth of the rounds (at least one round each)."""
    ys = [h[key] for h in history if key in h]
    n = max(1, len(ys) // 10)
    return {"first": _mean(ys[:n]), "last": _mean(ys[-n:])}


# ------------------------------------------------------------------------------------------ figures
def plot_modes(histories: dict[str, list[dict[str, float]]], path: Path) -> Path:
    """Raw reward, spread ratio and coverage (running means) against wall seconds, one line per mode."""
    import matplotlib.pyplot as plt

    panels = (
        ("train/reward_raw", "raw composite reward"),
        ("train/spread_ratio", "spread gen / real (reward space)"),
        ("train/coverage", "k-NN coverage of the real bank"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.0), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for i, (mode, history) in enumerate(histories.items()):
            xs = [h["elapsed_s"] for h in history if key in h]
            ys = [h[key] for h in history if key in h]
            if not ys:
                continue
            ax.plot(xs, ys, lw=0.6, alpha=0.25, color=f"C{i}")
            ax.plot(xs, running_mean(ys, max(1, len(ys) // 10)), lw=1.6, color=f"C{i}", label=MODES[mode])
        if key == "train/spread_ratio":
            ax.axhline(1.0, color="0.4", lw=0.8, ls="--")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL wall seconds", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


# ------------------------------------------------------------------------------------------ report
def run(out: Path, work: Path, quick: bool = False, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run (or resume) the stages, score every set, write JSON + markdown + figures into ``out``."""
    start = time.time()
    load_start = os.getloadavg()
    spec = build_spec(work, quick, overrides)
    variables = resolve_vars(spec)
    output, stages = expand(spec)
    results = run_pipeline(output, stages)
    ctx = RunContext(Path(output), [s.name for s in stages], results, out, "rl_modes")
    judge, _ = ctx.judge("judge", 100)
    sets: dict[str, Any] = {}
    for name in SETS:
        stage = f"gen_{name}"
        scores = judge.score(ctx.synthetic(stage))
        rewards = reward_scores(ctx, "rl_dpok", stage)
        sets[name] = {"judge": scores, "reward": rewards}
    cold = sets["cold"]["reward"]
    modes: dict[str, Any] = {}
    histories = {}
    for mode in MODES:
        stage = f"rl_{mode}"
        history = _history(ctx, stage)
        histories[mode] = history
        split = round_split(history)
        modes[mode] = {
            "rollouts": len(history),
            "stage_wall_s": results[stage].seconds,
            "rl_rounds_s": history[-1]["elapsed_s"] if history else float("nan"),
            "round": split,
            "reward_gain": {k: sets[mode]["reward"][k] - cold[k] for k in RAW_KEYS},
            "during_rl": {
                k: trend(history, f"train/{k}")
                for k in ("reward_raw", "reward_sem", "spread_ratio", "coverage", "precision", "kl")
            },
        }
    base_round = modes["dpok"]["round"]
    for mode in MODES:
        r = modes[mode]["round"]
        modes[mode]["round_cost_vs_dpok"] = r["round_s"] / base_round["round_s"]
        modes[mode]["rollouts_vs_dpok"] = modes[mode]["rollouts"] / max(1, modes["dpok"]["rollouts"])
    name = "rl_modes_quick" if quick else "rl_modes"
    out.mkdir(parents=True, exist_ok=True)
    plot_modes(histories, out / f"{name}.png")
    for mode, history in histories.items():
        if history:
            plot_reward_curves(history, out / f"{name}_curves_{mode}.png")
    report = {
        "command": "python -m benchmarks rl_modes" + (" --quick" if quick else "") + f" --work {work}",
        "environment": environment(),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "vars": {k: variables.get(k) for k in ("sample_steps", "rl_identities", "per_identity")},
        "judge": judge.describe(),
        "sets": sets,
        "modes": modes,
        "seconds": round(time.time() - start, 1),
    }
    atomic_write_text(out / f"{name}.json", json.dumps(report, indent=1, default=float) + "\n")
    atomic_write_text(out / f"{name}.md", markdown(report, name))
    return report


def _f(value: float, digits: int = 3, scale: float = 1.0) -> str:
    return "n/a" if value is None or value != value else f"{scale * value:.{digits}f}"


def markdown(report: dict[str, Any], name: str = "rl_modes") -> str:
    """The benchmark's markdown."""
    sets, modes = report["sets"], report["modes"]
    quality_rows = []
    for key, label in SETS.items():
        j, r = sets[key]["judge"], sets[key]["reward"]
        m = modes.get(key)
        quality_rows.append(
            [
                label,
                str(m["rollouts"]) if m else "-",
                _f(m["stage_wall_s"], 0) if m else "-",
                _f(r["raw"]),
                _f(m["reward_gain"]["raw"], 3) if m else "-",
                _f(r["sem"]),
                _f(r["cov_group"]),
                _f(r["exp_group"]),
                _f(j["fidelity"], 1, 100),
                _f(j["diversity_ratio"], 2),
                _f(j["fid"]),
                _f(r["spread_ratio"], 2),
                _f(r["coverage"], 2),
                _f(r["precision"], 2),
            ]
        )
    judge_line = "\n" + judge_sentence(report["judge"], "judge") + "\n\n"
    time_rows = []
    for mode, label in MODES.items():
        m = modes[mode]
        r = m["round"]
        time_rows.append(
            [
                label,
                _f(r["round_s"], 2),
                _f(r["rollout_s"], 2),
                _f(r["reward_s"], 2),
                _f(r["update_s"], 2),
                _f(1 / m["round_cost_vs_dpok"], 2),
                _f(m["rollouts_vs_dpok"], 1),
            ]
        )
    trend_rows = []
    for mode, label in MODES.items():
        t = modes[mode]["during_rl"]
        trend_rows.append(
            [label]
            + [
                f"{_f(t[k]['first'])} -> {_f(t[k]['last'])}"
                for k in ("reward_raw", "reward_sem", "spread_ratio", "coverage", "precision")
            ]
        )
    return (
        "# RL modes on the toy demo: DPOK, windowed DPOK, DRaFT-K\n\n"
        + md_environment(report["environment"])
        + f"\nCommand: `{report['command']}` ({report['seconds']:.0f} s; load average "
        f"{report['load_average']['start'][0]:.1f} at the start, {report['load_average']['end'][0]:.1f} at "
        "the end: the machine was shared, so compare times within this run only).\n\n"
        "## Generator quality and reward gain per mode\n\n"
        "Each generator made the same synthetic set (same identities, seeds and sampler). Reward columns: "
        "raw components in the RL reward's space (baseline recognizer; bank = the scarce real training "
        "images): `raw` = λ-weighted sum of semantic consistency and the coverage / expansion group values, "
        "gain = minus the cold start's. Judge columns (a recognizer trained on every real target image): "
        "fidelity, spread ratio syn/real, FID in its feature space. Last three: spread ratio and k-NN "
        "coverage / precision in the reward space.\n\n"
        + md_table(
            [
                "generator",
                "rollouts",
                "RL wall s",
                "raw",
                "raw gain",
                "sem",
                "cov",
                "exp",
                "judge fidelity %",
                "judge spread ratio",
                "judge FID",
                "spread ratio",
                "coverage",
                "precision",
            ],
            quality_rows,
        )
        + judge_line
        + "## Round cost\n\n"
        "Median wall seconds of one RL round (rounds after the first), split as the stage logs it; "
        "'cheaper' = DPOK's round time / this mode's; 'rollouts' = this stage's rollouts / DPOK's.\n\n"
        + md_table(
            ["mode", "round s", "rollout s", "reward s", "update s", "x cheaper", "x rollouts"], time_rows
        )
        + "\n## During RL\n\nMean over the first -> last tenth of the rounds (reward space, per rollout).\n\n"
        + md_table(["mode", "raw reward", "sem", "spread ratio", "coverage", "precision"], trend_rows)
        + f"\n![RL modes]({name}.png)\n\nEvery RL curve of a mode: `{name}_curves_<mode>.png`.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks rl_modes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="where rl_modes.json / .md / .png go")
    p.add_argument("--work", default=None, help="stage folders (default runs/rl_modes[_quick])")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds per stage)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="spec override")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work or ("runs/rl_modes_quick" if args.quick else "runs/rl_modes"))
    report = run(Path(args.out), work, args.quick, args.set)
    print(json.dumps(report["modes"], indent=1, default=float))
    return 0
