"""Grouped, typed configuration of the stage modules: the nested blocks of a stage YAML.

================  =============================  =======================================================
block             dataclass                      used by
================  =============================  =======================================================
``sampler:``      :class:`SamplerConfig`         ColdStartDiT, RewardDPOK, SyntheticGenerator
``grid:``         :class:`GridConfig`            ColdStartDiT, RewardDPOK, SyntheticGenerator
``init_images:``  :class:`InitImagesConfig`      SyntheticGenerator
``reward:``       :class:`RewardConfig`          RewardDPOK; scoring in ColdStartDiT, SyntheticGenerator
``lora:``         :class:`LoRAConfig`            RewardDPOK
``objective:``    :class:`PolicyGradientConfig`  RewardDPOK
``update:``       :class:`UpdateConfig`          RewardDPOK
``window:``       :class:`WindowConfig`          RewardDPOK (``mode="windowed"``)
``draft:``        :class:`DraftConfig`           RewardDPOK (``mode="draft"``)
``net:``          :class:`EmbeddingNetConfig`    LookaheadReID, CosFaceRecognizer
================  =============================  =======================================================

(The recognizers' ``selection:`` block is :class:`rgsd_lightning.selection.SelectionConfig`.)

Each group is a small frozen dataclass taken as one typed constructor argument whose default is the module's
own default instance. In YAML a partial mapping changes only the keys it names (``sampler: {steps: 20}``
keeps the module's default guidance and η: jsonargparse fills the rest from the default instance). From
Python pass an instance (fields you leave out take the *dataclass* defaults) or a mapping of its fields.

Hyper-parameters: a module stores each group in ``hparams`` as a plain dict (:func:`plain`) and rebuilds
the dataclass from either form (:func:`as_config`). This was decided by testing a dataclass instance in
``hparams``: Lightning writes it to ``hparams.yaml`` as a ``!!python/object`` tag that ``yaml.safe_load``
rejects, and ``rgsd fit --ckpt_path`` fails on such a checkpoint because LightningCLI reads the checkpoint's
hyper-parameters with ``torch.load(weights_only=True)``, which refuses custom classes. With plain dicts
both work (``tests/test_config.py``), and ``Module.load_from_checkpoint`` hands the dicts back to the
constructor, which accepts them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

C = TypeVar("C")


def as_config(cls: type[C], value: C | Mapping[str, Any], name: str) -> C:
    """``value`` as a ``cls`` instance: an instance as it is, or a mapping of its fields.

    Args:
        cls: the config dataclass.
        value: an instance of ``cls`` or a mapping (e.g. from ``hparams`` or a checkpoint).
        name: the argument's name, used in error messages.
    """
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{name} must be a {cls.__name__} or a mapping of its fields, got {type(value).__name__}"
        )
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{name}: unknown keys {unknown} (known: {sorted(known)})")
    return cls(**value)


def plain(value: Any) -> Any:
    """Dataclasses as dicts and tuples as lists, recursively: the form hyper-parameters are stored in."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class SamplerConfig:
    """How images are sampled: generation, sample grids and RL rollouts (recorded with every image).

    Attributes:
        method: "ddim" (with ``eta``), "ddpm" (the ancestral posterior; ``eta`` is ignored) or "dpmsolver"
            (DPM-Solver++(2M), deterministic, ``eta`` must be 0, no log-probs, so not for RL rollouts): fast
            generation, DiTPipeline-default quality (DDIM, 50 steps) in 12 steps at w=2 and 20 at w=4 on
            the toy model (``benchmarks/results/fast_sampling*.md``).
        steps: denoising steps.
        guidance_scale: classifier-free guidance scale w (1 = no guidance).
        eta: DDIM η (0 deterministic, 1 ancestral).
        clip_x0: clip the predicted x0 to [-1, 1] at every step (every method: DDIM/DDPM steps, RL rollouts
            and their log-probs, DPM-Solver++'s data predictions, like diffusers' ``clip_sample`` /
            ``thresholding`` at 1); standard for pixel-space models, whose images live in [-1, 1]. None:
            on in pixel mode, off in latent mode (latents are not bounded), see :meth:`clips`.
    """

    method: Literal["ddim", "ddpm", "dpmsolver"] = "ddim"
    steps: int = 50
    guidance_scale: float = 2.0
    eta: float = 0.0
    clip_x0: bool | None = None

    def __post_init__(self) -> None:
        _check(
            self.method in ("ddim", "ddpm", "dpmsolver"),
            f"sampler.method must be 'ddim', 'ddpm' or 'dpmsolver', got {self.method!r}",
        )
        _check(
            self.method != "dpmsolver" or self.eta == 0,
            f"sampler.method='dpmsolver' is deterministic: sampler.eta must be 0, got {self.eta}",
        )
        _check(
            isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 1,
            f"sampler.steps must be a positive integer, got {self.steps!r}",
        )
        _check(
            math.isfinite(self.guidance_scale),
            f"sampler.guidance_scale must be finite, got {self.guidance_scale}",
        )
        _check(math.isfinite(self.eta) and self.eta >= 0, f"sampler.eta must be >= 0, got {self.eta}")
        _check(
            self.clip_x0 is None or isinstance(self.clip_x0, bool),
            f"sampler.clip_x0 must be true, false or null, got {self.clip_x0!r}",
        )

    def clips(self, latent: bool) -> bool:
        """Whether x0 is clipped for a generator in latent (True) or pixel space: ``clip_x0``, or when it is
        None, pixel space only."""
        return (not latent) if self.clip_x0 is None else bool(self.clip_x0)

    def record(self, latent: bool = False) -> dict[str, Any]:
        """The settings as recorded in a synthetic set's manifest rows and card (``clip_x0`` resolved for a
        generator in latent or pixel space)."""
        return {
            "sampler": self.method,
            "num_steps": int(self.steps),
            "guidance_scale": float(self.guidance_scale),
            "eta": float(self.eta),
            "clip_x0": self.clips(latent),
        }


