"""Reward objects in the torchmetrics style: thin shells over :mod:`rgsd_lightning.rewards.functional`.

Calling an object on ``(features, identities)`` returns the per-sample reward (with gradient, for the
policy update or for inspection) and adds the batch to running sums/counts; ``compute()`` returns the
running mean, reduced over ranks under DDP (states with ``dist_reduce_fx="sum"``). The memory bank is a
submodule (it moves with the metric), never a metric state: it is identical on every rank.

Standardisation (Eq. 10) is over the batch given to one call, i.e. per rank under DDP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from rgsd_lightning.rewards import functional as RF
from rgsd_lightning.rewards.memory_bank import MemoryBank

COMPOSITE_KEYS: tuple[str, ...] = ("total", "sem", "cov", "exp", "sem_std", "cov_std", "exp_std")


def _positive(value: float | None, name: str) -> None:
    if value is not None and not (float(value) > 0 and math.isfinite(float(value))):
        raise ValueError(f"{name} must be positive and finite, got {value}")


class _BankReward(Metric):
    """Shared shell: holds the bank, accumulates sums/counts, returns per-sample values from ``forward``."""

    is_differentiable = True
    higher_is_better = True
    full_state_update = False

    def __init__(self, bank: MemoryBank, keys: Sequence[str] = ("value",), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(bank, MemoryBank):
            raise TypeError(f"bank must be a MemoryBank, got {type(bank).__name__}")
        self.bank = bank
        self._keys = tuple(keys)
        for key in self._keys:
            self.add_state(f"sum_{key}", default=_zero(), dist_reduce_fx="sum")
        self.add_state("count", default=_zero(), dist_reduce_fx="sum")
        self.last: Any = None

    def _score(self, features: Tensor, identities: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def _bandwidth(self, sigma: float | None) -> float | Tensor:
        """The RBF bandwidth to use: ``sigma`` itself, or the bank's per-identity median heuristic (None)."""
        return self.bank.bandwidths() if sigma is None else sigma

    def _tau(self, tau: float | None, tau_floor: float | None) -> float | Tensor | None:
        """The expansion scale: ``tau`` itself, S_r of the identity (None), or S_r floored at ``tau_floor``
        times the bank's median S_r."""
        if tau is not None or tau_floor is None:
            return tau
        return self.bank.floored_tau(tau_floor)

    def update(self, features: Tensor, identities: Tensor) -> None:
        """Score a batch, keep the per-sample values in ``.last`` and add them to the running sums.

        Args:
            features: (B, D) generated features.
            identities: (B,) identity index of each generated sample.
        """
        scores = self._score(features, identities)
        self.last = scores["value"] if self._keys == ("value",) else scores
        for key in self._keys:
            state = getattr(self, f"sum_{key}")
            setattr(self, f"sum_{key}", state + scores[key].detach().sum().to(state))
        self.count = self.count + float(features.shape[0])

    def compute(self) -> Any:
        """Running mean of the per-sample values since the last reset (NaN before any sample)."""
        means = {key: getattr(self, f"sum_{key}") / self.count for key in self._keys}
        return means["value"] if self._keys == ("value",) else means

    def forward(self, features: Tensor, identities: Tensor) -> Tensor:
        """Per-sample reward (B,) of this batch (differentiable); also accumulates it for ``compute()``.

        Args:
            features: (B, D) generated features.
            identities: (B,) identity index of each generated sample.
        """
        super().forward(features, identities)  # torchmetrics' batch/accumulate logic; batch mean cached
        return self.last if self._keys == ("value",) else self.last["total"]


def _check_tau(tau: float | None, tau_floor: float | None) -> None:
    _positive(tau, "tau")
    _positive(tau_floor, "tau_floor")
    if tau is not None and tau_floor is not None:
        raise ValueError(
            f"give tau ({tau}) or tau_floor ({tau_floor}), not both: the floor applies to tau=S_r"
        )


def _zero() -> Tensor:
    return torch.tensor(0.0)


class SemanticConsistencyReward(_BankReward):
    """Semantic consistency (Eqs. 2-3): ``(cos(f_j, prototype of y_j) + 1) / 2`` per sample.

    Args:
        bank: the memory bank giving the identity prototypes.
        **kwargs: forwarded to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).
    """

    def __init__(self, bank: MemoryBank, **kwargs: Any) -> None:
        super().__init__(bank, **kwargs)

    def _score(self, features: Tensor, identities: Tensor) -> dict[str, Tensor]:
        self.bank.check_covers(identities)
        return {"value": RF.semantic_consistency(features, identities, self.bank.prototypes())}


class CoverageReward(_BankReward):
    """Coverage (Eqs. 4-5) per sample: RBF alignment with the bank minus ``alpha`` x redundancy in the group.

    Args:
        bank: the memory bank (reference features and cached bandwidths).
        alpha: weight of the redundancy term.
        sigma: RBF bandwidth; None = the bank's per-identity median heuristic.
        credit: ``"loo"`` (leave-one-out marginal) or ``"group"`` (every member gets the group value).
        **kwargs: forwarded to ``torchmetrics.Metric``.
    """

    def __init__(
        self,
        bank: MemoryBank,
        alpha: float = 0.5,
        sigma: float | None = None,
        credit: RF.Credit = "loo",
        **kwargs: Any,
    ) -> None:
        super().__init__(bank, **kwargs)
        RF._check_credit(credit)
        _positive(sigma, "sigma")
        self.alpha, self.sigma, self.credit = RF._check_finite(alpha, "alpha"), sigma, credit

    def _score(self, features: Tensor, identities: Tensor) -> dict[str, Tensor]:
        sigma = self._bandwidth(self.sigma)
        value = RF.coverage(
            features,
            identities,
            self.bank.features,
            self.bank.identities,
            alpha=self.alpha,
            sigma=sigma,
            credit=self.credit,
        )
        return {"value": value}


