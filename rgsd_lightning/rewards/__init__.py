"""The three-part reward of the paper (§4.2): pure functions, the memory bank and torchmetrics-style objects.

``functional`` holds Eqs. 2-11 as per-sample tensor functions (entry point ``functional.composite_reward``);
``MemoryBank`` stores the per-identity reference features; the reward objects wrap both for RL and logging.
"""

from rgsd_lightning.rewards import functional
from rgsd_lightning.rewards.memory_bank import MemoryBank
from rgsd_lightning.rewards.metrics import (
    CompositeReward,
    CoverageReward,
    ExpansionReward,
    SemanticConsistencyReward,
)

__all__ = [
    "CompositeReward",
    "CoverageReward",
    "ExpansionReward",
    "MemoryBank",
    "SemanticConsistencyReward",
    "functional",
]
