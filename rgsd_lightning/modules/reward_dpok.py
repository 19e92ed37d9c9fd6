"""RewardDPOK: stage 2 of the method (paper §3.2, §4.2; DPOK, Fan et al. 2023), and two cheaper RL modes.

The cold-start generator is the policy; its denoising steps are the actions. One ``training_step`` is
one round. In ``mode="dpok"`` (the paper):

1. **rollout** - P identities (from the datamodule's ``rl`` loader, different on every rank) x K samples
   with our stochastic sampler (η=1 by default), the trajectories and step log-probs recorded;
2. **reward** - the three-part composite reward (semantic consistency, coverage, expansion; Eqs. 2-11)
   of the final images in the frozen baseline recognizer's feature space, standardised over the P x K
   batch of all ranks;
3. **store** - the stochastic steps become transitions in a FIFO replay buffer (DPOK) or replace it
   (``on_policy``);
4. **update** - the fresh transitions' old log-probs are recomputed with the update's own forward (so the
   importance ratio is exactly 1 on-policy), then ``policy_steps`` optimizer steps, each accumulating
   ``grad_accum`` micro-batches of the KL-regularised policy gradient (``rl.objective``); gradients are
   synchronised once per optimizer step and clipped by Lightning after mixed precision unscales them.

``mode="windowed"`` (Flow-GRPO-Fast / MixGRPO, group ``window``): rollouts draw noise on a window of a few
steps only (deterministic DDIM elsewhere) and only the window's steps become transitions; the rest is as
in ``dpok``. ``mode="draft"`` (DRaFT-K, group ``draft``): no policy gradient; the un-standardised
composite reward is back-propagated through the frozen reward extractor and the last K denoising steps
into the trainable weights, with DPOK's ε-MSE to the reference on those steps; one optimizer step per
round (:mod:`rgsd_lightning.rl.draft`).

Trainable parameters are LoRA adapters (peft, rank 4 on attention) by default; the KL reference is the
same network with the adapters switched off, so no second copy of the generator exists. The policy
stays in eval mode throughout (no label dropout inside the RL loss).

Every round logs the reward components, the λ-weighted raw composite (``reward_raw``), and diversity in
the reward extractor's space (:mod:`rgsd_lightning.rewards.diversity`): the intra-identity spread of the
samples relative to the real bank (``spread_ratio``: -> 0 collapse, >> 1 noise), k-NN ``precision`` and
``coverage``; plus the wall seconds of rollout, reward and update. The module only logs (the logger is
the record); the ``RewardCurves`` callback (``callbacks/reward_curves.py``, in every shipped RL stage file)
turns the logged rounds into ``reward_history.json`` and ``reward_curves.png``.

Configuration is grouped (:mod:`rgsd_lightning.modules.config`): ``sampler`` (rollouts), ``reward``
(the composite reward), ``lora`` (adapters), ``objective`` (the policy-gradient loss: α, β, KL form,
ratio clip, value baseline), ``update`` (which transitions are stored, replay, optimizer steps per
rollout, micro-batching, clipping, log-prob recompute), ``window`` and ``draft`` (the modes), ``grid``.
"""

from __future__ import annotations

import contextlib
import copy
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable

from rgsd_lightning.diffusion.dit import set_trainable
from rgsd_lightning.diffusion.generator import DiTGenerator, check_identities_match
from rgsd_lightning.diffusion.sampling import guided_eps, sample, step_with_logprob
from rgsd_lightning.diffusion.schedule import SIGMA_MIN, make_timesteps, step_sigmas
from rgsd_lightning.modules.config import (
    DraftConfig,
    GridConfig,
    LoRAConfig,
    PolicyGradientConfig,
    RewardConfig,
    SamplerConfig,
    UpdateConfig,
    WindowConfig,
    as_config,
    plain,
)
from rgsd_lightning.modules.generator_base import GROUPS, GeneratorModule
from rgsd_lightning.modules.optim import resolve, spec, with_lr
from rgsd_lightning.provenance import folder_fingerprint
from rgsd_lightning.rewards.diversity import knn_precision_coverage, spread_ratio
from rgsd_lightning.rewards.functional import semantic_consistency
from rgsd_lightning.rl import (
    ReplayBuffer,
    Transitions,
    ValueNet,
    adapters_disabled,
    dpok_kl,
    exact_gaussian_kl,
    inject_lora,
    merged_copy,
    policy_gradient_loss,
)
from rgsd_lightning.rl.draft import raw_reward
from rgsd_lightning.rl.rollout import (
    decode_with_grad,
    draft_chain,
    sample_windowed,
    step_etas,
    stochastic_candidates,
    window_region,
    window_start,
)

