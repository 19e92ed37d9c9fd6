"""RewardDPOK: stage 2 of the method (paper §3.2, §4.2; DPOK, Fan et al. 2023).

The cold-start generator is the policy; its denoising steps are the actions. One ``training_step`` is
one DPOK round:

1. **rollout** - P identities (from the datamodule's ``rl`` loader, different on every rank) x K samples
   with our stochastic sampler (η=1 by default), the trajectories and step log-probs recorded;
2. **reward** - the three-part composite reward (semantic consistency, coverage, expansion; Eqs. 2-11)
   of the final images in the frozen baseline recognizer's feature space, standardised over the P x K
   batch of all ranks;
3. **store** - the stochastic steps become transitions in a FIFO replay buffer (DPOK) or replace it
   (``on_policy``);
4. **update** - ``policy_steps`` optimizer steps, each accumulating ``grad_accum`` micro-batches of the
   KL-regularised policy gradient (``rl.objective``); gradients are synchronised once per optimizer step.

Trainable parameters are LoRA adapters (peft, rank 4 on attention) by default; the KL reference is the
same network with the adapters switched off, so no second copy of the generator exists. The policy
stays in eval mode throughout (no label dropout inside the RL loss). The first micro-batch of every
update window is drawn from the fresh rollout and its importance ratio must be 1 (checked).
"""

from __future__ import annotations

import contextlib
import copy
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from rgsd_lightning.callbacks.images import run_dir
from rgsd_lightning.diffusion import DiTGenerator, guided_eps, sample, step_with_logprob
from rgsd_lightning.diffusion.dit import set_trainable
from rgsd_lightning.diffusion.generator import check_identities_match
from rgsd_lightning.diffusion.sampling import SIGMA_MIN, check_eta
from rgsd_lightning.diffusion.schedule import make_timesteps
from rgsd_lightning.modules.generator_base import GeneratorModule
from rgsd_lightning.provenance import folder_fingerprint
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
from rgsd_lightning.rl.objective import stochastic_steps

REWARD_KEYS = ("total", "sem", "cov", "exp", "sem_std", "cov_std", "exp_std", "cov_group", "exp_group")


