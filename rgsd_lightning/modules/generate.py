"""SyntheticGenerator: generation from a generator export (``rgsd predict``).

Loads an export written by ColdStartDiT or RewardDPOK (``label_space="keep"``: its identities must equal
the datamodule's, never silently re-initialised) and generates the datamodule's (identity, seed)
requests; ``SyntheticSetWriter`` writes the synthetic set. With ``reward_extractor`` every image's reward
components are computed and recorded in the manifest.
"""

from __future__ import annotations

from typing import Any

from rgsd_lightning.data.init_pool import InitPool
from rgsd_lightning.data.records import by_identity
from rgsd_lightning.diffusion.generator import DiTGenerator, check_identities_match
from rgsd_lightning.modules.config import (
    GridConfig,
    InitImagesConfig,
    RewardConfig,
    SamplerConfig,
    as_config,
    plain,
)
from rgsd_lightning.modules.generator_base import GROUPS, GeneratorModule, StartImages


class SyntheticGenerator(GeneratorModule):
    """Generate a synthetic identity set from a generator export.

    Args:
        num_identities: number of identities (linked from the datamodule; must equal the export's).
        export: the generator export folder (``…/export/generator``).
        sampler: the sampler (``method``, ``steps``, ``guidance_scale``, ``eta``), recorded with every image;
            default DPM-Solver++ with 20 steps (DiTPipeline-default quality up to w=4 on the toy model,
            ``benchmarks/results/fast_sampling*.md``).
        reward_extractor: recognizer export used to score every generated image (optional).
        reward: the composite reward recorded per image (its ``lambdas`` weight the recorded total).
        grid: the sample grid written after generation (``identities`` 0 = none, ``samples``, ``seed``).
        init_images: start every sample from a noised image of a pool (SDEdit) instead of pure noise:
            ``root`` (e.g. the prior corpus) or ``own`` (each identity's own real training images, the
            datamodule's), ``exclude``, ``strength``, ``seed``; each image's start image is recorded in the
            manifest (``init_image``). Neither (the default): pure noise.
        compile: ``torch.compile`` the transformer before generating (in place, weights and exports
            unchanged). Off by default: on 2 CPU cores it took ~3 min to compile the toy model for a
            ~1.3x faster forward (``benchmarks/results/fast_sampling.md``), a loss below several thousand
            toy images; worth trying for large sets on a GPU.
    """

    grid_when = "once, after generation"

    def __init__(
        self,
        num_identities: int,
        export: str,
        sampler: SamplerConfig = SamplerConfig(method="dpmsolver", steps=20),
        reward_extractor: str | None = None,
        reward: RewardConfig = RewardConfig(),
        grid: GridConfig = GridConfig(identities=0),
        compile: bool = False,
        init_images: InitImagesConfig = InitImagesConfig(),
    ) -> None:
        super().__init__(sampler=sampler, grid=grid, reward=reward)
        self.init_images = as_config(InitImagesConfig, init_images, "init_images")
        self.save_hyperparameters(ignore=[*GROUPS, "init_images"])  # this __init__'s other arguments
        self.save_hyperparameters({**self.group_hparams(), "init_images": plain(self.init_images)})
        self.generator = DiTGenerator.from_pretrained(export).requires_grad_(False).eval()
        if self.generator.num_identities != num_identities:
            raise ValueError(
                f"export {export} has {self.generator.num_identities} identities, "
                f"the data has {num_identities}"
            )
        self.reward = None
        self.init_pool: InitPool | None = None

    def setup(self, stage: str) -> None:
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "identities"):  # the export's names must equal the data's
            check_identities_match(self.generator.identities, list(dm.identities), self.hparams.export)
        self.adopt_identities()
        if stage == "predict":
            self.reward = self.build_reward(self.hparams.reward_extractor)
            if self.hparams.compile:
                self.generator.transformer.compile()
            if self.init_images.enabled and self.init_pool is None:
                self.init_pool = self._build_init_pool(dm)

    def _build_init_pool(self, dm: Any) -> InitPool:
        cfg = self.init_images
        hp = getattr(dm, "hparams", {})
        kwargs = dict(
            exclude=cfg.exclude,
            image_size=self.generator.image_size,
            channels=self.generator.channels,
            square=hp.get("square", "stretch"),
            seed=cfg.seed,
        )
        if not cfg.own:
            return InitPool(cfg.root, **kwargs)
        records = getattr(dm, "train_records", None)
        if not records:
            raise ValueError("init_images.own needs a datamodule with real training images (train_records)")
        paths = {name: [r.path for r in group] for name, group in by_identity(records).items()}
        return InitPool.own(paths, **kwargs)

    def start_images(self, identities: list[str], seeds: list[int]) -> StartImages | None:
        """The requests' start images from the ``init_images`` pool (None without one)."""
        if self.init_pool is None:
            return None
        images, paths = self.init_pool.images(identities, seeds)
        strength = self.init_images.strength
        meta = {"init_strength": strength, "init_root": self.init_images.root}
        if self.init_images.own:
            meta["init_own"] = True
        return StartImages(images, strength, meta, {"init_image": paths})

    def on_predict_end(self) -> None:
        if self.grid.identities > 0:
            self.log_sample_grid("predict/samples", 0)

    def card_info(self) -> dict[str, Any]:
        info = super().card_info()
        if self.init_pool is not None:
            info["init_images"] = dict(plain(self.init_images), pool_size=len(self.init_pool))
        return info

    def export_provenance(self) -> dict[str, Any]:
        return {"parent": self.hparams.export}