ADAMW = spec("torch.optim.AdamW", lr=1e-5, weight_decay=0.0)
"""The default optimizer (paper: 1e-5)."""
RL_GROUPS = ("lora", "objective", "update", "window", "draft")
"""RewardDPOK's own config groups (beside the generator stages' ``sampler``, ``grid``, ``reward``)."""
MODES = ("dpok", "windowed", "draft")
REWARD_KEYS = (
    "total",
    "raw",
    "sem",
    "cov",
    "exp",
    "sem_std",
    "cov_std",
    "exp_std",
    "cov_group",
    "exp_group",
)
DIVERSITY_KEYS = ("spread_ratio", "precision", "coverage")
MAX_KEYS = ("logp_check", "logp_drift", "ratio_max_dev", "kl_first")
"""Window statistics logged as their maximum over the round (the others as their mean)."""


def check_rollout_noise(alphas_cumprod: torch.Tensor, sampler: SamplerConfig) -> None:
    """ValueError unless at least one rollout step draws noise (σ > SIGMA_MIN), saying which eta would.

    A deterministic step has log-prob 0 by design and is never stored: with no stochastic step the replay
    buffer stays empty and there is nothing to learn from.
    """
    timesteps, prev = make_timesteps(len(alphas_cumprod), sampler.steps)
    sigmas = step_sigmas(timesteps, prev, alphas_cumprod, sampler.eta, sampler.method)
    if bool((sigmas > SIGMA_MIN).any()):
        return
    largest = float(step_sigmas(timesteps, prev, alphas_cumprod, 1.0, "ddpm").max())  # σ at η = 1
    if largest <= SIGMA_MIN:
        raise ValueError(
            f"sampler.steps={sampler.steps}: every rollout step is deterministic whatever eta (the only step "
            "maps t=0 to the image); RL needs sampler.steps >= 2"
        )
    raise ValueError(
        f"sampler.eta={sampler.eta} makes every one of the sampler.steps={sampler.steps} rollout steps "
        f"deterministic (largest step std {sampler.eta * largest:.3g} < {SIGMA_MIN}): such steps carry no "
        f"log-probability, so the replay buffer would stay empty; use sampler.eta >= "
        f"{2 * SIGMA_MIN / largest:.3g} (DPOK: 1.0) or sampler.method='ddpm'"
    )


