"""Report plots: the running mean by hand and the reward-curve figure on a fake history."""

from __future__ import annotations

import pytest
from PIL import Image

from rgsd_lightning.rl.curves import plot_reward_curves, running_mean


def test_running_mean_hand_case():
    assert running_mean([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0, 4.0], window=1) == [2.0, 4.0]
    assert running_mean([3.0, 6.0, 9.0], window=10) == [3.0, 4.5, 6.0]
    with pytest.raises(ValueError, match="window"):
        running_mean([1.0], window=0)


def test_reward_curves_plot_only_the_logged_keys(tmp_path):
    history = [
        {"rollout": i, "train/reward_raw": 0.1 * i, "train/reward_cov_group": 0.2, "train/kl": 1e-3 * i}
        for i in range(1, 13)
    ]
    path = plot_reward_curves(history, tmp_path / "curves.png")
    width, height = Image.open(path).size
    assert path.is_file() and width > 2.5 * height  # three panels side by side
    narrow = Image.open(plot_reward_curves(history[:1], tmp_path / "one.png")).size
    assert narrow == (width, height)  # same keys -> same layout, even with a single rollout
    # the diversity panels join: seven panels wrap into two rows of four
    for h in history:
        h.update({"train/spread_ratio": 1.0, "train/coverage": 0.5, "train/precision": 0.5})
        h.update({"train/reward_sem": 0.6, "train/reward_total": 0.0})  # total: not a panel
    w2, h2 = Image.open(plot_reward_curves(history, tmp_path / "all.png")).size
    assert w2 > width and 1.5 * height < h2 < 2.5 * height
