"""ColdStartDiT: stage 1 of the method (paper §4.1, §5.1).

A pretrained class-conditional DiT gets a new label table for the target identities (one shared table
of N + 1 rows, null row copied from the pretrained null row) and is fine-tuned with the denoising loss
on the real images while its backbone stays frozen (``trainable="label_table"``, the paper). The same
module pre-trains a small prior from scratch (``preset=...``, ``trainable="all"``) in the CPU demo.

Training: ε-MSE on the ε channels, labels dropped to null once per sample with ``label_dropout`` (CFG),
AdamW by default (``optimizer``; the label table may have its own ``table_lr``), optional linear warm-up or
any ``lr_scheduler`` (stepped every optimizer step), optional EMA of the trainable parameters (diffusers
``EMAModel``, kept in the Lightning checkpoint). Validation: held-out denoising loss with fixed noise
and a grid real | generated per identity written to ``<log_dir>/samples``. Predict: seeded generation
for (identity, seed) requests, written by ``SyntheticSetWriter``. The export (``ExportArtifact``) is the
generator folder the RL stage and generation load by path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from diffusers.training_utils import EMAModel
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from rgsd_lightning.diffusion import build_dit, drop_labels
from rgsd_lightning.diffusion.schedule import BETA_SCHEDULES, denoising_loss
from rgsd_lightning.modules.config import GridConfig, RewardConfig, SamplerConfig
from rgsd_lightning.modules.generator_base import GROUPS, GeneratorModule
from rgsd_lightning.modules.optim import linear_warmup, resolve, spec, with_lr

ADAMW = spec("torch.optim.AdamW", lr=1e-5, weight_decay=0.0)
"""The default optimizer (paper: 1e-5)."""


def parameter_ema(parameters: list[torch.nn.Parameter], decay: float) -> EMAModel:
    """diffusers ``EMAModel`` of the parameters, decay ``min(decay, (1 + n) / (10 + n))`` at update n.

    ``update_after_step=-1`` makes diffusers' warm-up count from the first update (its default, 0, starts one
    update later with a plain copy: decay 0 at n = 1).
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
    return EMAModel(parameters, decay=decay, update_after_step=-1, use_ema_warmup=False)