class RewardDPOK(GeneratorModule):
    """RL fine-tuning of the generator on the three-part reward: DPOK (paper), windowed DPOK or DRaFT-K.

    Args:
        num_identities: number of identities (linked from the datamodule; must equal the export's).
        generator: the cold-start generator export folder (the policy's initialisation and KL reference).
        reward_extractor: recognizer export (baseline recognizer backbone) giving the reward's feature space
            (from Python, ``set_reward_extractor(module)`` may provide any module instead).
        mode: "dpok" (the paper: policy gradient on every stochastic step), "windowed" (policy gradient on
            a window of a few stochastic steps, deterministic DDIM elsewhere; ``window``) or "draft"
            (DRaFT-K: the differentiable reward back-propagated through the last K steps; ``draft``).
        trainable: "lora" (adapters on attention; default), "label_table", or "all" (full fine-tuning; the
            KL reference is then a frozen copy of the generator).
        lora: the LoRA adapters (``rank``, ``alpha``, ``targets``) when ``trainable="lora"``.
        optimizer: the optimizer of the policy and, with its own learning rate and no weight decay, of the
            value baseline (class_path / init_args; default AdamW, lr 1e-5 as the paper, no weight decay).
        lr: policy learning rate replacing the optimizer's (None: the optimizer's ``lr``).
        value_lr: learning rate of the value baseline.
        samples_per_identity: K samples per identity in a rollout (groups for coverage/expansion).
        sampler: the rollout sampler; stochastic (``eta`` > 0 or ``method="ddpm"``) for non-degenerate
            log-probs in the policy-gradient modes (DRaFT may run η = 0). The same guidance scale is used in
            the log-prob recompute.
        reward: the composite reward (``lambdas``, ``alpha``, ``sigma``, ``epsilon``, ``tau``, ``credit``).
        objective: the KL-regularised policy-gradient loss (modes "dpok" and "windowed").
        update: transitions kept per trajectory, replay buffer, optimizer steps per rollout, clipping.
        window: the window of stochastic steps of ``mode="windowed"``.
        draft: DRaFT-K settings of ``mode="draft"``.
        grid: sample grids every ``grid.every_n_steps`` rollouts (0: none).
        seed: seed of rollout noise and replay sampling (with the rollout index and rank).
    """

    def __init__(
        self,
        num_identities: int,
        generator: str,
        reward_extractor: str | None = None,
        mode: Literal["dpok", "windowed", "draft"] = "dpok",
        trainable: Literal["lora", "label_table", "all"] = "lora",
        lora: LoRAConfig = LoRAConfig(),
        optimizer: OptimizerCallable = ADAMW,
        lr: float | None = None,
        value_lr: float = 1e-4,
        samples_per_identity: int = 4,
        sampler: SamplerConfig = SamplerConfig(guidance_scale=4.0, eta=1.0),
        reward: RewardConfig = RewardConfig(),
        objective: PolicyGradientConfig = PolicyGradientConfig(),
        update: UpdateConfig = UpdateConfig(),
        window: WindowConfig = WindowConfig(),
        draft: DraftConfig = DraftConfig(),
        grid: GridConfig = GridConfig(every_n_steps=50),
        seed: int = 0,
    ) -> None:
        super().__init__(sampler=sampler, grid=grid, reward=reward)
        self.lora = as_config(LoRAConfig, lora, "lora")
        self.objective = as_config(PolicyGradientConfig, objective, "objective")
        self.update = as_config(UpdateConfig, update, "update")
        self.window = as_config(WindowConfig, window, "window")
        self.draft = as_config(DraftConfig, draft, "draft")
        self.save_hyperparameters(ignore=[*GROUPS, *RL_GROUPS])  # this __init__'s other arguments
        self.save_hyperparameters({**self.group_hparams(), **plain({g: getattr(self, g) for g in RL_GROUPS})})
        self.automatic_optimization = False
        self.optimizer_factory = resolve(optimizer, "optimizer")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {list(MODES)}")
        self.mode = mode
        if self.sampler.method not in ("ddim", "ddpm"):
            raise ValueError(
                f"RL rollouts need per-step DDIM/DDPM maths (log-probs, differentiable steps); "
                f"sampler.method={self.sampler.method!r} is a generation-only solver"
            )
        stochastic = self.sampler.method == "ddpm" or self.sampler.eta > 0
        if mode != "draft" and not stochastic:
            raise ValueError(
                f"RL mode {mode!r} needs stochastic rollouts: set sampler.eta > 0 (DPOK: 1.0) or "
                "sampler.method='ddpm'"
            )
        if mode == "draft" and self.draft.k > self.sampler.steps:
            raise ValueError(f"draft.k={self.draft.k} exceeds sampler.steps={self.sampler.steps}")
        self.generator = DiTGenerator.from_pretrained(generator).eval()
        if mode != "draft":  # DRaFT differentiates through the chain: a deterministic one is fine
            check_rollout_noise(self.generator.alphas_cumprod, self.sampler)
        if self.generator.num_identities != num_identities:
            raise ValueError(
                f"generator export {generator} has {self.generator.num_identities} identities, "
                f"the data has {num_identities}"
            )
        if mode == "windowed":
            self._window_candidates()  # the window fits the schedule (clear error now, not at the 1st round)
        self._reference_table: torch.Tensor | None = None
        self._reference_model: list[torch.nn.Module] = []  # a list so the copy is not a registered submodule
        if trainable == "lora":
            set_trainable(self.generator, [])
            inject_lora(self.generator.transformer, self.lora.rank, self.lora.alpha, self.lora.targets)
        elif trainable == "label_table":
            set_trainable(self.generator, "label_table")
            self.register_buffer("reference_table", self.generator.label_table.weight.detach().clone())
        elif trainable == "all":
            set_trainable(self.generator, "all")
            self._reference_model.append(copy.deepcopy(self.generator).requires_grad_(False).eval())
        else:
            raise ValueError(f"trainable={trainable!r}: expected 'lora', 'label_table' or 'all'")
        self.policy_names = [n for n, p in self.named_parameters() if p.requires_grad]
        state_dim = 1
        for s in self.generator.latent_shape:
            state_dim *= int(s)
        steps = self.sampler.steps
        use_value = self.objective.value_baseline and mode != "draft"
        self.value = ValueNet(state_dim, num_identities + 1, steps) if use_value else None
        self.buffer = ReplayBuffer(0 if self.update.on_policy else self.update.buffer_size)
        self.rollout_index = 0
        self.reward = None
        self.strict_loading = False
        self._grad_norms: dict[str, list[torch.Tensor]] = {}
        self._timing = {"rollout_s": 0.0, "reward_s": 0.0, "update_s": 0.0}

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "identities"):
            check_identities_match(self.generator.identities, list(dm.identities), self.hparams.generator)
        self.adopt_identities()
        if self.reward is None:
            hp = self.hparams
            if hp.reward_extractor is None and getattr(self, "reward_extractor", None) is None:
                raise ValueError(
                    "RewardDPOK needs reward_extractor (a recognizer export) or set_reward_extractor()"
                )
            self.reward = self.build_reward(hp.reward_extractor)

    def configure_optimizers(self):
        """The optimizer of the policy and a second one of the value baseline (each clipped on its own, as
        DPOK; the value's has ``value_lr`` and no weight decay)."""
        hp = self.hparams
        policy = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("value.")]
        optimizers = [self.optimizer_factory(with_lr([{"params": policy, "name": "policy"}], hp.lr))]
        if self.value is not None:
            value = {"params": list(self.value.parameters()), "lr": hp.value_lr, "weight_decay": 0.0}
            optimizers.append(self.optimizer_factory([{**value, "name": "value"}]))
        return optimizers

    def on_fit_start(self) -> None:
        self.generator.eval()  # policy in eval mode during rollout and update (no label dropout)
        for model in self._reference_model:
            model.to(self.device)

    def on_train_epoch_start(self) -> None:
        self.generator.eval()

    # ------------------------------------------------------------------ the reference policy
    @contextlib.contextmanager
    def reference(self) -> Iterator[DiTGenerator]:
        """The KL reference (the cold-start policy): adapters off, original table, or the frozen copy."""
        trainable = self.hparams.trainable
        if trainable == "lora":
            with adapters_disabled(self.generator.transformer):
                yield self.generator
        elif trainable == "label_table":
            weight = self.generator.label_table.weight
            backup = weight.detach().clone()
            with torch.no_grad():
                weight.copy_(self.reference_table)
            try:
                yield self.generator
            finally:
                with torch.no_grad():
                    weight.copy_(backup)
        else:
            yield self._reference_model[0]

    # ------------------------------------------------------------------ rollout and reward
    def _seeds(self, n: int) -> list[int]:
        rank = self.global_rank
        return [zlib.crc32(f"{self.hparams.seed}:{self.rollout_index}:{rank}:{i}".encode()) for i in range(n)]

    def rewards(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reward components of this rank's images (standardised over the batch of every rank), the raw
        composite and the round's diversity statistics."""
        return self.score_features(self.reward_extractor(images), labels)

    def score_features(self, feats: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`rewards` from features (of this rank; gathered over the ranks under DDP)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            all_feats = self.all_gather(feats).flatten(0, 1)
            all_labels = self.all_gather(labels).flatten(0, 1)
            comps = self._components(all_feats, all_labels)
            lo = self.global_rank * len(feats)
            out = {k: v[lo : lo + len(feats)] for k, v in comps.items()}
            out.update(self._diversity(all_feats, all_labels))
            return out
        return {**self._components(feats, labels), **self._diversity(feats, labels)}

    def _components(self, feats: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reward's per-sample dict, the group values of coverage and expansion, the raw composite."""
        comps = {**self.reward.components(feats, labels), **self.reward.group_values(feats, labels)}
        comps["raw"] = raw_reward(comps, self.reward.lambdas)
        return comps

    def _diversity(self, feats: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Spread ratio and k-NN precision/coverage of the round's features against the real bank (0-d)."""
        bank = self.reward.bank
        out = {"spread_ratio": spread_ratio(feats, labels, bank.features, bank.identities)}
        out.update(knn_precision_coverage(feats, labels, bank.features, bank.identities))
        return {k: torch.tensor(float(v)) for k, v in out.items()}

    def _window_candidates(self) -> list[int]:
        s = self.sampler
        timesteps, prev = make_timesteps(self.generator.num_train_timesteps, s.steps)
        candidates = stochastic_candidates(timesteps, prev, self.generator.alphas_cumprod, s.eta, s.method)
        lo, hi = window_region(len(candidates), self.window.span)
        if self.window.size > hi - lo:
            raise ValueError(
                f"window.size={self.window.size} but window.span={list(self.window.span)} holds only "
                f"{hi - lo} of the {len(candidates)} stochastic steps of sampler.steps={s.steps}"
            )
        return candidates

    def window_steps(self) -> list[int]:
        """The step indices of this rollout's window (``mode="windowed"``)."""
        w = self.window
        candidates = self._window_candidates()
        g = torch.Generator().manual_seed(self._seeds(1)[0] ^ 0x317D)
        start = window_start(
            len(candidates),
            w.size,
            placement=w.placement,
            span=w.span,
            shift_every=w.shift_every,
            rollout_index=self.rollout_index,
            generator=g,
        )
        return candidates[start : start + w.size]

    def _sample_rollout(self, labels: torch.Tensor):
        s = self.sampler
        if self.mode == "windowed":
            eta = s.eta if s.method == "ddim" else 1.0
            etas = step_etas(s.steps, self.window_steps(), eta)
            return sample_windowed(
                self.generator,
                labels,
                seeds=self._seeds(len(labels)),
                num_steps=s.steps,
                guidance_scale=s.guidance_scale,
                etas=etas,
                method=s.method,
                clip_x0=self.clip_x0,
            ), torch.tensor([e > 0 for e in etas])
        out = sample(
            self.generator,
            labels,
            seeds=self._seeds(len(labels)),
            num_steps=s.steps,
            guidance_scale=s.guidance_scale,
            eta=s.eta,
            method=s.method,
            clip_x0=self.clip_x0,
            record_trajectory=True,
        )
        return out, torch.ones(s.steps, dtype=torch.bool)

    def rollout(self, identity_labels: torch.Tensor) -> tuple[Transitions, dict[str, torch.Tensor]]:
        """Sample K trajectories per identity, score them, and store their stochastic steps as transitions."""
        s, fraction = self.sampler, self.update.timestep_fraction
        labels = identity_labels.to(self.device).repeat_interleave(self.hparams.samples_per_identity)
        self.generator.eval()
        start = time.perf_counter()
        out, in_window = self._sample_rollout(labels)
        sampled = time.perf_counter()
        with torch.no_grad():
            comps = self.rewards(out.images, labels)
        self._timing["rollout_s"] += sampled - start
        self._timing["reward_s"] += time.perf_counter() - sampled
        sigmas = step_sigmas(
            out.timesteps, out.prev_timesteps, self.generator.alphas_cumprod, s.eta, s.method
        )
        keep = (sigmas > SIGMA_MIN) & in_window  # the steps that draw noise carry a policy gradient
        mask = keep.to(self.device).unsqueeze(0).expand(len(labels), -1).clone()
        if fraction < 1.0:
            g = torch.Generator().manual_seed(self._seeds(1)[0])
            scores = torch.rand(mask.shape, generator=g).masked_fill(~mask.cpu(), 2.0)
            n_keep = max(1, int(round(fraction * int(keep.sum()))))
            chosen = scores.argsort(dim=1)[:, :n_keep]
            mask = torch.zeros_like(mask).scatter_(1, chosen.to(mask.device), True) & mask
        transitions = Transitions.from_trajectories(
            out.trajectory, out.timesteps, out.prev_timesteps, out.log_probs, labels, comps["total"], mask
        )
        return transitions, comps

    # ------------------------------------------------------------------ the policy update
    def policy_step(self, mb: Transitions) -> tuple[torch.Tensor, Any]:
        """The update's forward of a micro-batch: the guided ε and the step's Gaussian (log-prob of the stored
        next state), differentiable in the policy."""
        s = self.sampler
        eps = guided_eps(self.generator, mb.state, mb.t, mb.label, guidance_scale=s.guidance_scale)
        step = step_with_logprob(
            eps,
            mb.state,
            mb.t,
            mb.t_prev,
            self.generator.alphas_cumprod,
            prev_sample=mb.next_state,
            eta=s.eta,
            method=s.method,
            clip_x0=self.clip_x0,
            reduction=self.objective.logprob_reduction,
        )
        return eps, step

    @torch.no_grad()
    def recompute_old_logprobs(self) -> torch.Tensor:
        """Recompute the fresh rollout's old log-probs with the update's own forward (in micro-batches) and
        store them; returns the largest change |recomputed - sampled| (the drift the recompute absorbs)."""
        idx_all = self.buffer.latest_indices()
        drift = torch.zeros(())
        for lo in range(0, len(idx_all), self.update.micro_batch):
            idx = idx_all[lo : lo + self.update.micro_batch]
            mb = self.buffer.get(idx).to(self.device)
            _, step = self.policy_step(mb)
            drift = torch.maximum(drift, (step.log_prob.float() - mb.log_prob).abs().max().cpu())
            self.buffer.set_log_prob(idx, step.log_prob.float())
        return drift

    def micro_batch_loss(
        self, mb: Transitions, check_ratio: bool, fresh: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """KL-regularised policy-gradient loss (+ value loss) of a micro-batch of transitions.

        ``fresh`` (bool per row, before the first optimizer step of a window): rows of the fresh rollout
        whose old log-prob is set to this very forward's value, so their ratio is exactly 1.
        """
        obj, s = self.objective, self.sampler
        alphas = self.generator.alphas_cumprod
        use_kl = obj.kl_weight > 0 and self.rollout_index >= obj.kl_warmup
        with torch.no_grad(), self.reference() as ref:  # reference first: nothing below is modified after
            eps_ref = (
                guided_eps(ref, mb.state, mb.t, mb.label, guidance_scale=s.guidance_scale) if use_kl else None
            )
        eps, step = self.policy_step(mb)
        old_log_prob = mb.log_prob
        if fresh is not None and bool(fresh.any()):
            old_log_prob = torch.where(fresh.to(old_log_prob.device), step.log_prob.detach(), old_log_prob)
            mb.log_prob = old_log_prob  # the caller stores them back
        stats: dict[str, torch.Tensor] = {}
        if check_ratio:
            dev = (step.log_prob.detach() - old_log_prob).abs().max()
            stats["logp_check"] = dev
            stats["kl_first"] = torch.zeros(()) if eps_ref is None else dpok_kl(eps.detach(), eps_ref).mean()
            if dev > obj.ratio_check_tol:
                raise RuntimeError(
                    f"importance ratio != 1 on the first micro-batch of an update window: max |log p_new - "
                    f"log p_old| = {dev.item():.3g} > objective.ratio_check_tol={obj.ratio_check_tol}. The "
                    "log-prob recompute differs from the rollout (precision, label dropout, or a changed "
                    "model); update.recompute_logprob makes the ratio exact."
                )
        advantage = mb.reward
        value_loss = torch.zeros((), device=self.device)
        if self.value is not None:
            v = self.value(mb.state, mb.label, mb.step)
            value_loss = (v - mb.reward).pow(2).mean()
            advantage = mb.reward - v.detach()
        pg, ratio_stats = policy_gradient_loss(
            step.log_prob, old_log_prob, advantage, reward_weight=obj.reward_weight, ratio_clip=obj.ratio_clip
        )
        stats.update(ratio_stats)
        kl = torch.zeros_like(pg)
        if use_kl:
            if obj.kl_form == "dpok":
                kl = dpok_kl(eps, eps_ref)
            else:
                ref_mean = step_with_logprob(
                    eps_ref,
                    mb.state,
                    mb.t,
                    mb.t_prev,
                    alphas,
                    prev_sample=mb.next_state,
                    eta=s.eta,
                    method=s.method,
                    clip_x0=self.clip_x0,
                    reduction=obj.logprob_reduction,
                ).mean
                kl = exact_gaussian_kl(step.mean, ref_mean, step.std)
        loss = (pg + obj.kl_weight * kl).mean() + value_loss
        stats.update(pg_loss=pg.detach().mean(), kl=kl.detach().mean(), value_loss=value_loss.detach())
        return loss, stats

    @contextlib.contextmanager
    def _grad_sync(self, sync: bool) -> Iterator[None]:
        """Block the DDP gradient all-reduce of a backward pass unless ``sync`` (the last micro-batch)."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        block = getattr(strategy, "block_backward_sync", None)
        if sync or block is None:
            yield
            return
        with block():
            yield

    def _optimizers(self) -> list[Any]:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, list | tuple) else [opts]

    def _step(self, optimizers: list[Any]) -> None:
        for opt in optimizers:  # each: Lightning unscales, calls on_before_optimizer_step (clip), steps
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Record the gradient norm, then clip it with Lightning (after mixed precision unscaled it)."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        name = optimizer.param_groups[0].get("name", "policy")
        if params:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params]))
            key = "grad_norm" if name == "policy" else f"{name}_grad_norm"
            self._grad_norms.setdefault(key, []).append(norm)
        if self.update.grad_clip > 0:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.update.grad_clip, gradient_clip_algorithm="norm"
            )

    def policy_gradient_round(self, identity_labels: torch.Tensor) -> tuple[dict, dict]:
        """One DPOK / windowed round: rollout, store, recompute old log-probs, ``policy_steps`` updates."""
        up = self.update
        optimizers = self._optimizers()
        transitions, comps = self.rollout(identity_labels)
        self.buffer.push(transitions)
        start = time.perf_counter()
        window: dict[str, list[torch.Tensor]] = {}
        if up.recompute_logprob:
            drift = self.recompute_old_logprobs()
            window["logp_drift"] = [drift]
            if drift > self.objective.ratio_check_tol:
                raise RuntimeError(
                    f"the update's forward differs from the rollout's: max |log p_update - log p_rollout| = "
                    f"{float(drift):.3g} > objective.ratio_check_tol={self.objective.ratio_check_tol} "
                    "(label dropout, a changed model, or precision drift beyond the bound)"
                )
        rng = torch.Generator().manual_seed(self._seeds(1)[0] ^ 0x5EED)
        fresh_from = len(self.buffer) - self.buffer.latest
        for p_step in range(up.policy_steps):
            for m in range(up.grad_accum):
                first = p_step == 0 and m == 0
                idx = self.buffer.sample_indices(up.micro_batch, rng, latest_only=first or up.on_policy)
                mb = self.buffer.get(idx).to(self.device)
                fresh = None
                if up.recompute_logprob and p_step == 0:
                    fresh = idx >= fresh_from  # the window-start policy is the current one: ratio exactly 1
                loss, stats = self.micro_batch_loss(mb, check_ratio=first, fresh=fresh)
                if fresh is not None and bool(fresh.any()):  # keep the values the ratio used
                    self.buffer.set_log_prob(idx[fresh.cpu()], mb.log_prob[fresh.to(mb.log_prob.device)])
                with self._grad_sync(sync=m == up.grad_accum - 1):
                    self.manual_backward(loss / up.grad_accum)
                for k, v in stats.items():
                    window.setdefault(k, []).append(v.detach().float())
            self._step(optimizers)
        self._timing["update_s"] += time.perf_counter() - start
        return comps, window

    def draft_loss(self, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """DRaFT-K loss of one batch of samples (``labels``: one per image): ``-w R_raw + β KL``, with the
        reward components (for logging, no gradient) and the per-sample KL. Times sampling and reward."""
        s, d = self.sampler, self.draft
        self.generator.eval()
        start = time.perf_counter()
        x0, kl = draft_chain(
            self.generator,
            labels,
            seeds=self._seeds(len(labels)),
            num_steps=s.steps,
            guidance_scale=s.guidance_scale,
            eta=s.eta,
            method=s.method,
            k=d.k,
            reference=self.reference if d.kl_weight > 0 else None,
            use_checkpoint=d.checkpoint,
            clip_x0=self.clip_x0,
        )
        images = decode_with_grad(self.generator, x0)
        sampled = time.perf_counter()
        feats = self.reward_extractor(images)
        # the raw composite of a sample depends on its identity's group only, and a rank's identities are
        # its own: the local objective's gradient, averaged by DDP, is the full batch's
        sem = semantic_consistency(feats, labels, self.reward.bank.prototypes())
        objective = raw_reward({"sem": sem, **self.reward.group_values(feats, labels)}, self.reward.lambdas)
        objective = objective.mean()
        loss = -d.reward_weight * objective + d.kl_weight * kl.mean()
        with torch.no_grad():
            comps = self.score_features(feats.detach(), labels)
        self._timing["rollout_s"] += sampled - start
        self._timing["reward_s"] += time.perf_counter() - sampled
        return loss, comps, kl

    def draft_round(self, identity_labels: torch.Tensor) -> tuple[dict, dict]:
        """One DRaFT-K round: sample with the last K steps differentiable, ascend the raw composite reward."""
        optimizers = self._optimizers()
        labels = identity_labels.to(self.device).repeat_interleave(self.hparams.samples_per_identity)
        loss, comps, kl = self.draft_loss(labels)
        start = time.perf_counter()
        self.manual_backward(loss)
        self._step(optimizers)
        self._timing["update_s"] += time.perf_counter() - start
        window = {"kl": [kl.detach().mean()], "draft_loss": [loss.detach()]}
        return {k: v.detach() for k, v in comps.items()}, window

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self._timing = {"rollout_s": 0.0, "reward_s": 0.0, "update_s": 0.0}
        self._grad_norms = {}
        if self.mode == "draft":
            comps, window = self.draft_round(batch["label"])
        else:
            comps, window = self.policy_gradient_round(batch["label"])
        window.update(self._grad_norms)
        self.rollout_index += 1
        self._log_round(comps, window)
        every = self.grid.every_n_steps
        if every and self.rollout_index % every == 0:
            self.log_sample_grid("train/samples", self.rollout_index)

    def _log_round(self, comps: dict[str, torch.Tensor], window: dict[str, list[torch.Tensor]]) -> None:
        values = {f"train/reward_{k}": comps[k].float().mean() for k in REWARD_KEYS if k in comps}
        values.update({f"train/{k}": comps[k].float() for k in DIVERSITY_KEYS if k in comps})
        for k, v in window.items():
            stacked = torch.stack([x.cpu() for x in v])
            values[f"train/{k}"] = stacked.max() if k in MAX_KEYS else stacked.mean()
        values["train/buffer_size"] = torch.tensor(float(len(self.buffer)))
        for k, v in self._timing.items():
            values[f"train/time_{k}"] = torch.tensor(v)
        self.log_dict(values, on_step=True, on_epoch=False, sync_dist=True, batch_size=1)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = set(self.policy_names)
        checkpoint["state_dict"] = {
            k: v
            for k, v in checkpoint["state_dict"].items()
            if k in keep or k.startswith(("value.", "reward.", "reference_table"))
        }
        checkpoint["rgsd_rl"] = {
            "buffer": self.buffer.state_dict(),
            "rollout_index": self.rollout_index,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("rgsd_rl")
        if state is None:
            raise ValueError("not a RewardDPOK checkpoint (no replay buffer / rollout state)")
        self.buffer.load_state_dict(state["buffer"])
        self.rollout_index = int(state["rollout_index"])
        missing = [n for n in self.policy_names if n not in checkpoint["state_dict"]]
        if missing:
            raise ValueError(
                f"checkpoint does not match this RewardDPOK: policy parameters missing {missing[:3]} "
                "(different trainable / LoRA settings?)"
            )

    # ------------------------------------------------------------------ export
    def export_provenance(self) -> dict[str, Any]:
        extractor = self.hparams.reward_extractor
        fingerprint = folder_fingerprint(extractor) if extractor and Path(extractor).exists() else None
        return {
            "parent": self.hparams.generator,
            "reward_extractor": extractor,
            "reward_extractor_fingerprint": fingerprint,
            "rollouts": self.rollout_index,
        }

    def export(self, directory: str | Path) -> Path:
        """Generator export with the LoRA adapters merged into the base weights."""
        if self.hparams.trainable != "lora":
            return super().export(directory)
        merged = merged_copy(self.generator.transformer)
        exported = DiTGenerator(
            merged,
            self.generator.vae,
            self.generator.identities,
            image_size=self.generator.image_size,
            channels=self.generator.channels,
            scheduler_config=self.generator.scheduler_config,
            preset=self.generator.preset,
            vae_source=self.generator.vae_source,
            tied_timestep_embedder=self.generator.tied_timestep_embedder,
        )
        original, self.generator = self.generator, exported
        try:
            return super().export(directory)
        finally:
            self.generator = original
