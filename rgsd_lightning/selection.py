"""Lookahead dynamic sample selection (paper §4.3, Eq. 12).

For a mixed batch of real and synthetic samples, the utility of a synthetic sample x̂ is how much its identity
loss changes under a virtual one-step update on the whole batch:

    w' = w - η_v ∇_w mean_batch l_id(w, x)          Δl(x̂) = l_id(w', x̂) - l_id(w, x̂)

The synthetic samples with the smallest Δl (those whose loss the current optimisation direction lowers most)
are kept (``rule="negative"``: only those among them with Δl < 0; ``rule="identity"``: only those the step
moves toward their own identity more than toward any other identity of the batch); real samples are always
kept.
Everything here is a pure function of a module and a batch:

* the virtual step is functional (``torch.func.functional_call`` with substituted parameters): no deep copy,
  no parameter is written, and the module is never the DDP wrapper (pass the inner module);
* buffers are cloned for the functional passes, so BatchNorm running statistics and ``num_batches_tracked``
  are not touched by them;
* l(w') is evaluated in the module's current mode - in training that is train mode, so BatchNorm normalises
  with the statistics of the same full batch, exactly as the forward that produced l(w);
* the functional passes run under a forked RNG, so selection consumes no random numbers and the training
  stream after it is the one it would be without it. When l(w) is computed here, both passes start from the
  same RNG state (same dropout masks at w and w'); when the caller passes its own l(w), the pass at w' draws
  other masks (irrelevant for networks without dropout / drop-path, such as the ResNets);
* the caller may pass the per-sample losses of its own training forward (``losses=``). The virtual gradient
  is then taken through that graph (retained), so selection costs one extra backward and one extra forward,
  and the caller backpropagates the masked mean of the same losses for the real update. The gradient is a
  first-order plain SGD step (no momentum, no weight decay) whatever the real optimiser is.

Which samples define the virtual step is an option: ``step_on="batch"`` (the mean over the whole mixed batch,
as the paper states Eq. 12) or ``step_on="real"`` (the mean over the real samples only). With "batch", a
candidate's own gradient is part of the step, so samples with large gradients (hard or mislabelled ones) see
their loss fall most and rank first; with "real", Δl measures agreement with the direction real data pulls in.
Which parameters take the virtual step is the caller's choice (``params=``): every trainable parameter
(``scope="full"`` in the recognizers) or only the head (``scope="head"``: neck + classifier, with backbone
features computed once and passed as detached inputs, so the virtual pass skips the backbone).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.parallel import DataParallel, DistributedDataParallel

LossFn = Callable[[nn.Module, Any], Tensor]
RULES = ("smallest", "negative", "identity")


@dataclass
class SelectionConfig:
    """Options of lookahead sample selection (the ``selection:`` block of the recognizers).

    Attributes:
        enabled: run selection on batches holding synthetic samples.
        keep_ratio: share of a batch's synthetic samples to keep (rounded half up); ignored if ``k`` is set.
        k: keep this many synthetic samples per batch instead (at most all of them).
        lr: step size η_v of the virtual SGD step.
        scope: "head" (neck + classifier / CosFace weights only, backbone features reused: 1.0x a plain
            training step; the default) or "full" (virtual step on every trainable parameter, Eq. 12 as the
            paper writes it: 2.0x). On the toy study the two keep 77 % of the same samples (Spearman ρ 0.66
            of Δl) and train recognizers whose mAP it cannot tell apart (``selection_scope.md`` in
            ``benchmarks/results``).
        step_on: the samples whose mean loss defines the virtual step: "real" (the default) or "batch" (the
            paper's Eq. 12 as written). With 25 % wrongly labelled toy synthetic samples, "batch" kept a
            larger share of them than it saw (precision 84 -> 79 %), "real" a smaller one (84 -> 87 %), at
            mAP the seeds cannot tell apart (``selection_variants.md`` in ``benchmarks/results``).
        rule: "smallest" (keep the ``keep_ratio`` / ``k`` synthetic samples with the smallest Δl, the paper)
            or "negative" (of those, only the ones with Δl < 0: to first order, samples whose gradient agrees
            with the virtual step's direction; ``keep_ratio: 1.0`` keeps every sample with Δl < 0) or
            "identity" (of those, only the ones whose loss the step lowers more under their own label than
            under the label of any other identity among the batch's real samples: for cross-entropy, the
            step raises their own identity's logit most. A sample that resembles no identity passes with
            chance 1 / P instead of about 1/2 under "negative"; costs two head passes per batch identity).
    """

    enabled: bool = False
    keep_ratio: float | None = 0.5
    k: int | None = None
    lr: float = 0.01
    scope: Literal["full", "head"] = "head"
    step_on: Literal["batch", "real"] = "real"
    rule: Literal["smallest", "negative", "identity"] = "smallest"

    def __post_init__(self) -> None:
        if self.k is None and self.keep_ratio is None:
            raise ValueError("selection: set keep_ratio or k")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0):
            raise ValueError(f"selection.k must be a non-negative integer, got {self.k!r}")
        if self.k is None and not 0.0 <= float(self.keep_ratio) <= 1.0:
            raise ValueError(f"selection.keep_ratio must be in [0, 1], got {self.keep_ratio!r}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"selection.lr (virtual step size) must be a positive number, got {self.lr!r}")
        if self.scope not in ("full", "head"):
            raise ValueError(f"selection.scope must be 'full' or 'head', got {self.scope!r}")
        if self.step_on not in ("batch", "real"):
            raise ValueError(f"selection.step_on must be 'batch' or 'real', got {self.step_on!r}")
        if self.rule not in RULES:
            raise ValueError(f"selection.rule must be one of {RULES}, got {self.rule!r}")

    @classmethod
    def coerce(cls, value: SelectionConfig | dict[str, Any] | None) -> SelectionConfig:
        """A config from a dict (unknown keys named in the error), a config, or None (disabled)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return cls(**asdict(value))
        if not isinstance(value, dict):
            raise ValueError(f"selection must be a mapping, got {type(value).__name__}")
        unknown = sorted(set(value) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise ValueError(f"selection: unknown keys {unknown} (known: {sorted(cls.__dataclass_fields__)})")
        return cls(**value)


@dataclass(frozen=True)
class SelectionResult:
    """Outcome of :func:`lookahead_select` for a batch of B samples (all tensors detached).

    Attributes:
        keep: (B,) bool, True for every real sample and the selected synthetic ones.
        delta: (B,) Δl = l(w') - l(w) for synthetic samples, NaN for real ones.
        loss_before: (B,) l(w) per sample.
        loss_after: (B,) l(w') per sample (NaN when the batch had no synthetic sample: nothing is computed).
        is_synthetic: (B,) bool, the input flags.
    """

    keep: Tensor
    delta: Tensor
    loss_before: Tensor
    loss_after: Tensor
    is_synthetic: Tensor


class _BoundLoss(nn.Module):
    """``loss_fn(module, inputs)`` as a module forward, so ``functional_call`` can substitute its state."""

    def __init__(self, module: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.inner = module
        self.loss_fn = loss_fn

    def forward(self, inputs: Any) -> Tensor:
        return self.loss_fn(self.inner, inputs)


def num_to_keep(num_synthetic: int, keep_ratio: float | None = None, k: int | None = None) -> int:
    """How many synthetic samples to keep: ``min(k, n)``, else ``keep_ratio * n`` rounded half up."""
    if k is not None:
        if isinstance(k, bool) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        return min(int(k), num_synthetic)
    if keep_ratio is None or not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1] (or give k), got {keep_ratio!r}")
    return min(num_synthetic, int(math.floor(keep_ratio * num_synthetic + 0.5)))


def _check_losses(losses: Tensor, batch: int, what: str) -> None:
    if not isinstance(losses, Tensor) or losses.shape != (batch,):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"{what} must be per-sample losses of shape ({batch},), got {shape}")


def lookahead_select(
    module: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    is_synthetic: Tensor,
    *,
    lr: float,
    keep_ratio: float | None = None,
    k: int | None = None,
    losses: Tensor | None = None,
    params: Collection[str] | None = None,
    step_on: Literal["batch", "real"] = "batch",
    rule: Literal["smallest", "negative", "identity"] = "smallest",
) -> SelectionResult:
    """Select the synthetic samples of a batch whose identity loss a virtual SGD step lowers most.

    Args:
        module: the model whose parameters are w (the inner module, never a DDP/DataParallel wrapper).
        loss_fn: ``loss_fn(module, inputs) -> (B,)`` per-sample identity losses; it must reach parameters
            and buffers through ``module`` (they are substituted during the functional passes).
        inputs: whatever ``loss_fn`` takes (a batch dict, images + labels, backbone features...).
        is_synthetic: (B,) bool, True for synthetic samples.
        lr: virtual step size η_v.
        keep_ratio: share of the synthetic samples to keep (rounded half up); give this or ``k``.
        k: number of synthetic samples to keep (at most all of them).
        losses: the caller's l(w) = ``loss_fn(module, inputs)`` with its autograd graph (reused: the graph is
            retained for the caller's own backward). None: computed here, leaving the module untouched.
        params: names (as in ``module.named_parameters()``) of the parameters that take the virtual step;
            default every parameter with ``requires_grad``. The others keep their values.
        step_on: the samples whose mean loss defines the virtual step: "batch" (every sample, Eq. 12 as the
            paper states it) or "real" (the real samples only, when the batch has some: the direction real
            data pulls in, which a synthetic sample does not influence itself).
        rule: "smallest" (the ``keep_ratio`` / ``k`` smallest Δl), "negative" (of those, only Δl < 0) or
            "identity" (of those, only samples whose Δl under their own label is below their Δl under the
            label of every other identity among the real samples; ``inputs`` must then be a mapping with a
            ``"label"`` entry, which is replaced for those passes).

    Returns:
        A :class:`SelectionResult`. With no synthetic sample in the batch nothing is computed and every
        sample is kept. A non-finite Δl ranks last.

    Raises:
        ValueError: a wrapped module, bad shapes, unknown or frozen parameter names, a bad ``step_on``, or
        neither ``keep_ratio`` nor ``k``.
    """
    if isinstance(module, (DistributedDataParallel, DataParallel)):
        raise ValueError(
            "lookahead_select needs the inner module (wrapper.module), not a DDP/DataParallel wrapper"
        )
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr (virtual step size) must be a positive number, got {lr!r}")
    if step_on not in ("batch", "real"):
        raise ValueError(f"step_on must be 'batch' or 'real', got {step_on!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "identity" and not (isinstance(inputs, Mapping) and "label" in inputs):
        raise ValueError('rule="identity" needs inputs as a mapping with a "label" entry (the identities)')
    syn = torch.as_tensor(is_synthetic)
    if syn.dim() != 1:
        raise ValueError(f"is_synthetic must be 1-D (batch,), got shape {tuple(syn.shape)}")
    syn = syn.bool()
    batch = syn.shape[0]
    n_keep = num_to_keep(int(syn.sum()), keep_ratio, k)
    if losses is not None:
        _check_losses(losses, batch, "losses")
        syn = syn.to(losses.device)
    nan = torch.full((batch,), float("nan"))

    if not bool(syn.any()):
        before = losses.detach() if losses is not None else nan
        return SelectionResult(
            torch.ones_like(syn), nan.to(before.device), before, nan.to(before.device), syn
        )

    named = dict(module.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if params is None else list(params)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(f"params: no parameters named {unknown[:5]} in the module")
    frozen = [n for n in names if not named[n].requires_grad]
    if frozen:
        raise ValueError(f"params: {frozen[:5]} do not require grad and cannot take the virtual step")
    if not names:
        raise ValueError("lookahead_select: the module has no trainable parameter for the virtual step")

    bound = _BoundLoss(module, loss_fn)
    buffers = {f"inner.{n}": b.clone() for n, b in module.named_buffers()}
    reuse = losses is not None
    if not reuse:  # both passes start from the same RNG state: identical dropout masks at w and w'
        with _same_rng(module):
            losses = functional_call(bound, buffers, (inputs,))
        _check_losses(losses, batch, "loss_fn(module, inputs)")
        syn = syn.to(losses.device)
    weights = [named[n] for n in names]
    objective = losses[~syn].mean() if step_on == "real" and not bool(syn.all()) else losses.mean()
    grads = torch.autograd.grad(objective, weights, retain_graph=reuse, allow_unused=True)
    stepped = {
        f"inner.{n}": w.detach() if g is None else w.detach() - lr * g
        for n, w, g in zip(names, weights, grads, strict=True)
    }
    with torch.no_grad(), _same_rng(module):
        after = functional_call(bound, {**buffers, **stepped}, (inputs,))
    _check_losses(after, batch, "loss_fn(module, inputs) at w'")
    before, after = losses.detach(), after.detach().to(losses.dtype)
    delta = torch.where(syn, after - before, torch.full_like(before, float("nan")))
    keep = _keep_mask(delta, syn, n_keep, rule)
    if rule == "identity":
        own_best = delta < _best_other_delta(bound, buffers, stepped, inputs, syn, module)
        keep &= ~syn | own_best
    return SelectionResult(keep, delta, before, after, syn)


def _best_other_delta(
    bound: nn.Module,
    buffers: dict[str, Tensor],
    stepped: dict[str, Tensor],
    inputs: Any,
    syn: Tensor,
    module: nn.Module,
) -> Tensor:
    """Per sample, the smallest Δl under the label of another identity of the batch's real samples (+inf
    where there is none): the losses with every sample relabelled as identity j, at w and at w'."""
    labels = torch.as_tensor(inputs["label"])
    syn = syn.to(labels.device)
    candidates = torch.unique(labels[~syn] if bool((~syn).any()) else labels)
    best = torch.full(labels.shape, float("inf"), dtype=torch.float64, device=labels.device)
    with torch.no_grad():
        for identity in candidates.tolist():
            relabelled = {**inputs, "label": torch.full_like(labels, identity)}
            with _same_rng(module):
                at_w = functional_call(bound, buffers, (relabelled,))
            with _same_rng(module):
                at_stepped = functional_call(bound, {**buffers, **stepped}, (relabelled,))
            change = (at_stepped - at_w).double()
            best = torch.where(labels != identity, torch.minimum(best, change), best)
    return best.to(syn.device)


def _same_rng(module: nn.Module) -> Any:
    """A forked RNG (CPU + the module's CUDA devices): the block draws from the current state, then undoes."""
    devices = {p.device for p in module.parameters() if p.device.type == "cuda"}
    return torch.random.fork_rng(devices=sorted(devices, key=str))


def _keep_mask(delta: Tensor, syn: Tensor, n_keep: int, rule: str = "smallest") -> Tensor:
    """Real samples plus the ``n_keep`` synthetic ones with the smallest Δl (ties: batch order); with
    ``rule="negative"`` only those of them whose Δl is below 0."""
    idx = torch.nonzero(syn).flatten()
    score = torch.nan_to_num(delta[idx].float(), nan=float("inf"), posinf=float("inf"))
    order = torch.argsort(score, stable=True)[:n_keep]
    if rule == "negative":
        order = order[score[order] < 0]
    keep = ~syn
    keep[idx[order]] = True
    return keep


def selection_stats(result: SelectionResult) -> dict[str, float]:
    """Scalars to log: ``kept_fraction`` (of the synthetic samples), ``num_synthetic`` and, when the batch
    held synthetic samples, ``delta_mean`` / ``delta_min`` / ``delta_max`` over them."""
    syn = result.is_synthetic
    n_syn = int(syn.sum())
    stats = {"num_synthetic": float(n_syn)}
    if n_syn == 0:
        stats["kept_fraction"] = 1.0
        return stats
    stats["kept_fraction"] = float((result.keep & syn).sum()) / n_syn
    delta = result.delta[syn].float()
    delta = delta[torch.isfinite(delta)]
    if delta.numel():
        stats.update(
            delta_mean=float(delta.mean()), delta_min=float(delta.min()), delta_max=float(delta.max())
        )
    return stats
