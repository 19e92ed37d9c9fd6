"""ColdStartDiT's EMA (diffusers ``EMAModel``): the update against a hand computation, the swap used for
sampling and export, and resume from a Lightning checkpoint continuing the same average."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import SMALL_MARKET, assert_close_to_scale, quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from rgsd_lightning import ColdStartDiT, IdentityDataModule
from rgsd_lightning.modules.config import GridConfig

TINY = {"preset": "tiny", "image_size": 8, "grid": GridConfig(identities=0)}


def test_ema_update_matches_hand_computation_and_swaps_for_sampling():
    torch.manual_seed(0)
    decay = 0.3  # warm-up (1 + n) / (10 + n) below 0.3 for n <= 2, capped at 0.3 from n = 3
    model = ColdStartDiT(4, trainable="label_table", ema_decay=decay, **TINY)
    params = list(model._trainable().values())
    expected = [p.detach().clone().double() for p in params]
    for n in range(1, 6):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        model.on_train_batch_end(None, None, 0)
        d = min(decay, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p.detach().double() for e, p in zip(expected, params, strict=True)]
    assert model.ema.optimization_step == 5
    for shadow, e in zip(model.ema.shadow_params, expected, strict=True):
        assert_close_to_scale(shadow.double(), e, rtol=1e-6)
    training = [p.detach().clone() for p in params]
    with model.sampling_weights():
        for p, e in zip(params, expected, strict=True):
            assert_close_to_scale(p.detach().double(), e, rtol=1e-6)
    for p, t in zip(params, training, strict=True):
        assert torch.equal(p, t)  # the training weights are back


def test_ema_decay_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="ema_decay must be in"):
        ColdStartDiT(4, ema_decay=1.0, **TINY)


class _Record(Callback):
    """Per-step seeding (same label dropout, noise and timesteps at each step, interrupted or not) and the
    trainable parameters after every optimizer step."""

    def __init__(self) -> None:
        self.params: list[list[torch.Tensor]] = []
        self.initial: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = [p.detach().clone() for p in pl_module._trainable().values()]

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        torch.manual_seed(trainer.current_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.manual_seed(1000 + trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.params.append([p.detach().clone() for p in pl_module._trainable().values()])


def _fit(root, data, epochs: int, ckpt_path: str | None = None) -> tuple[ColdStartDiT, _Record]:
    L.seed_everything(0)
    dm = IdentityDataModule(
        root=data, format="toy_market", task="generator", image_size=8, batch_size=8, toy=SMALL_MARKET
    )
    model = ColdStartDiT(dm.num_identities, trainable="all", lr=3e-3, ema_decay=0.9, **TINY)
    record = _Record()
    trainer = quiet_trainer(
        root,
        max_epochs=epochs,
        callbacks=[record, ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True, save_top_k=0)],
        enable_checkpointing=True,
        check_val_every_n_epoch=1000,
        reload_dataloaders_every_n_epochs=1,  # as a resumed run: a new loader (and shuffling generator)
    )
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model, record


def _hand_ema(shadow: list[torch.Tensor], steps: list[list[torch.Tensor]], first: int) -> list[torch.Tensor]:
    """The EMA continued by hand from ``shadow`` over parameter snapshots (the first is update ``first``)."""
    out = [s.double() for s in shadow]
    for n, params in enumerate(steps, start=first):
        d = min(0.9, (1 + n) / (10 + n))
        out = [d * s + (1 - d) * p.double() for s, p in zip(out, params, strict=True)]
    return out


def _gap(a, b) -> float:
    return max(
        float((x.detach().double() - y.detach().double()).abs().max())
        for x, y in zip(list(a), list(b), strict=True)
    )


def test_resume_continues_the_same_ema(toy_market, tmp_path):
    straight, straight_steps = _fit(tmp_path / "straight", toy_market, epochs=2)
    first, _ = _fit(tmp_path / "first", toy_market, epochs=1)
    last = tmp_path / "first" / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)["ema"]
    done = saved["optimization_step"]
    assert 0 < done < straight.ema.optimization_step
    assert saved["names"] == first.trainable_names
    # the checkpoint holds the uninterrupted run's EMA at that step (the first epoch is the same run)
    at_checkpoint = _hand_ema(straight_steps.initial, straight_steps.params[:done], first=1)
    for s, e in zip(saved["shadow_params"], at_checkpoint, strict=True):
        assert_close_to_scale(s.double(), e, rtol=1e-5)

    resumed, resumed_steps = _fit(tmp_path / "resumed", toy_market, epochs=2, ckpt_path=str(last))
    assert resumed.ema.optimization_step == straight.ema.optimization_step
    # resume continues that EMA (same counter, so the same decays), not a fresh one of the resumed weights
    expected = _hand_ema(saved["shadow_params"], resumed_steps.params, first=done + 1)
    for s, e in zip(resumed.ema.shadow_params, expected, strict=True):
        assert_close_to_scale(s.double(), e, rtol=1e-5)
    # and ends where the uninterrupted run's EMA ends, within the resumed training's own difference
    # (Lightning resumes the weights, optimizer and RNG-free data order exactly, but not bit for bit)
    weight_gap = _gap(resumed.parameters(), straight.parameters())
    ema_gap = _gap(resumed.ema.shadow_params, straight.ema.shadow_params)
    assert ema_gap <= weight_gap + 1e-6, (ema_gap, weight_gap)
    fresh = _hand_ema(resumed_steps.initial, resumed_steps.params, first=1)  # a restarted EMA
    fresh_gap = _gap(fresh, resumed.ema.shadow_params)
    assert fresh_gap > 1e-4, fresh_gap  # 20x the continuation check's tolerance: it tells the two apart
