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

Configuration is grouped (:mod:`rgsd_lightning.modules.config`): ``sampler`` (rollouts), ``reward``
(the composite reward), ``lora`` (adapters), ``objective`` (the policy-gradient loss: α, β, KL form,
ratio clip, value baseline) and ``update`` (which transitions are stored, replay, optimizer steps per
rollout, micro-batching, clipping), ``grid`` (sample grids). A further RL mode (a window of a few denoising
steps per trajectory, or DRaFT-K back-propagating the differentiable reward through the last K steps) adds
a ``mode`` argument and its own group beside these, reusing ``sampler``, ``reward``, ``lora`` and ``update``.
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
from rgsd_lightning.diffusion.dit import set_trainable
from rgsd_lightning.diffusion.generator import DiTGenerator, check_identities_match
from rgsd_lightning.diffusion.sampling import guided_eps, sample, step_with_logprob
from rgsd_lightning.diffusion.schedule import SIGMA_MIN, step_sigmas
from rgsd_lightning.modules.config import (
    GridConfig,
    LoRAConfig,
    PolicyGradientConfig,
    RewardConfig,
    SamplerConfig,
    UpdateConfig,
    as_config,
    plain,
)
from rgsd_lightning.modules.generator_base import GROUPS, GeneratorModule
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

RL_GROUPS = ("lora", "objective", "update")
"""RewardDPOK's own config groups (beside the generator stages' ``sampler``, ``grid``, ``reward``)."""
REWARD_KEYS = ("total", "sem", "cov", "exp", "sem_std", "cov_std", "exp_std", "cov_group", "exp_group")