class ExpansionReward(_BankReward):
    """Covariance expansion (Eqs. 6-9): ``-((S_g - (1 + epsilon) S_r) / tau)^2``, credited per sample.

    Args:
        bank: the memory bank (reference features).
        epsilon: target expansion over the real spread S_r.
        tau: penalty scale; None = S_r of the identity (floored at 1e-6).
        credit: ``"loo"`` (leave-one-out marginal) or ``"group"`` (every member gets the group value).
        tau_floor: with ``tau=None``, floor each identity's S_r scale at this fraction of the bank's median
            S_r (``functional.floored_tau``); None = the paper's S_r as it is.
        **kwargs: forwarded to ``torchmetrics.Metric``.
    """

    def __init__(
        self,
        bank: MemoryBank,
        epsilon: float = 0.1,
        tau: float | None = None,
        credit: RF.Credit = "loo",
        tau_floor: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(bank, **kwargs)
        RF._check_credit(credit)
        _check_tau(tau, tau_floor)
        self.epsilon, self.tau, self.credit = RF._check_finite(epsilon, "epsilon"), tau, credit
        self.tau_floor = tau_floor

    def _score(self, features: Tensor, identities: Tensor) -> dict[str, Tensor]:
        value = RF.expansion(
            features,
            identities,
            self.bank.features,
            self.bank.identities,
            epsilon=self.epsilon,
            tau=self._tau(self.tau, self.tau_floor),
            credit=self.credit,
        )
        return {"value": value}


class CompositeReward(_BankReward):
    """The paper's total reward ``tanh(sum_i lambda_i R~_i)`` (Eqs. 2-11); the entry point for RL.

    Calling it returns the per-sample ``total``; ``.last`` (after a call) and ``components(...)`` give the
    full dict of :func:`functional.composite_reward` (raw and standardised components). ``compute()`` returns
    a dict with the running mean of ``total`` and of every raw and standardised component (log it with
    ``log_dict``).

    Args:
        bank: the memory bank (reference features and cached bandwidths).
        lambdas: weights of the standardised (sem, cov, exp) components.
        alpha: coverage redundancy weight.
        sigma: RBF bandwidth; None = the bank's per-identity median heuristic.
        epsilon: target expansion over the real spread.
        tau: expansion penalty scale; None = S_r of the identity.
        credit: ``"loo"`` (leave-one-out marginal) or ``"group"``.
        tau_floor: with ``tau=None``, floor each identity's S_r scale at this fraction of the bank's median
            S_r (see :class:`ExpansionReward`); None = the paper's S_r as it is.
        **kwargs: forwarded to ``torchmetrics.Metric``.
    """

    def __init__(
        self,
        bank: MemoryBank,
        lambdas: Sequence[float] = (1.0, 0.75, 0.25),
        alpha: float = 0.5,
        sigma: float | None = None,
        epsilon: float = 0.1,
        tau: float | None = None,
        credit: RF.Credit = "loo",
        tau_floor: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(bank, keys=COMPOSITE_KEYS, **kwargs)
        RF._check_credit(credit)
        _positive(sigma, "sigma")
        _check_tau(tau, tau_floor)
        self.lambdas = RF._check_lambdas(lambdas)
        self.alpha, self.epsilon = RF._check_finite(alpha, "alpha"), RF._check_finite(epsilon, "epsilon")
        self.sigma, self.tau, self.tau_floor = sigma, tau, tau_floor
        self.credit = credit

    def components(self, features: Tensor, identities: Tensor) -> dict[str, Tensor]:
        """The full per-sample dict of ``composite_reward`` for a batch, without accumulating it.

        Args:
            features: (B, D) generated features.
            identities: (B,) identity index of each generated sample.
        """
        return RF.composite_reward(
            features,
            identities,
            self.bank.features,
            self.bank.identities,
            lambdas=self.lambdas,
            alpha=self.alpha,
            sigma=self._bandwidth(self.sigma),
            epsilon=self.epsilon,
            tau=self._tau(self.tau, self.tau_floor),
            credit=self.credit,
        )

    def group_values(self, features: Tensor, identities: Tensor) -> dict[str, Tensor]:
        """Per-sample *group* values ``R(G_y)`` of coverage and expansion (``cov_group``, ``exp_group``).

        With ``credit="loo"`` the per-sample credits of an identity sum to about zero by construction, so
        their batch mean says nothing about how well the set covers or expands; the group value (every
        member of a group carries its group's Eq. 5 / Eq. 9 value) is what to plot over training.
        """
        bank, sigma = self.bank, self._bandwidth(self.sigma)
        return {
            "cov_group": RF.coverage(
                features,
                identities,
                bank.features,
                bank.identities,
                alpha=self.alpha,
                sigma=sigma,
                credit="group",
            ),
            "exp_group": RF.expansion(
                features,
                identities,
                bank.features,
                bank.identities,
                epsilon=self.epsilon,
                tau=self._tau(self.tau, self.tau_floor),
                credit="group",
            ),
        }

    def _score(self, features: Tensor, identities: Tensor) -> dict[str, Tensor]:
        return self.components(features, identities)
