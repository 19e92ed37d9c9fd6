"""RewardCurves: the RL history JSON is what the module logged, every round, continued over a resume."""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import pytest
from conftest import pooled_colour_extractor, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from rgsd_lightning import IdentityDataModule, RewardDPOK
from rgsd_lightning.callbacks.reward_curves import RewardCurves
from rgsd_lightning.modules.config import GridConfig, SamplerConfig, UpdateConfig

TINY = dict(
    samples_per_identity=2,
    sampler=SamplerConfig(steps=4, guidance_scale=1.0, eta=1.0),
    update=UpdateConfig(policy_steps=1, micro_batch=8, grad_accum=1),
    grid=GridConfig(every_n_steps=0),
    lr=1e-2,
)


def _model(export: str) -> RewardDPOK:
    model = RewardDPOK(6, generator=export, **TINY)
    model.set_reward_extractor(pooled_colour_extractor())
    return model


def _dm(root: str, rollouts: int) -> IdentityDataModule:
    return IdentityDataModule(
        root=root, format="toy_market", task="rl", image_size=8, p=3, batches_per_epoch=rollouts
    )


def _csv_rows(folder) -> list[dict[str, str]]:
    (path,) = folder.rglob("metrics.csv")
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_history_is_what_the_logger_recorded_for_every_round(tiny_generator_export, toy_market, tmp_path):
    L.seed_everything(0)
    logger = CSVLogger(str(tmp_path), name="logs")
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, logger=logger, log_every_n_steps=2, callbacks=[RewardCurves()]
    )
    trainer.fit(_model(tiny_generator_export), _dm(toy_market, 5))

    history = json.loads((tmp_path / "logs" / "version_0" / "reward_history.json").read_text())
    assert (tmp_path / "logs" / "version_0" / "reward_curves.png").stat().st_size > 0
    # every round is in the curve although the logger only saw every second one
    assert [r["rollout"] for r in history] == [1, 2, 3, 4, 5]
    assert all(b["elapsed_s"] > a["elapsed_s"] > 0 for a, b in zip(history, history[1:], strict=False))
    rows = [r for r in _csv_rows(tmp_path) if r.get("train/reward_raw")]
    assert len(rows) == 2, rows  # log_every_n_steps=2 over 5 rounds: the logger has rounds 2 and 4
    keys = {k for k in rows[0] if k.startswith("train/")}
    assert {"train/reward_raw", "train/kl", "train/grad_norm", "train/time_rollout_s"} <= keys
    for row in rows:
        record = history[int(row["step"])]  # the logger's step counts finished rounds before this one
        assert set(record) == keys | {"rollout", "elapsed_s"}
        for key in keys:
            assert record[key] == pytest.approx(float(row[key]), rel=1e-6, abs=1e-12), key
    assert all(math.isfinite(v) for r in history for v in r.values())


def test_resumed_run_writes_every_round_with_continued_time(tiny_generator_export, toy_market, tmp_path):
    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = quiet_trainer(
        tmp_path / "a", max_epochs=2, enable_checkpointing=True, callbacks=[ckpt, RewardCurves(plot=False)]
    )
    first.fit(_model(tiny_generator_export), _dm(toy_market, 1))
    before = json.loads((tmp_path / "a" / "reward_history.json").read_text())
    assert [r["rollout"] for r in before] == [1, 2]

    resumed = quiet_trainer(tmp_path / "b", max_epochs=3, callbacks=[RewardCurves(plot=False)])
    resumed.fit(
        _model(tiny_generator_export), _dm(toy_market, 1), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    after = json.loads((tmp_path / "b" / "reward_history.json").read_text())
    assert after[:2] == before  # the checkpoint carried the first run's rounds
    assert [r["rollout"] for r in after] == [1, 2, 3]
    assert before[1]["elapsed_s"] < after[2]["elapsed_s"]  # RL seconds continue over the resume
    assert not (tmp_path / "b" / "reward_curves.png").exists()  # plot=False


def test_a_run_without_rounds_writes_nothing(tmp_path):
    trainer = L.Trainer(default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False)
    RewardCurves().on_train_end(trainer, None)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_from_before_the_callback_keeps_its_rounds():
    """RewardDPOK checkpoints written before RewardCurves carried the history in ``rgsd_rl``."""
    old = [{"rollout": 1, "elapsed_s": 2.0, "train/kl": 0.1}]
    curves = RewardCurves()
    curves.on_load_checkpoint(None, None, {"rgsd_rl": {"history": old, "rollout_index": 1}})
    assert curves.history == old
    curves.load_state_dict({"history": [*old, {"rollout": 2, "elapsed_s": 3.0}]})  # its own state wins
    assert [r["rollout"] for r in curves.history] == [1, 2]
