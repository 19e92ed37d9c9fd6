"""Optimizers and learning-rate schedules of the stage modules, chosen in YAML.

Every stage module takes an ``optimizer`` (LightningCLI's ``OptimizerCallable``: parameters -> optimizer)
and, where it has a schedule, an ``lr_scheduler`` (``LRSchedulerCallable``: optimizer -> scheduler). In a
stage YAML both are ``class_path`` / ``init_args`` mappings (jsonargparse turns them into callables); an
``init_args``-only mapping keeps the default class and changes its arguments::

    model:
      init_args:
        optimizer:
          class_path: torch.optim.SGD
          init_args: {lr: 0.01, momentum: 0.9}
        lr_scheduler:
          init_args: {warmup_epochs: 0, milestones: [100]}

The defaults are such mappings too (module constants below), so ``--print_config`` shows them; from Python
a module accepts either form (a mapping, or any callable such as ``functools.partial(torch.optim.SGD,
lr=0.01)``), resolved by :func:`resolve`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import ChainedScheduler, LinearLR, MultiStepLR


def spec(class_path: str, **init_args: Any) -> dict[str, Any]:
    """A ``class_path`` / ``init_args`` mapping (the YAML form of a callable default)."""
    return {"class_path": class_path, "init_args": dict(init_args)}


def warmup_multistep(
    warmup_epochs: int, warmup_factor: float, milestones: list[int], gamma: float = 0.1
) -> dict:
    """The mapping of a :class:`WarmupMultiStepLR` with these arguments (a module's default schedule)."""
    return spec(
        f"{__name__}.WarmupMultiStepLR",
        warmup_epochs=warmup_epochs,
        warmup_factor=warmup_factor,
        milestones=milestones,
        gamma=gamma,
    )


def resolve(value: Callable | Mapping[str, Any], field: str) -> Callable:
    """The callable behind ``value``: itself, or the class of a ``class_path`` mapping bound to its
    ``init_args`` (ValueError naming ``field`` otherwise)."""
    if isinstance(value, Mapping):
        path = value.get("class_path")
        if not isinstance(path, str) or "." not in path:
            raise ValueError(f"{field}: expected a mapping with class_path (module.Class), got {dict(value)}")
        module, name = path.rsplit(".", 1)
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"{field}: cannot import class_path {path!r} ({err})") from err
        return functools.partial(cls, **dict(value.get("init_args") or {}))
    if not callable(value):
        raise ValueError(f"{field}: expected a callable or a class_path mapping, got {value!r}")
    return value


class WarmupMultiStepLR(ChainedScheduler):
    """Linear warm-up from ``warmup_factor`` to 1 over ``warmup_epochs``, times ``gamma`` per milestone
    reached (BoT: 10 epochs from 0.01, x0.1 at 40 and 70): torch's ``LinearLR`` chained with ``MultiStepLR``.

    Args:
        optimizer: the wrapped optimizer.
        warmup_epochs: warm-up length in scheduler steps (epochs or steps: the module's interval); 0: none.
        warmup_factor: learning-rate multiplier at the start of the warm-up.
        milestones: scheduler steps at which the learning rate is multiplied by ``gamma``.
        gamma: multiplier at each milestone.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_epochs: int = 10,
        warmup_factor: float = 0.01,
        milestones: Sequence[int] = (40, 70),
        gamma: float = 0.1,
    ) -> None:
        if warmup_epochs < 0 or not 0.0 < warmup_factor <= 1.0:
            raise ValueError(
                f"warmup_epochs must be >= 0 and warmup_factor in (0, 1], "
                f"got {warmup_epochs} and {warmup_factor}"
            )
        start = warmup_factor if warmup_epochs > 0 else 1.0
        warm = LinearLR(optimizer, start_factor=start, end_factor=1.0, total_iters=warmup_epochs)
        decay = MultiStepLR(optimizer, milestones=[int(m) for m in milestones], gamma=gamma)
        super().__init__([warm, decay], optimizer=optimizer)


def linear_warmup(optimizer: torch.optim.Optimizer, steps: int) -> LinearLR:
    """Learning-rate factor ``min(1, (s + 1) / steps)`` at step ``s`` (the cold start's warm-up)."""
    if steps < 1:
        raise ValueError(f"warmup_steps must be >= 1 for a warm-up, got {steps}")
    return LinearLR(optimizer, start_factor=1.0 / steps, end_factor=1.0, total_iters=steps - 1)


def with_lr(groups: list[dict[str, Any]], lr: float | None) -> list[dict[str, Any]]:
    """Parameter groups with ``lr`` set where a group has none (None: the optimizer's own lr)."""
    if lr is None:
        return groups
    return [{"lr": lr, **g} for g in groups]
