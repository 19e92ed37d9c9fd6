"""What ColdStartDiT, RewardDPOK and SyntheticGenerator share: generation (``predict``), sample grids,
scoring, export.

The base holds the three shared config groups (``sampler``, ``grid``, ``reward``; see
:mod:`rgsd_lightning.modules.config`), given by the subclass to ``super().__init__``. Subclasses own a
``DiTGenerator`` in ``self.generator``, save their own hyper-parameters (the groups as plain dicts, from
:meth:`group_hparams`), override :meth:`sampling_weights` when the weights used for generation differ from
the training weights (EMA), and :meth:`export_provenance` to describe themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from rgsd_lightning.backbones import FeatureExtractor
from rgsd_lightning.data.images import load_image
from rgsd_lightning.diffusion import DiTGenerator, sample
from rgsd_lightning.io import image_grid, log_grid, run_dir
from rgsd_lightning.modules.config import GridConfig, RewardConfig, SamplerConfig, as_config, plain
from rgsd_lightning.provenance import provenance, tensor_fingerprint
from rgsd_lightning.rewards import CompositeReward, MemoryBank

GROUPS = ("sampler", "grid", "reward")
"""The constructor arguments of every generator stage that are config groups (saved as plain dicts)."""


@dataclass(frozen=True)
class StartImages:
    """What generation starts from (:meth:`GeneratorModule.start_images`): images (B, C, H, W) in [-1, 1]
    and the strength of :func:`~rgsd_lightning.diffusion.sample` (None, 1: pure noise), with the settings
    recorded with every image of the batch (``meta``) and per image (``per_image``: field -> B values)."""

    images: torch.Tensor | None = None
    strength: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)
    per_image: dict[str, list[Any]] = field(default_factory=dict)


class GeneratorModule(L.LightningModule):
    """Base of the generator stages.

    Args:
        sampler: sampler of generation and sample grids (a :class:`SamplerConfig` or a mapping of its fields).
        grid: sample grids.
        reward: the composite reward used when scoring generated images (and in RL).
    """

    export_name = "generator"
    generator: DiTGenerator
    grid_when: str | None = None
    """When the stage draws its sample grids; None: every ``grid.every_n_steps`` training steps."""

    def __init__(
        self,
        sampler: SamplerConfig | dict[str, Any],
        grid: GridConfig | dict[str, Any],
        reward: RewardConfig | dict[str, Any],
    ) -> None:
        super().__init__()
        self.sampler = as_config(SamplerConfig, sampler, "sampler")
        self.grid = as_config(GridConfig, grid, "grid")
        self.reward_config = as_config(RewardConfig, reward, "reward")
        if self.grid_when is not None and self.grid.every_n_steps:
            raise ValueError(
                f"{type(self).__name__} draws its grid {self.grid_when}: grid.every_n_steps is only used by "
                "RewardDPOK"
            )

    def group_hparams(self) -> dict[str, Any]:
        """The config groups as plain dicts, for ``save_hyperparameters`` (see :mod:`..config`)."""
        return plain({"sampler": self.sampler, "grid": self.grid, "reward": self.reward_config})

    # ------------------------------------------------------------------ data facts
    def _datamodule(self):
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def adopt_identities(self) -> None:
        """Take the identity names from the datamodule (labels.json of exports) and check the geometry."""
        dm = self._datamodule()
        if dm is None or not hasattr(dm, "identities"):
            return
        if len(dm.identities) != self.generator.num_identities:
            raise ValueError(
                f"the generator has {self.generator.num_identities} identity labels, the data has "
                f"{len(dm.identities)}: rebuild the model with num_identities={len(dm.identities)}"
            )
        hp = getattr(dm, "hparams", {})
        size, channels = hp.get("image_size"), hp.get("channels")
        if size is not None and int(size) != self.generator.image_size:
            raise ValueError(
                f"data.image_size={size} but the generator makes {self.generator.image_size}px images"
            )
        if channels is not None and int(channels) != self.generator.channels:
            raise ValueError(
                f"data.channels={channels} but the generator makes {self.generator.channels}-channel images"
            )
        self.generator.identities = list(dm.identities)

    # ------------------------------------------------------------------ sampling
    @contextlib.contextmanager
    def sampling_weights(self) -> Iterator[None]:
        """The weights generation uses (default: the current ones)."""
        yield

    @property
    def clip_x0(self) -> bool:
        """Whether sampling clips x0 to [-1, 1] (``sampler.clip_x0``; None: in pixel mode only)."""
        return self.sampler.clips(latent=self.generator.vae is not None)

    def sampler_settings(self) -> dict[str, Any]:
        """Sampler settings recorded with every generated image."""
        return self.sampler.record(latent=self.generator.vae is not None)

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor,
        seeds: list[int],
        init: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] for the labels, one seeded image per request; with ``init`` (B, C,
        H, W) images in [-1, 1], each sample starts from its noised image (``strength``, SDEdit)."""
        s = self.sampler
        was_training = self.generator.training
        self.generator.eval()
        try:
            with self.sampling_weights():
                out = sample(
                    self.generator,
                    labels.to(self.device),
                    seeds=seeds,
                    num_steps=s.steps,
                    guidance_scale=s.guidance_scale,
                    eta=s.eta,
                    method=s.method,
                    clip_x0=self.clip_x0,
                    init=None if init is None else self.generator.encode(init.to(self.device)),
                    strength=strength,
                )
        finally:
            self.generator.train(was_training)
        return out.images

    # ------------------------------------------------------------------ scoring (optional)
    def set_reward_extractor(self, extractor: torch.nn.Module) -> None:
        """Use this module (images in [-1, 1] -> features) instead of the ``reward_extractor`` export."""
        self.reward_extractor = extractor.eval().requires_grad_(False)

    def build_reward(self, extractor_dir: str | None) -> CompositeReward | None:
        """The ``reward`` config's CompositeReward with a memory bank of the real training images' features
        (built on every rank), or None without an extractor."""
        extractor = getattr(self, "reward_extractor", None)
        if extractor is None:
            if extractor_dir is None:
                return None
            extractor = FeatureExtractor.from_export(extractor_dir)
            self.reward_extractor = extractor
        dm = self._datamodule()
        if dm is None or not hasattr(dm, "reference_dataloader"):
            raise RuntimeError("scoring needs an IdentityDataModule to build the reward memory bank from")
        extractor.to(self.device)
        bank = MemoryBank.from_extractor(
            extractor, dm.reference_dataloader(), dm.num_identities, device=self.device
        )
        return CompositeReward(bank, **self.reward_config.kwargs()).to(self.device)

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Per-sample reward components of generated images, or None without a reward model."""
        reward = getattr(self, "reward", None)
        if reward is None:
            return None
        with torch.no_grad():
            feats = self.reward_extractor(images)
            return {k: v.detach().cpu() for k, v in reward.components(feats, labels.to(feats.device)).items()}

    # ------------------------------------------------------------------ predict
    def on_predict_start(self) -> None:
        self.adopt_identities()
        with self.sampling_weights():
            self._fingerprint = tensor_fingerprint(self.generator.transformer.state_dict().items())

    def start_images(self, identities: list[str], seeds: list[int]) -> StartImages | None:
        """Start images of the requests; None (the default): pure noise."""
        return None

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        labels = batch["label"]
        identities, seeds = list(batch["identity"]), [int(s) for s in batch["seed"]]
        start = self.start_images(identities, seeds) or StartImages()
        images = self.generate(labels, seeds, init=start.images, strength=start.strength)
        meta = dict(
            self.sampler_settings(),
            generator=getattr(self, "_fingerprint", None),
            stage=type(self).__name__,
            **start.meta,
        )
        return {
            "images": images.cpu(),
            "identity": identities,
            "seed": batch["seed"],
            "request": batch["request"],
            "rewards": self.score(images, labels),
            "meta": meta,
            "per_image": start.per_image,
        }

    def card_info(self) -> dict[str, Any]:
        """Generator facts for the synthetic set's card.json."""
        return {
            "generator": {
                "stage": type(self).__name__,
                "fingerprint": getattr(self, "_fingerprint", None),
                "source": self.export_provenance().get("parent"),
            },
            "sampler": self.sampler_settings(),
            "image_size": self.generator.image_size,
            "channels": self.generator.channels,
        }

    # ------------------------------------------------------------------ export
    def export_provenance(self) -> dict[str, Any]:
        """The stage's parent artifact and config for provenance.json (subclasses extend)."""
        return {"parent": None}

    def export(self, directory: str | Path) -> Path:
        """Write the generator export (DESIGN §3) with the sampling weights."""
        info = self.export_provenance()
        record = provenance(
            type(self).__name__,
            parent=info.pop("parent"),
            config=_plain(dict(self.hparams)),
            global_step=int(self.global_step),
            **info,
        )
        with self.sampling_weights():
            return self.generator.save_pretrained(directory, provenance=record)

    # ------------------------------------------------------------------ grids
    def real_images(self, identity: str, n: int) -> list[torch.Tensor]:
        """Up to n real training images of an identity, as the generator sees them."""
        dm = self._datamodule()
        if dm is None:
            return []
        transform = dm.generator_transform(train=False)
        records = [r for r in dm.split_records("train") if r.identity == identity][:n]
        return [transform(load_image(r.path, dm.mode)) for r in records]

    def log_sample_grid(self, tag: str, step: int) -> Path | None:
        """Grid with one row per identity: real images | samples with fixed seeds (rank 0 only)."""
        if self._trainer is None:
            return None
        directory = run_dir(self.trainer)  # every rank: log_dir is a collective under DDP
        if not self.trainer.is_global_zero:
            return None
        grid = self.grid
        names = self.generator.identities[: grid.identities]
        labels = torch.arange(len(names)).repeat_interleave(grid.samples)
        seeds = [grid.seed * 1000 + i for i in range(grid.samples)] * len(names)
        fakes = self.generate(labels, seeds).cpu()
        rows = []
        for i, name in enumerate(names):
            real = self.real_images(name, grid.samples)
            rows.append(list(real) + list(fakes[i * grid.samples : (i + 1) * grid.samples]))
        return log_grid(self.trainer, image_grid(rows), tag, step, directory)


def _plain(value: Any) -> Any:
    """hparams -> JSON-friendly values (paths and callables become strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)
