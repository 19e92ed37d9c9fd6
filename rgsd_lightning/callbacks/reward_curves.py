"""Record an RL run's logged values round by round; write ``reward_history.json`` + ``reward_curves.png``.

The module only logs (``self.log_dict``, ``sync_dist``): the logger is the record of metrics. This callback
reads what was logged after every training batch (one RL round) from ``trainer.callback_metrics``, which
holds every step's values whatever ``log_every_n_steps`` (that setting only thins what reaches the
loggers), keeps one record per round and, when training ends, writes on global rank zero (atomically):

- ``<run folder>/reward_history.json``: a list of records ``{"rollout": n, "elapsed_s": s, "train/...": v}``
  (``rollout``: the module's ``rollout_index`` after the round; ``elapsed_s``: wall seconds of RL since
  training started, continued over a resume), read by the report's ``rewards``/``curves`` sections and
  the RL benchmarks;
- ``<run folder>/reward_curves.png``: :func:`rgsd_lightning.rl.curves.plot_reward_curves` of that history.

The history is the callback's checkpoint state, so a resumed run's file holds every round. A key the
module stops logging keeps its last value in ``callback_metrics`` (Lightning's semantics); RewardDPOK logs
the same keys every round.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.callbacks import Callback

from rgsd_lightning.io import atomic_write_json, run_dir
from rgsd_lightning.rl.curves import plot_reward_curves

HISTORY_FILE = "reward_history.json"
CURVES_FILE = "reward_curves.png"


class RewardCurves(Callback):
    """Collect each training batch's logged ``prefix*`` values; write the history JSON and its figure.

    Args:
        prefix: the logged keys to record (RewardDPOK logs its round values under ``train/``).
        plot: also draw ``reward_curves.png`` (False: the JSON only).
    """

    def __init__(self, prefix: str = "train/", plot: bool = True) -> None:
        self.prefix = prefix
        self.plot = plot
        self.history: list[dict[str, float]] = []
        self._clock: float | None = None
        self._elapsed = 0.0  # RL seconds of the rounds before this fit (a resumed run)

    def on_train_start(self, trainer, pl_module) -> None:
        self._elapsed = float(self.history[-1].get("elapsed_s", 0.0)) if self.history else 0.0
        self._clock = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(self.prefix)}
        rollout = getattr(pl_module, "rollout_index", len(self.history) + 1)
        elapsed = self._elapsed + (now - self._clock if self._clock is not None else 0.0)
        self.history.append({"rollout": int(rollout), "elapsed_s": elapsed, **values})

    def on_train_end(self, trainer, pl_module) -> None:
        folder = run_dir(trainer)  # every rank: log_dir is a collective under DDP
        if not trainer.is_global_zero or not self.history:
            return
        atomic_write_json(folder / HISTORY_FILE, self.history)
        if self.plot:
            plot_reward_curves(self.history, folder / CURVES_FILE)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # a RewardDPOK checkpoint from before this callback kept the history itself; this callback's own
        # state (load_state_dict, called after this hook) replaces it when present
        self.history = [dict(r) for r in checkpoint.get("rgsd_rl", {}).get("history", [])]

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]
