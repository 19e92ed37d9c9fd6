"""The generator core: DiT loading with one shared label table, noise schedule, our sampler with log-probs."""

from rgsd_lightning.diffusion.dit import (
    PRESETS,
    build_dit,
    dit_initialize_,
    drop_labels,
    set_trainable,
    swap_label_space,
    tie_timestep_embedders,
)
from rgsd_lightning.diffusion.generator import (
    DiTGenerator,
    check_identities_match,
    load_vae,
    share_label_table,
)
from rgsd_lightning.diffusion.sampling import (
    SampleOutput,
    StepOutput,
    guided_eps,
    sample,
    step_with_logprob,
)
from rgsd_lightning.diffusion.schedule import (
    DEFAULT_SCHEDULER_CONFIG,
    add_noise,
    alphas_cumprod,
    denoising_loss,
    make_timesteps,
)

__all__ = [
    "DEFAULT_SCHEDULER_CONFIG",
    "PRESETS",
    "DiTGenerator",
    "SampleOutput",
    "StepOutput",
    "add_noise",
    "alphas_cumprod",
    "build_dit",
    "check_identities_match",
    "denoising_loss",
    "dit_initialize_",
    "drop_labels",
    "guided_eps",
    "load_vae",
    "make_timesteps",
    "sample",
    "set_trainable",
    "share_label_table",
    "step_with_logprob",
    "swap_label_space",
    "tie_timestep_embedders",
]