@dataclass(frozen=True)
class GridConfig:
    """Sample grids (one row per identity: real images | samples with fixed seeds) in the run folder.

    Attributes:
        identities: identities shown (0 = no grid).
        samples: real and generated images per identity.
        seed: seed of the generated images (fixed, so grids are comparable over training).
        every_n_steps: RewardDPOK only: rollouts between grids (0 = none). ColdStartDiT draws a grid at
            every validation and SyntheticGenerator one after generation.
    """

    identities: int = 8
    samples: int = 4
    seed: int = 0
    every_n_steps: int = 0

    def __post_init__(self) -> None:
        for field in ("identities", "samples", "every_n_steps"):
            value = getattr(self, field)
            _check(value >= 0, f"grid.{field} must be >= 0, got {value}")


@dataclass(frozen=True)
class InitImagesConfig:
    """Generation from images (SDEdit): every sample starts from a noised image of a pool, not pure noise.

    Attributes:
        root: folder of the starting images (e.g. the prior corpus: other people under other lightings and
            poses); None generates from pure noise (the default).
        own: start every sample from one of *its own identity's* real training images instead (the
            generation datamodule's training records, the few-shot images the cold start saw; DA-Fusion,
            Trabucco et al. 2024, real-guided generation): the sample varies that image. Excludes ``root``.
        exclude: fnmatch patterns over file names to leave out of the pool (e.g. the target's own images).
        strength: share of the sampler's steps that run (diffusers' img2img ``strength``): the start image
            is noised to the first of the last ⌊steps x strength⌋ steps. Low keeps more of the start image
            (its lighting, and more of its identity), 1 keeps almost nothing of it.
        seed: seed of the draw of a start image per (identity, seed) request.
    """

    root: str | None = None
    own: bool = False
    exclude: tuple[str, ...] = ()
    strength: float = 0.6
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(str(p) for p in self.exclude))
        _check(
            not (self.own and self.root is not None),
            f"init_images: give root ({self.root!r}) or own: true, not both",
        )
        _check(
            math.isfinite(self.strength) and 0.0 < self.strength <= 1.0,
            f"init_images.strength must be in (0, 1] (1 = start from pure noise), got {self.strength}",
        )
        _check(
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
            f"init_images.seed must be a non-negative integer, got {self.seed!r}",
        )

    @property
    def enabled(self) -> bool:
        """Whether generation starts from images (a folder or the identities' own) rather than noise."""
        return self.root is not None or self.own


