"""The reward curves of an RL run (matplotlib, headless): one panel per logged reward component and the KL."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rgsd_lightning.io import save_figure  # noqa: E402

CURVES = (
    ("train/reward_total", "total (tanh)"),
    ("train/reward_sem", "semantic (raw)"),
    ("train/reward_cov_group", "coverage R(G_y) (raw)"),
    ("train/reward_exp_group", "expansion R(G_y) (raw)"),
    ("train/kl", "KL to cold start"),
)


def running_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (shorter at the start); ``window=1`` is the identity."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_reward_curves(history: list[dict[str, float]], path: str | os.PathLike) -> Path:
    """One panel per reward component and the KL over RL rollouts (raw + running mean); returns the PNG."""
    present = [(k, title) for k, title in CURVES if any(k in h for h in history)]
    fig, axes = plt.subplots(
        1, max(1, len(present)), figsize=(3.2 * max(1, len(present)), 2.6), squeeze=False
    )
    for ax, (key, title) in zip(axes[0], present, strict=False):
        xs = [h["rollout"] for h in history if key in h]
        ys = [h[key] for h in history if key in h]
        ax.plot(xs, ys, lw=0.8, alpha=0.45)
        smooth = running_mean(ys, window=max(1, len(ys) // 6))
        if len(ys) >= 6:
            ax.plot(xs, smooth, lw=1.6, color="C0")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("rollout", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