class ColdStartDiT(GeneratorModule):
    """Cold-start a class-conditional DiT on the target identities.

    Args:
        num_identities: number of target identities (linked from the datamodule by the CLI).
        pretrained: local folder or hub id of a pretrained DiT (diffusers layout), a generator export, or
            ``builtin:<name>`` (an export shipped in the package, e.g. ``builtin:toy_prior``); None builds
            ``preset`` from scratch with the DiT initialisation.
        vae: VAE for latent mode: "pretrained" (the ``vae/`` of ``pretrained``), a folder / hub id, "tiny", or
            None (pixel mode, or the export's own VAE).
        preset: "tiny", "small", "s2" or "xl2" when ``pretrained`` is None.
        preset_overrides: DiT config keys replacing the preset's.
        init_rows: identity rows of the new table: "null" (copies of the null row), "zero" (paper), "mean".
        trainable: "label_table" (paper: backbone frozen), "adaln", "all", or a list of name patterns.
        image_size: pixel side of the generated images (must equal the datamodule's image_size).
        channels: image channels (must equal the datamodule's).
        label_dropout: probability of replacing a label by null during training (classifier-free guidance).
        beta_schedule: noise schedule of a model built from ``preset``: "linear" (DiT's), "scaled_linear"
            or "squaredcos_cap_v2" (cosine, suited to small pixel models trained from scratch); None = DiT's
            linear one. A pretrained model keeps its own schedule (setting one with ``pretrained`` is an
            error).
        min_snr_gamma: weight each sample's ε-MSE by min(SNR_t, γ)/SNR_t (min-SNR-γ, Hang et al. 2023; 5 is
            usual), so nearly noise-free timesteps do not dominate; None = plain ε-MSE (DiT).
        optimizer: the optimizer (class_path / init_args; default AdamW, lr 1e-5, no weight decay).
        lr: learning rate of the trainable parameters (None: the optimizer's ``lr``).
        table_lr: learning rate of the label table (None: as the other parameters).
        warmup_steps: linear learning-rate warm-up steps when ``lr_scheduler`` is None (0: constant).
        lr_scheduler: a learning-rate schedule stepped every optimizer step (None: ``warmup_steps``).
        ema_decay: EMA decay of the trainable parameters (None: no EMA); EMA weights sample and export.
        sampler: sampler of validation grids and generation (method, steps, guidance_scale, eta).
        grid: validation grids (``identities`` 0 = none, ``samples``, ``seed``); drawn at every validation.
        reward_extractor: recognizer export used to score generated images in ``predict`` (optional).
        reward: the composite reward of that scoring.
    """

    grid_when = "at every validation (trainer.check_val_every_n_epoch / val_check_interval)"

    def __init__(
        self,
        num_identities: int,
        pretrained: str | None = None,
        vae: str | None = None,
        preset: str | None = "small",
        preset_overrides: dict[str, Any] | None = None,
        init_rows: Literal["null", "zero", "mean"] = "null",
        trainable: str | list[str] = "label_table",
        image_size: int = 32,
        channels: int = 3,
        label_dropout: float = 0.1,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] | None = None,
        min_snr_gamma: float | None = None,
        optimizer: OptimizerCallable = ADAMW,
        lr: float | None = None,
        table_lr: float | None = None,
        warmup_steps: int = 0,
        lr_scheduler: LRSchedulerCallable | None = None,
        ema_decay: float | None = None,
        sampler: SamplerConfig = SamplerConfig(),
        grid: GridConfig = GridConfig(),
        reward_extractor: str | None = None,
        reward: RewardConfig = RewardConfig(),
    ) -> None:
        super().__init__(sampler=sampler, grid=grid, reward=reward)
        self.save_hyperparameters(ignore=list(GROUPS))  # this __init__'s other arguments
        self.save_hyperparameters(self.group_hparams())
        if pretrained is not None:
            preset = None
            if beta_schedule is not None:
                raise ValueError(
                    f"beta_schedule={beta_schedule!r} is only for a model built from a preset: "
                    f"pretrained={pretrained!r} keeps the schedule it was trained with"
                )
        if beta_schedule is not None and beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule={beta_schedule!r}: expected one of {list(BETA_SCHEDULES)}")
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 (or null for plain ε-MSE), got {min_snr_gamma}")
        self.generator = build_dit(
            num_identities=num_identities,
            pretrained=pretrained,
            vae=vae,
            preset=preset,
            preset_overrides=preset_overrides,
            label_space="swap",
            init_rows=init_rows,
            trainable=trainable,
            image_size=image_size,
            channels=channels,
            scheduler_config=None if beta_schedule is None else {"beta_schedule": beta_schedule},
        )
        if self.generator.image_size != image_size or self.generator.channels != channels:
            raise ValueError(
                f"the generator makes {self.generator.channels}x{self.generator.image_size}px images but "
                f"image_size={image_size}, channels={channels} were configured"
            )
        self.generator.train()  # trainable part in train mode from the start (the VAE stays in eval)
        self.trainable_names = [n for n, p in self.named_parameters() if p.requires_grad]
        if lr_scheduler is not None and warmup_steps > 0:
            raise ValueError("warmup_steps and lr_scheduler are both set: put the warm-up in lr_scheduler")
        self.optimizer_factory = resolve(optimizer, "optimizer")
        self.scheduler_factory = None if lr_scheduler is None else resolve(lr_scheduler, "lr_scheduler")
        self.ema = parameter_ema(list(self._trainable().values()), ema_decay) if ema_decay else None
        # frozen pretrained weights are reloaded from `pretrained`; weights built from a preset are saved
        self._save_frozen = pretrained is None
        self.strict_loading = False
        self.reward = None

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        self.adopt_identities()
        if stage == "predict":
            self.reward = self.build_reward(self.hparams.reward_extractor)

    def configure_optimizers(self):
        hp = self.hparams
        table = self.generator.label_table.weight
        rest = [p for p in self._trainable().values() if p is not table]
        groups = []
        if table.requires_grad:
            table_group = {"params": [table], "name": "label_table"}
            groups.append(table_group if hp.table_lr is None else {**table_group, "lr": hp.table_lr})
        if rest:
            groups.append({"params": rest, "name": "backbone"})
        optimizer = self.optimizer_factory(with_lr(groups, hp.lr))
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        elif hp.warmup_steps > 0:
            scheduler = linear_warmup(optimizer, hp.warmup_steps)
        else:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ train / val
    def on_fit_start(self) -> None:
        self.adopt_identities()

    def on_train_epoch_start(self) -> None:
        self.generator.train()  # diffusers models load in eval mode; the VAE stays in eval

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = self._to_model_space(batch["image"])
        labels = drop_labels(batch["label"], self.hparams.label_dropout, self.generator.null_label)
        loss = denoising_loss(self.generator, x0, labels, min_snr_gamma=self.hparams.min_snr_gamma)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite denoising loss at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x0))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            params = list(self._trainable().values())
            if self.ema.shadow_params and self.ema.shadow_params[0].device != params[0].device:
                self.ema.to(device=params[0].device)
            self.ema.step(params)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = self._to_model_space(batch["image"])
        rng = torch.Generator(device="cpu").manual_seed(1000 + batch_idx)  # same noise every epoch
        noise = torch.randn(x0.shape, generator=rng).to(x0)
        t = torch.randint(0, self.generator.num_train_timesteps, (len(x0),), generator=rng).to(x0.device)
        with self.sampling_weights():
            loss = denoising_loss(self.generator, x0, batch["label"], noise=noise, timesteps=t)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(x0))
        return loss

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self.grid.identities <= 0:
            return
        self.log_sample_grid("val/samples", int(self.global_step))

    def _to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.generator.encode(images.to(self.generator.dtype))

    # ------------------------------------------------------------------ weights used for sampling
    @contextlib.contextmanager
    def sampling_weights(self) -> Iterator[None]:
        if self.ema is None:
            yield
            return
        params = list(self._trainable().values())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    # ------------------------------------------------------------------ checkpoints: trainable part only
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self._save_frozen:
            keep = set(self.trainable_names)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        if self.ema is not None:
            checkpoint["ema"] = {**self.ema.state_dict(), "names": list(self.trainable_names)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is None or "ema" not in checkpoint:
            return
        state = dict(checkpoint["ema"])
        if "shadow" in state:  # written by the former ParameterEMA: shadows by name, num_updates
            shadow = state.pop("shadow")
            state.update(names=list(shadow), shadow_params=list(shadow.values()))
            state["optimization_step"] = int(state.pop("num_updates"))
        names = state.pop("names", None)
        if names != self.trainable_names:
            raise ValueError(
                "checkpoint EMA does not match this ColdStartDiT's trainable parameters "
                f"({len(names or [])} vs {len(self.trainable_names)}; different trainable setting?)"
            )
        self.ema.load_state_dict(state)
        self.ema.to(device=self.device)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        missing = [n for n in self.trainable_names if n not in state_dict]
        if missing:
            raise ValueError(
                f"checkpoint does not match this ColdStartDiT: trainable parameters missing {missing[:5]} "
                "(different label count or trainable setting?)"
            )
        for name, value in state_dict.items():
            own = dict(self.named_parameters()).get(name)
            if own is not None and own.shape != value.shape:
                raise ValueError(
                    f"checkpoint tensor {name} has shape {tuple(value.shape)}, "
                    f"the model has {tuple(own.shape)} "
                    "(a checkpoint for a different number of identities?)"
                )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def export_provenance(self) -> dict[str, Any]:
        return {"parent": self.hparams.pretrained, "ema": self.ema is not None}
