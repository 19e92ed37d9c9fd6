"""SyntheticGenerator: generation from a generator export (``rgsd predict``).

Loads an export written by ColdStartDiT or RewardDPOK (``label_space="keep"``: its identities must equal
the datamodule's, never silently re-initialised) and generates the datamodule's (identity, seed)
requests; ``SyntheticSetWriter`` writes the synthetic set. With ``reward_extractor`` every image's reward
components are computed and recorded in the manifest.
"""

from __future__ import annotations

from typing import Any, Literal

from rgsd_lightning.diffusion import DiTGenerator
from rgsd_lightning.diffusion.generator import check_identities_match
from rgsd_lightning.diffusion.sampling import check_eta
from rgsd_lightning.modules.generator_base import GeneratorModule


class SyntheticGenerator(GeneratorModule):
    """Generate a synthetic identity set from a generator export.

    Args:
        num_identities: number of identities (linked from the datamodule; must equal the export's).
        export: the generator export folder (``…/export/generator``).
        sampler: "ddim" or "ddpm".
        sample_steps: sampling steps.
        guidance_scale: classifier-free guidance scale w (1 = no guidance).
        eta: DDIM η (0 deterministic, 1 ancestral).
        reward_extractor: recognizer export used to score every generated image (optional).
        reward_lambdas: λ_sem, λ_cov, λ_exp of the recorded total reward.
        grid_identities: identities in the sample grid written at the end of generation (0 = none).
        grid_samples: images per identity in that grid.
        grid_seed: seed of the grid samples.
    """

    def __init__(
        self,
        num_identities: int,
        export: str,
        sampler: Literal["ddim", "ddpm"] = "ddim",
        sample_steps: int = 50,
        guidance_scale: float = 2.0,
        eta: float = 0.0,
        reward_extractor: str | None = None,
        reward_lambdas: tuple[float, float, float] = (1.0, 0.75, 0.25),
        grid_identities: int = 0,
        grid_samples: int = 4,
        grid_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_eta(eta)
        self.generator = DiTGenerator.from_pretrained(export).requires_grad_(False).eval()
        if self.generator.num_identities != num_identities:
            raise ValueError(
                f"export {export} has {self.generator.num_identities} identities, "
                f"the data has {num_identities}"
            )
        self.reward = None

    def setup(self, stage: str) -> None:
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "identities"):  # the export's names must equal the data's
            check_identities_match(self.generator.identities, list(dm.identities), self.hparams.export)
        self.adopt_identities()
        if stage == "predict":
            self.reward = self.build_reward(
                self.hparams.reward_extractor, lambdas=tuple(self.hparams.reward_lambdas)
            )

    def on_predict_end(self) -> None:
        if self.hparams.grid_identities > 0:
            self.log_sample_grid("predict/samples", 0)

    def export_provenance(self) -> dict[str, Any]:
        return {"parent": self.hparams.export}