def check_rollout_noise(alphas_cumprod: torch.Tensor, sample_steps: int, eta: float, sampler: str) -> None:
    """ValueError unless at least one rollout step draws noise (σ > SIGMA_MIN), saying which eta would.

    A deterministic step has log-prob 0 by design and is never stored: with no stochastic step the replay
    buffer stays empty and there is nothing to learn from.
    """
    timesteps, prev = make_timesteps(len(alphas_cumprod), sample_steps)
    if bool(stochastic_steps(timesteps, prev, alphas_cumprod, eta, sampler, SIGMA_MIN).any()):
        return
    a = alphas_cumprod.detach().double().cpu()  # σ of each step at η = 1 (as in stochastic_steps)
    a_t = a[timesteps]
    a_s = torch.where(prev >= 0, a[prev.clamp(min=0)], torch.ones_like(a_t))
    largest = float(((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).clamp(min=0).sqrt().max())
    if largest <= SIGMA_MIN:
        raise ValueError(
            f"sample_steps={sample_steps}: every rollout step is deterministic whatever eta (the only step "
            "maps t=0 to the image); RL needs sample_steps >= 2"
        )
    raise ValueError(
        f"eta={eta} makes every one of the sample_steps={sample_steps} rollout steps deterministic (largest "
        f"step std {eta * largest:.3g} < {SIGMA_MIN}): such steps carry no log-probability, so the replay "
        f"buffer would stay empty; use eta >= {2 * SIGMA_MIN / largest:.3g} (DPOK: 1.0) or sampler='ddpm'"
    )


class RewardDPOK(GeneratorModule):
    """KL-regularised policy-gradient fine-tuning of the generator on the three-part reward.

    Args:
        num_identities: number of identities (linked from the datamodule; must equal the export's).
        generator: the cold-start generator export folder (the policy's initialisation and KL reference).
        reward_extractor: recognizer export (baseline recognizer backbone) giving the reward's feature space
            (from Python, ``set_reward_extractor(module)`` may provide any module instead).
        trainable: "lora" (adapters on attention; default), "label_table", or "all" (full fine-tuning; the
            KL reference is then a frozen copy of the generator).
        lora_rank: LoRA rank (DPOK: 4).
        lora_alpha: LoRA alpha (None: equal to the rank).
        lora_targets: module names that get adapters.
        lr: policy learning rate (paper: 1e-5).
        value_lr: learning rate of the value baseline.
        weight_decay: AdamW weight decay of the policy.
        samples_per_identity: K samples per identity in a rollout (groups for coverage/expansion).
        sampler: "ddim" (with ``eta``) or "ddpm".
        sample_steps: denoising steps of a rollout.
        eta: DDIM η of rollouts (1 = ancestral, needed for non-degenerate log-probs).
        guidance_scale: classifier-free guidance in rollouts and in the log-prob recompute (the same rule).
        reward_lambdas: λ_sem, λ_cov, λ_exp (paper: 1.0, 0.75, 0.25).
        reward_alpha: α of the coverage redundancy term.
        reward_sigma: RBF bandwidth (None: median heuristic per identity).
        reward_epsilon: ε of the expansion target (1 + ε) S_r.
        reward_tau: τ of the expansion reward (None: S_r of the identity).
        reward_credit: per-sample credit of the set rewards: "loo" (leave-one-out) or "group".
        reward_weight: α of DPOK (weight of the reward term).
        kl_weight: β of DPOK (weight of the per-step KL to the cold-start policy).
        kl_form: "dpok" (unweighted ε-MSE, DPOK's code) or "exact" (Gaussian KL of the step kernels).
        kl_warmup: rollouts before the KL term switches on.
        ratio_clip: c of the importance-ratio clamp [1 - c, 1 + c] (DPOK: 1e-4).
        value_baseline: learn V(x_t, y, step) and use r - V as the advantage (DPOK).
        grad_clip: max grad norm of the policy parameters per optimizer step (DPOK: 0.1).
        timestep_fraction: share of each trajectory's stochastic steps stored as transitions.
        buffer_size: replay capacity in transitions (DPOK: 1000).
        on_policy: train only on the latest rollout (DDPO-style) instead of the replay buffer.
        policy_steps: optimizer steps per rollout (DPOK: 5).
        micro_batch: transitions per micro-batch.
        grad_accum: micro-batches accumulated per optimizer step.
        logprob_reduction: "mean" (DPOK/DDPO) or "sum" of the Gaussian log-density over elements.
        ratio_check_tol: max |log p_new - log p_old| allowed on the first micro-batch of a window.
        grid_every_n_steps: rollouts between sample grids (0: none).
        grid_identities: identities in the grids.
        grid_samples: images per identity in the grids.
        grid_seed: seed of the grid samples.
        seed: seed of rollout noise and replay sampling (with the rollout index and rank).
    """

    def __init__(
        self,
        num_identities: int,
        generator: str,
        reward_extractor: str | None = None,
        trainable: Literal["lora", "label_table", "all"] = "lora",
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
        lr: float = 1e-5,
        value_lr: float = 1e-4,
        weight_decay: float = 0.0,
        samples_per_identity: int = 4,
        sampler: Literal["ddim", "ddpm"] = "ddim",
        sample_steps: int = 50,
        eta: float = 1.0,
        guidance_scale: float = 4.0,
        reward_lambdas: tuple[float, float, float] = (1.0, 0.75, 0.25),
        reward_alpha: float = 0.5,
        reward_sigma: float | None = None,
        reward_epsilon: float = 0.1,
        reward_tau: float | None = None,
        reward_credit: Literal["loo", "group"] = "loo",
        reward_weight: float = 10.0,
        kl_weight: float = 0.01,
        kl_form: Literal["dpok", "exact"] = "dpok",
        kl_warmup: int = 0,
        ratio_clip: float = 1e-4,
        value_baseline: bool = True,
        grad_clip: float = 0.1,
        timestep_fraction: float = 1.0,
        buffer_size: int = 1000,
        on_policy: bool = False,
        policy_steps: int = 5,
        micro_batch: int = 4,
        grad_accum: int = 12,
        logprob_reduction: Literal["mean", "sum"] = "mean",
        ratio_check_tol: float = 1e-4,
        grid_every_n_steps: int = 50,
        grid_identities: int = 8,
        grid_samples: int = 4,
        grid_seed: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if not 0.0 < timestep_fraction <= 1.0:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
        check_eta(eta)
        if sampler == "ddim" and eta <= 0:
            raise ValueError("RL needs stochastic rollouts: set eta > 0 (DPOK: 1.0) or sampler='ddpm'")
        self.generator = DiTGenerator.from_pretrained(generator).eval()
        check_rollout_noise(self.generator.alphas_cumprod, sample_steps, eta, sampler)
        if self.generator.num_identities != num_identities:
            raise ValueError(
                f"generator export {generator} has {self.generator.num_identities} identities, "
                f"the data has {num_identities}"
            )
        self._reference_table: torch.Tensor | None = None
        self._reference_model: list[torch.nn.Module] = []  # a list so the copy is not a registered submodule
        if trainable == "lora":
            set_trainable(self.generator, [])
            inject_lora(self.generator.transformer, lora_rank, lora_alpha, lora_targets)
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
        self.value = ValueNet(state_dim, num_identities + 1, sample_steps) if value_baseline else None
        self.buffer = ReplayBuffer(0 if on_policy else buffer_size)
        self.rollout_index = 0
        self.history: list[dict[str, float]] = []
        self.reward = None
        self.strict_loading = False

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
            self.reward = self.build_reward(
                hp.reward_extractor,
                lambdas=tuple(hp.reward_lambdas),
                alpha=hp.reward_alpha,
                sigma=hp.reward_sigma,
                epsilon=hp.reward_epsilon,
                tau=hp.reward_tau,
                credit=hp.reward_credit,
            )

    def configure_optimizers(self):
        hp = self.hparams
        policy = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("value.")]
        groups = [{"params": policy, "lr": hp.lr, "weight_decay": hp.weight_decay, "name": "policy"}]
        if self.value is not None:
            groups.append(
                {
                    "params": list(self.value.parameters()),
                    "lr": hp.value_lr,
                    "weight_decay": 0.0,
                    "name": "value",
                }
            )
        return torch.optim.AdamW(groups)

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
        """Reward components of this rank's images, standardised over the batch of every rank."""
        feats = self.reward_extractor(images)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            all_feats = self.all_gather(feats).flatten(0, 1)
            all_labels = self.all_gather(labels).flatten(0, 1)
            comps = self._components(all_feats, all_labels)
            lo = self.global_rank * len(feats)
            return {k: v[lo : lo + len(feats)] for k, v in comps.items()}
        return self._components(feats, labels)

    def _components(self, feats: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reward's per-sample dict plus the group values of coverage and expansion (for logging)."""
        return {**self.reward.components(feats, labels), **self.reward.group_values(feats, labels)}

    def rollout(self, identity_labels: torch.Tensor) -> tuple[Transitions, dict[str, torch.Tensor]]:
        """Sample K trajectories per identity, score them, and store their stochastic steps as transitions."""
        hp = self.hparams
        labels = identity_labels.to(self.device).repeat_interleave(hp.samples_per_identity)
        self.generator.eval()
        out = sample(
            self.generator,
            labels,
            seeds=self._seeds(len(labels)),
            num_steps=hp.sample_steps,
            guidance_scale=hp.guidance_scale,
            eta=hp.eta,
            method=hp.sampler,
            record_trajectory=True,
        )
        with torch.no_grad():
            comps = self.rewards(out.images, labels)
        keep = stochastic_steps(
            out.timesteps, out.prev_timesteps, self.generator.alphas_cumprod, hp.eta, hp.sampler
        )
        mask = keep.unsqueeze(0).expand(len(labels), -1).clone()
        if hp.timestep_fraction < 1.0:
            g = torch.Generator().manual_seed(self._seeds(1)[0])
            scores = torch.rand(mask.shape, generator=g).masked_fill(~mask.cpu(), 2.0)
            n_keep = max(1, int(round(hp.timestep_fraction * int(keep.sum()))))
            chosen = scores.argsort(dim=1)[:, :n_keep]
            mask = torch.zeros_like(mask).scatter_(1, chosen.to(mask.device), True) & mask
        transitions = Transitions.from_trajectories(
            out.trajectory, out.timesteps, out.prev_timesteps, out.log_probs, labels, comps["total"], mask
        )
        return transitions, comps

    # ------------------------------------------------------------------ the policy update
    def micro_batch_loss(
        self, mb: Transitions, check_ratio: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """KL-regularised policy-gradient loss (+ value loss) of a micro-batch of transitions."""
        hp = self.hparams
        alphas = self.generator.alphas_cumprod
        step_kwargs = dict(eta=hp.eta, method=hp.sampler, reduction=hp.logprob_reduction)
        use_kl = hp.kl_weight > 0 and self.rollout_index >= hp.kl_warmup
        with torch.no_grad(), self.reference() as ref:  # reference first: nothing below is modified after
            eps_ref = (
                guided_eps(ref, mb.state, mb.t, mb.label, guidance_scale=hp.guidance_scale)
                if use_kl
                else None
            )
        eps = guided_eps(self.generator, mb.state, mb.t, mb.label, guidance_scale=hp.guidance_scale)
        step = step_with_logprob(
            eps, mb.state, mb.t, mb.t_prev, alphas, prev_sample=mb.next_state, **step_kwargs
        )
        stats: dict[str, torch.Tensor] = {}
        dev = (step.log_prob.detach() - mb.log_prob).abs().max()
        if check_ratio:
            stats["logp_check"] = dev
            stats["kl_first"] = torch.zeros(()) if eps_ref is None else dpok_kl(eps.detach(), eps_ref).mean()
            if dev > hp.ratio_check_tol:
                raise RuntimeError(
                    f"importance ratio != 1 on the first micro-batch of an update window: max |log p_new - "
                    f"log p_old| = {dev.item():.3g} > ratio_check_tol={hp.ratio_check_tol}. The log-prob "
                    "recompute differs from the rollout (precision, label dropout, or a changed model)."
                )
        advantage = mb.reward
        value_loss = torch.zeros((), device=self.device)
        if self.value is not None:
            v = self.value(mb.state, mb.label, mb.step)
            value_loss = (v - mb.reward).pow(2).mean()
            advantage = mb.reward - v.detach()
        pg, ratio_stats = policy_gradient_loss(
            step.log_prob, mb.log_prob, advantage, reward_weight=hp.reward_weight, ratio_clip=hp.ratio_clip
        )
        stats.update(ratio_stats)
        kl = torch.zeros_like(pg)
        if use_kl:
            if hp.kl_form == "dpok":
                kl = dpok_kl(eps, eps_ref)
            else:
                ref_mean = step_with_logprob(
                    eps_ref, mb.state, mb.t, mb.t_prev, alphas, prev_sample=mb.next_state, **step_kwargs
                ).mean
                kl = exact_gaussian_kl(step.mean, ref_mean, step.std)
        loss = (pg + hp.kl_weight * kl).mean() + value_loss
        stats.update(pg_loss=pg.detach().mean(), kl=kl.detach().mean(), value_loss=value_loss.detach())
        return loss, stats

    def training_step(self, batch: dict, batch_idx: int) -> None:
        hp = self.hparams
        opt = self.optimizers()
        transitions, comps = self.rollout(batch["label"])
        self.buffer.push(transitions)
        rng = torch.Generator().manual_seed(self._seeds(1)[0] ^ 0x5EED)
        policy = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("value.")]
        window: dict[str, list[torch.Tensor]] = {}
        for p_step in range(hp.policy_steps):
            for m in range(hp.grad_accum):
                first = p_step == 0 and m == 0
                mb = self.buffer.sample(hp.micro_batch, rng, latest_only=first or hp.on_policy).to(
                    self.device
                )
                loss, stats = self.micro_batch_loss(mb, check_ratio=first)
                with opt.toggle_model(sync_grad=m == hp.grad_accum - 1):
                    self.manual_backward(loss / hp.grad_accum)
                for k, v in stats.items():
                    window.setdefault(k, []).append(v.detach().float())
            grad_norm = torch.nn.utils.clip_grad_norm_(policy, hp.grad_clip)
            window.setdefault("grad_norm", []).append(grad_norm.detach().float())
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.rollout_index += 1
        self._log_round(comps, window)
        if hp.grid_every_n_steps and self.rollout_index % hp.grid_every_n_steps == 0:
            self.log_sample_grid("train/samples", self.rollout_index)

    def _log_round(self, comps: dict[str, torch.Tensor], window: dict[str, list[torch.Tensor]]) -> None:
        values = {f"train/reward_{k}": comps[k].float().mean() for k in REWARD_KEYS if k in comps}
        for k, v in window.items():
            stacked = torch.stack(v)
            values[f"train/{k}"] = (
                stacked.max() if k in ("logp_check", "ratio_max_dev", "kl_first") else stacked.mean()
            )
        values["train/buffer_size"] = torch.tensor(float(len(self.buffer)))
        self.log_dict(values, on_step=True, on_epoch=False, sync_dist=True, batch_size=1)
        record = {"rollout": self.rollout_index, **{k: float(v) for k, v in values.items()}}
        self.history.append(record)

    def on_train_end(self) -> None:
        if self._trainer is None:
            return
        log_dir = run_dir(self.trainer)  # every rank: log_dir is a collective under DDP
        if not self.trainer.is_global_zero or not self.history:
            return
        from rgsd_lightning.callbacks.plots import plot_reward_curves

        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "reward_history.json").write_text(json.dumps(self.history, indent=1))
        plot_reward_curves(self.history, log_dir / "reward_curves.png")

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
            "history": self.history,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("rgsd_rl")
        if state is None:
            raise ValueError("not a RewardDPOK checkpoint (no replay buffer / rollout state)")
        self.buffer.load_state_dict(state["buffer"])
        self.rollout_index = int(state["rollout_index"])
        self.history = list(state["history"])
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