@dataclass(frozen=True)
class RewardConfig:
    """The three-part composite reward (paper Eqs. 2-11), in RL and when scoring generated images.

    Attributes:
        lambdas: λ_sem, λ_cov, λ_exp, weights of the standardised components (paper: 1.0, 0.75, 0.25).
        alpha: α of the coverage redundancy term.
        sigma: RBF bandwidth (None: median heuristic per identity).
        epsilon: ε of the expansion target (1 + ε) S_r.
        tau: τ of the expansion reward (None: S_r of the identity).
        credit: per-sample credit of the set rewards: "loo" (leave-one-out) or "group".
        tau_floor: with tau None, each identity's τ = max(S_r, tau_floor x the median S_r over identities):
            bounds the penalty of identities whose few real images are near duplicates (None: the paper's).
    """

    lambdas: tuple[float, float, float] = (1.0, 0.75, 0.25)
    alpha: float = 0.5
    sigma: float | None = None
    epsilon: float = 0.1
    tau: float | None = None
    credit: Literal["loo", "group"] = "loo"
    tau_floor: float | None = None

    def __post_init__(self) -> None:
        lambdas = tuple(float(v) for v in self.lambdas)
        _check(len(lambdas) == 3, f"reward.lambdas must hold 3 weights (sem, cov, exp), got {list(lambdas)}")
        object.__setattr__(self, "lambdas", lambdas)
        _check(
            self.credit in ("loo", "group"), f"reward.credit must be 'loo' or 'group', got {self.credit!r}"
        )
        floor = self.tau_floor
        _check(floor is None or 0 < floor < math.inf, f"reward.tau_floor must be positive, got {floor}")
        _check(floor is None or self.tau is None, "give reward.tau or reward.tau_floor, not both")

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~rgsd_lightning.rewards.CompositeReward`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters of the policy (peft), used when ``trainable="lora"``.

    Attributes:
        rank: adapter rank (DPOK: 4).
        alpha: LoRA alpha (None: equal to the rank).
        targets: names of the modules that get adapters.
    """

    rank: int = 4
    alpha: float | None = None
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    def __post_init__(self) -> None:
        _check(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        object.__setattr__(self, "targets", tuple(self.targets))


@dataclass(frozen=True)
class PolicyGradientConfig:
    """The KL-regularised policy-gradient loss of DPOK (``rl.objective``).

    Attributes:
        reward_weight: α of DPOK (weight of the reward term).
        kl_weight: β of DPOK (weight of the per-step KL to the cold-start policy).
        kl_form: "dpok" (unweighted ε-MSE, DPOK's code) or "exact" (Gaussian KL of the step kernels).
        kl_warmup: rollouts before the KL term switches on.
        ratio_clip: c of the importance-ratio clamp [1 - c, 1 + c] (DPOK: 1e-4).
        value_baseline: learn V(x_t, y, step) and use r - V as the advantage (DPOK).
        logprob_reduction: "mean" (DPOK/DDPO) or "sum" of the Gaussian log-density over elements.
        ratio_check_tol: max |log p_update - log p_rollout| allowed between the rollout's log-probs and the
            update's own forward of the same transitions (a sanity check: label dropout, a changed model).
            Without ``update.recompute_logprob`` this drift enters the ratio, so keep it below ``ratio_clip``;
            with it the ratio is exactly 1 on-policy whatever the drift, and a loose bound (1e-2) suits bf16.
    """

    reward_weight: float = 10.0
    kl_weight: float = 0.01
    kl_form: Literal["dpok", "exact"] = "dpok"
    kl_warmup: int = 0
    ratio_clip: float = 1e-4
    value_baseline: bool = True
    logprob_reduction: Literal["mean", "sum"] = "mean"
    ratio_check_tol: float = 1e-4

    def __post_init__(self) -> None:
        _check(
            self.kl_form in ("dpok", "exact"),
            f"objective.kl_form must be 'dpok' or 'exact', got {self.kl_form!r}",
        )
        _check(
            self.logprob_reduction in ("mean", "sum"),
            f"objective.logprob_reduction must be 'mean' or 'sum', got {self.logprob_reduction!r}",
        )


@dataclass(frozen=True)
class UpdateConfig:
    """How a rollout becomes optimizer steps: which transitions are kept, replay, micro-batching, clipping.

    Attributes:
        timestep_fraction: share of each trajectory's stochastic steps stored as transitions.
        buffer_size: replay capacity in transitions (DPOK: 1000).
        on_policy: train only on the latest rollout (DDPO-style) instead of the replay buffer.
        policy_steps: optimizer steps per rollout (DPOK: 5).
        micro_batch: transitions per micro-batch.
        grad_accum: micro-batches accumulated per optimizer step.
        grad_clip: max grad norm per optimizer step, of the policy and (separately) of the value baseline
            (DPOK: 0.1); applied by Lightning after mixed precision unscales the gradients.
        recompute_logprob: at the start of every update window, recompute the fresh rollout's old
            log-probs with the update's own forward, so the importance ratio is exactly 1 on-policy (bf16
            drift between the sampler's and the update's batch shapes, 1e-4..1e-3 on GPU, would otherwise
            push every ratio outside a 1e-4 clip and zero the policy gradient).
    """

    timestep_fraction: float = 1.0
    buffer_size: int = 1000
    on_policy: bool = False
    policy_steps: int = 5
    micro_batch: int = 4
    grad_accum: int = 12
    grad_clip: float = 0.1
    recompute_logprob: bool = True

    def __post_init__(self) -> None:
        _check(
            0.0 < self.timestep_fraction <= 1.0,
            f"update.timestep_fraction must be in (0, 1], got {self.timestep_fraction}",
        )
        _check(self.policy_steps >= 0, f"update.policy_steps must be >= 0, got {self.policy_steps}")
        for field in ("micro_batch", "grad_accum"):
            value = getattr(self, field)
            _check(value >= 1, f"update.{field} must be >= 1, got {value}")


@dataclass(frozen=True)
class WindowConfig:
    """``mode="windowed"``: a window of a few stochastic steps per trajectory (Flow-GRPO-Fast, MixGRPO).

    Rollouts draw noise (``sampler.eta``) only on ``size`` consecutive steps of the schedule and run
    deterministic DDIM (η = 0) elsewhere; only the window's steps become transitions, so each round's
    update trains on the few steps that carry the policy gradient. The window is the same for every
    trajectory of a rollout and lies within ``span`` (fractions of the schedule, high noise first).

    Attributes:
        size: stochastic steps per trajectory.
        placement: "random" (a new uniform start every rollout) or "sliding" (MixGRPO: starts at the
            beginning of ``span`` and moves one step towards low noise every ``shift_every`` rollouts,
            wrapping around).
        span: (start, end) of the region where windows may lie, as fractions of the sampling steps.
        shift_every: rollouts between moves of a sliding window.
    """

    size: int = 2
    placement: Literal["random", "sliding"] = "random"
    span: tuple[float, float] = (0.0, 1.0)
    shift_every: int = 1

    def __post_init__(self) -> None:
        _check(self.size >= 1, f"window.size must be >= 1, got {self.size}")
        _check(
            self.placement in ("random", "sliding"),
            f"window.placement must be 'random' or 'sliding', got {self.placement!r}",
        )
        span = tuple(float(v) for v in self.span)
        _check(
            len(span) == 2 and 0.0 <= span[0] < span[1] <= 1.0,
            f"window.span must be (start, end) with 0 <= start < end <= 1, got {list(span)}",
        )
        object.__setattr__(self, "span", span)
        _check(self.shift_every >= 1, f"window.shift_every must be >= 1, got {self.shift_every}")


@dataclass(frozen=True)
class DraftConfig:
    """``mode="draft"``: DRaFT-K, back-propagating the differentiable reward through the last K steps.

    Every round samples P x K images, the first ``steps - k`` denoising steps without gradient and the last
    ``k`` with gradient through the policy (LoRA), then the frozen reward extractor; the loss is
    ``-reward_weight * R + kl_weight * KL``, R the un-standardised composite (λ-weighted raw semantic
    consistency and group values of coverage and expansion) and KL DPOK's ε-MSE to the reference policy
    on the K differentiable steps. One optimizer step per rollout.

    Attributes:
        k: differentiable denoising steps at the end of the chain (DRaFT-K; DRaFT-1 is often best).
        reward_weight: weight of the reward in the loss.
        kl_weight: weight of the ε-MSE to the reference (adapters off) on the differentiable steps.
        checkpoint: recompute the differentiable steps' activations in the backward pass (saves memory).
    """

    k: int = 1
    reward_weight: float = 1.0
    kl_weight: float = 0.1
    checkpoint: bool = False

    def __post_init__(self) -> None:
        _check(self.k >= 1, f"draft.k must be >= 1, got {self.k}")
        _check(self.kl_weight >= 0, f"draft.kl_weight must be >= 0, got {self.kl_weight}")


@dataclass(frozen=True)
class EmbeddingNetConfig:
    """The recognizer's :class:`~rgsd_lightning.backbones.EmbeddingNet` (timm backbone -> projection -> neck).

    Attributes:
        architecture: timm model name of the backbone (``resnet50``, ``vit_base_patch16_224``, ...).
        pretrained_path: local backbone weights file; None = random init (nothing is ever downloaded).
        in_chans: input channels (must match the datamodule's ``channels``).
        neck: "bnneck" (BatchNorm on the embedding, BoT) or "none".
        embedding_dim: linear projection size before the neck (None: the backbone's width).
        timm_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"img_size": [256, 128]}`` for a ViT).
    """

    architecture: str = "resnet50"
    pretrained_path: str | None = None
    in_chans: int = 3
    neck: Literal["bnneck", "none"] = "bnneck"
    embedding_dim: int | None = None
    timm_kwargs: dict[str, Any] | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~rgsd_lightning.backbones.EmbeddingNet`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
