"""The generator core: DiT loading with one shared label table, noise schedule, our sampler with log-probs,
and a fast deterministic solver (DPM-Solver++) for generation."""

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
from rgsd_lightning.diffusion.solvers import dpmsolver_timesteps, solve

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
    "dpmsolver_timesteps",
    "drop_labels",
    "guided_eps",
    "load_vae",
    "make_timesteps",
    "sample",
    "set_trainable",
    "share_label_table",
    "solve",
    "step_with_logprob",
    "swap_label_space",
    "tie_timestep_embedders",
]
