"""Optimizers and schedules chosen in YAML (modules/optim.py): the defaults update the parameters and move
the learning rate exactly as the hand-built torch optimizers and schedules the modules used before; a YAML
``optimizer:`` / ``lr_scheduler:`` reaches the module."""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from rgsd_lightning import ColdStartDiT, CosFaceRecognizer, LookaheadReID
from rgsd_lightning.cli import build_cli
from rgsd_lightning.modules.config import EmbeddingNetConfig, GridConfig
from rgsd_lightning.modules.optim import WarmupMultiStepLR, linear_warmup, resolve

NET = EmbeddingNetConfig(architecture="test_resnet", embedding_dim=8)


def bot_factor(epoch: int, warmup: int, factor: float, milestones: Sequence[int], gamma: float) -> float:
    """The former hand-written schedule: linear warm-up from ``factor``, then ``gamma`` per milestone."""
    warm = factor * (1 - epoch / warmup) + epoch / warmup if epoch < warmup else 1.0
    return warm * gamma ** sum(1 for m in milestones if epoch >= m)


def _lrs(scheduler, optimizer, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize(
    "warmup, factor, milestones, gamma",
    [(10, 0.01, [40, 70], 0.1), (0, 0.01, [5], 0.1), (1, 0.1, [20, 28], 0.1), (6, 0.2, [3, 9], 0.5)],
)
def test_warmup_multistep_matches_the_former_schedule(warmup, factor, milestones, gamma):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    lrs = _lrs(WarmupMultiStepLR(opt, warmup, factor, milestones, gamma), opt, 120)
    expected = [0.3 * bot_factor(e, warmup, factor, milestones, gamma) for e in range(120)]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_warmup_multistep_hand_worked():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = _lrs(WarmupMultiStepLR(opt, 10, 0.01, [40, 70], 0.1), opt, 120)
    picked = [lrs[e] for e in (0, 5, 10, 39, 40, 69, 70, 119)]
    assert picked == pytest.approx([0.01, 0.505, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rel=1e-9)


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_linear_warmup_matches_the_former_lambda(steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    lrs = _lrs(linear_warmup(opt, steps), opt, 12)
    assert lrs == pytest.approx([2.0 * min(1.0, (s + 1) / steps) for s in range(12)], rel=1e-9)


def _same_updates(module, configured, hand_optimizer, hand_scheduler, steps: int = 5) -> None:
    """``configured`` (configure_optimizers' result on ``module``) and the hand-built optimizer / schedule
    on a copy move the parameters identically under the same gradients."""
    twin = copy.deepcopy(module)
    mine = [p for p in module.parameters() if p.requires_grad]
    theirs = [p for p in twin.parameters() if p.requires_grad]
    if isinstance(configured, dict):
        optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    else:
        optimizer, scheduler = configured, None
    hand = hand_optimizer(twin)
    hand_sched = hand_scheduler(hand) if hand_scheduler else None
    assert (scheduler is None) == (hand_sched is None)
    assert type(optimizer) is type(hand)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for a, b in zip(mine, theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        optimizer.step()
        hand.step()
        if scheduler is not None:
            scheduler.step()
            hand_sched.step()
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
            [g["lr"] for g in hand.param_groups]
        )
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "cls, hand, schedule",
    [
        (
            LookaheadReID,
            functools.partial(torch.optim.Adam, lr=3.5e-4, weight_decay=5e-4),
            (10, 0.01, [40, 70]),
        ),
        (
            CosFaceRecognizer,
            functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4),
            (1, 0.1, [20, 28]),
        ),
    ],
)
def test_recognizer_defaults_are_the_former_optimizer_and_schedule(cls, hand, schedule):
    model = cls(4, net=NET)
    configured = model.configure_optimizers()
    assert configured["lr_scheduler"]["interval"] == "epoch"
    _same_updates(
        model,
        configured,
        lambda m: hand([p for p in m.parameters() if p.requires_grad]),
        lambda o: LambdaLR(o, lambda e: bot_factor(e, *schedule, 0.1)),
        steps=12,
    )


def test_recognizer_lr_replaces_the_optimizer_lr():
    model = LookaheadReID(4, net=NET, lr=3.5e-3, lr_scheduler=None)
    _same_updates(
        model,
        model.configure_optimizers(),
        lambda m: torch.optim.Adam(
            [p for p in m.parameters() if p.requires_grad], lr=3.5e-3, weight_decay=5e-4
        ),
        None,
    )


def test_cold_start_default_groups_and_warmup():
    model = ColdStartDiT(
        4,
        preset="tiny",
        image_size=8,
        trainable="all",
        lr=3e-4,
        table_lr=3e-3,
        warmup_steps=3,
        grid=GridConfig(identities=0),
    )

    def hand(m):
        table = m.generator.label_table.weight
        rest = [p for p in m.parameters() if p.requires_grad and p is not table]
        groups = [{"params": [table], "lr": 3e-3}, {"params": rest, "lr": 3e-4}]
        return torch.optim.AdamW(groups, lr=3e-4, weight_decay=0.0)

    configured = model.configure_optimizers()
    assert configured["lr_scheduler"]["interval"] == "step"
    _same_updates(model, configured, hand, lambda o: LambdaLR(o, lambda s: min(1.0, (s + 1) / 3)))
    plain = ColdStartDiT(4, preset="tiny", image_size=8, grid=GridConfig(identities=0))
    optimizer = plain.configure_optimizers()  # paper defaults: AdamW 1e-5, no schedule
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-5] and optimizer.defaults["weight_decay"] == 0.0


def test_cold_start_warmup_and_scheduler_together_are_refused():
    sched = functools.partial(torch.optim.lr_scheduler.ConstantLR, factor=0.5)
    with pytest.raises(ValueError, match="warmup_steps and lr_scheduler"):
        ColdStartDiT(4, preset="tiny", image_size=8, warmup_steps=5, lr_scheduler=sched)


def test_bad_class_path_names_the_field():
    with pytest.raises(ValueError, match=r"optimizer: cannot import class_path 'torch.optim.Nope'"):
        resolve({"class_path": "torch.optim.Nope"}, "optimizer")
    with pytest.raises(ValueError, match="lr_scheduler: expected a mapping with class_path"):
        resolve({"init_args": {"gamma": 0.1}}, "lr_scheduler")


def test_yaml_optimizer_and_scheduler_reach_the_module(tmp_path):
    model = {
        "class_path": "rgsd_lightning.modules.cosface.CosFaceRecognizer",
        "init_args": {
            "net": {"architecture": "test_resnet", "embedding_dim": 8},
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.5}},
            "lr_scheduler": {"init_args": {"warmup_epochs": 0, "milestones": [2]}},  # default class, new args
        },
    }
    data = {"format": "toy_faces", "task": "face", "root": str(tmp_path / "faces")}
    cli = build_cli({"model": model, "data": data, "trainer": {"logger": False}}, run=False)
    configured = cli.model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["momentum"] == 0.5
    assert isinstance(scheduler, WarmupMultiStepLR)
    assert _lrs(scheduler, optimizer, 4) == pytest.approx([0.01, 0.01, 0.001, 0.001])