class RewardDPOK(GeneratorModule):
    """KL-regularised policy-gradient fine-tuning of the generator on the three-part reward.

    Args:
        num_identities: number of identities (linked from the datamodule; must equal the export's).
        generator: the cold-start generator export folder (the policy's initialisation and KL reference).
        reward_extractor: recognizer export (baseline recognizer backbone) giving the reward's feature space
            (from Python, ``set_reward_extractor(module)`` may provide any module instead).
        trainable: "lora" (adapters on attention; default), "label_table", or "all" (full fine-tuning; the
            KL reference is then a frozen copy of the generator).
        lora: the LoRA adapters (``rank``, ``alpha``, ``targets``) when ``trainable="lora"``.
        lr: policy learning rate (paper: 1e-5).
        value_lr: learning rate of the value baseline.
        weight_decay: AdamW weight decay of the policy.
        samples_per_identity: K samples per identity in a rollout (groups for coverage/expansion).
        sampler: the rollout sampler; stochastic (``eta`` > 0 or ``method="ddpm"``) for non-degenerate
            log-probs. The same guidance scale is used in the log-prob recompute.
        reward: the composite reward (``lambdas``, ``alpha``, ``sigma``, ``epsilon``, ``tau``, ``credit``).
        objective: the KL-regularised policy-gradient loss.
        update: transitions kept per trajectory, replay buffer, optimizer steps per rollout.
        grid: sample grids every ``grid.every_n_steps`` rollouts (0: none).
        seed: seed of rollout noise and replay sampling (with the rollout index and rank).
    """

    def __init__(
        self,
        num_identities: int,
        generator: str,
        reward_extractor: str | None = None,
        trainable: Literal["lora", "label_table", "all"] = "lora",
        lora: LoRAConfig = LoRAConfig(),
        lr: float = 1e-5,
        value_lr: float = 1e-4,
        weight_decay: float = 0.0,
        samples_per_identity: int = 4,
        sampler: SamplerConfig = SamplerConfig(guidance_scale=4.0, eta=1.0),
        reward: RewardConfig = RewardConfig(),
        objective: PolicyGradientConfig = PolicyGradientConfig(),
        update: UpdateConfig = UpdateConfig(),
        grid: GridConfig = GridConfig(every_n_steps=50),
        seed: int = 0,
    ) -> None:
        super().__init__(sampler=sampler, grid=grid, reward=reward)
        self.lora = as_config(LoRAConfig, lora, "lora")
        self.objective = as_config(PolicyGradientConfig, objective, "objective")
        self.update = as_config(UpdateConfig, update, "update")
        self.save_hyperparameters(ignore=[*GROUPS, *RL_GROUPS])  # this __init__'s other arguments
        self.save_hyperparameters({**self.group_hparams(), **plain({g: getattr(self, g) for g in RL_GROUPS})})
        self.automatic_optimization = False
        if self.sampler.method == "dpmsolver" or (self.sampler.method == "ddim" and self.sampler.eta <= 0):
            raise ValueError(
                "RL needs stochastic rollouts: set sampler.eta > 0 (DPOK: 1.0) or sampler.method='ddpm' "
                f"(sampler.method={self.sampler.method!r}, eta={self.sampler.eta} draws no noise per step)"
            )
        self.generator = DiTGenerator.from_pretrained(generator).eval()
        if self.generator.num_identities != num_identities:
            raise ValueError(
                f"generator export {generator} has {self.generator.num_identities} identities, "
                f"the data has {num_identities}"
            )
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
        self.value = ValueNet(state_dim, num_identities + 1, steps) if self.objective.value_baseline else None
        self.buffer = ReplayBuffer(0 if self.update.on_policy else self.update.buffer_size)
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
            self.reward = self.build_reward(hp.reward_extractor)

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
        s, fraction = self.sampler, self.update.timestep_fraction
        labels = identity_labels.to(self.device).repeat_interleave(self.hparams.samples_per_identity)
        self.generator.eval()
        out = sample(
            self.generator,
            labels,
            seeds=self._seeds(len(labels)),
            num_steps=s.steps,
            guidance_scale=s.guidance_scale,
            eta=s.eta,
            method=s.method,
            record_trajectory=True,
        )
        with torch.no_grad():
            comps = self.rewards(out.images, labels)
        sigmas = step_sigmas(
            out.timesteps, out.prev_timesteps, self.generator.alphas_cumprod, s.eta, s.method
        )
        keep = sigmas > SIGMA_MIN  # the steps that draw noise carry a policy gradient
        mask = keep.unsqueeze(0).expand(len(labels), -1).clone()
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
    def micro_batch_loss(
        self, mb: Transitions, check_ratio: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """KL-regularised policy-gradient loss (+ value loss) of a micro-batch of transitions."""
        obj, s = self.objective, self.sampler
        alphas = self.generator.alphas_cumprod
        step_kwargs = dict(eta=s.eta, method=s.method, reduction=obj.logprob_reduction)
        use_kl = obj.kl_weight > 0 and self.rollout_index >= obj.kl_warmup
        with torch.no_grad(), self.reference() as ref:  # reference first: nothing below is modified after
            eps_ref = (
                guided_eps(ref, mb.state, mb.t, mb.label, guidance_scale=s.guidance_scale) if use_kl else None
            )
        eps = guided_eps(self.generator, mb.state, mb.t, mb.label, guidance_scale=s.guidance_scale)
        step = step_with_logprob(
            eps, mb.state, mb.t, mb.t_prev, alphas, prev_sample=mb.next_state, **step_kwargs
        )
        stats: dict[str, torch.Tensor] = {}
        dev = (step.log_prob.detach() - mb.log_prob).abs().max()
        if check_ratio:
            stats["logp_check"] = dev
            stats["kl_first"] = torch.zeros(()) if eps_ref is None else dpok_kl(eps.detach(), eps_ref).mean()
            if dev > obj.ratio_check_tol:
                raise RuntimeError(
                    f"importance ratio != 1 on the first micro-batch of an update window: max |log p_new - "
                    f"log p_old| = {dev.item():.3g} > objective.ratio_check_tol={obj.ratio_check_tol}. The "
                    "log-prob recompute differs from the rollout (precision, label dropout, or a changed "
                    "model)."
                )
        advantage = mb.reward
        value_loss = torch.zeros((), device=self.device)
        if self.value is not None:
            v = self.value(mb.state, mb.label, mb.step)
            value_loss = (v - mb.reward).pow(2).mean()
            advantage = mb.reward - v.detach()
        pg, ratio_stats = policy_gradient_loss(
            step.log_prob, mb.log_prob, advantage, reward_weight=obj.reward_weight, ratio_clip=obj.ratio_clip
        )
        stats.update(ratio_stats)
        kl = torch.zeros_like(pg)
        if use_kl:
            if obj.kl_form == "dpok":
                kl = dpok_kl(eps, eps_ref)
            else:
                ref_mean = step_with_logprob(
                    eps_ref, mb.state, mb.t, mb.t_prev, alphas, prev_sample=mb.next_state, **step_kwargs
                ).mean
                kl = exact_gaussian_kl(step.mean, ref_mean, step.std)
        loss = (pg + obj.kl_weight * kl).mean() + value_loss
        stats.update(pg_loss=pg.detach().mean(), kl=kl.detach().mean(), value_loss=value_loss.detach())
        return loss, stats

    def training_step(self, batch: dict, batch_idx: int) -> None:
        up = self.update
        opt = self.optimizers()
        transitions, comps = self.rollout(batch["label"])
        self.buffer.push(transitions)
        rng = torch.Generator().manual_seed(self._seeds(1)[0] ^ 0x5EED)
        policy = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("value.")]
        window: dict[str, list[torch.Tensor]] = {}
        for p_step in range(up.policy_steps):
            for m in range(up.grad_accum):
                first = p_step == 0 and m == 0
                mb = self.buffer.sample(up.micro_batch, rng, latest_only=first or up.on_policy).to(
                    self.device
                )
                loss, stats = self.micro_batch_loss(mb, check_ratio=first)
                with opt.toggle_model(sync_grad=m == up.grad_accum - 1):
                    self.manual_backward(loss / up.grad_accum)
                for k, v in stats.items():
                    window.setdefault(k, []).append(v.detach().float())
            grad_norm = torch.nn.utils.clip_grad_norm_(policy, up.grad_clip)
            window.setdefault("grad_norm", []).append(grad_norm.detach().float())
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.rollout_index += 1
        self._log_round(comps, window)
        every = self.grid.every_n_steps
        if every and self.rollout_index % every == 0:
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
