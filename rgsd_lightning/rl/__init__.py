"""Pieces of the RL stage: replay buffer, LoRA helpers, value baseline, the DPOK objective; the reward curves
(``rl.curves``, matplotlib, imported on use)."""

from rgsd_lightning.rl.buffer import ReplayBuffer, Transitions
from rgsd_lightning.rl.lora import adapters_disabled, inject_lora, lora_parameters, merged_copy
from rgsd_lightning.rl.objective import dpok_kl, exact_gaussian_kl, policy_gradient_loss
from rgsd_lightning.rl.value import ValueNet

__all__ = [
    "ReplayBuffer",
    "Transitions",
    "ValueNet",
    "adapters_disabled",
    "dpok_kl",
    "exact_gaussian_kl",
    "inject_lora",
    "lora_parameters",
    "merged_copy",
    "policy_gradient_loss",
]
