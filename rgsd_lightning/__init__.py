"""rgsd_lightning: reinforcement-guided synthetic identity data on PyTorch Lightning.

Heavy submodules (Lightning, diffusers, timm) are imported on first use, so ``import rgsd_lightning``
stays fast and the CLI starts quickly.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "IdentityDataModule": "rgsd_lightning.data.datamodule",
    "ColdStartDiT": "rgsd_lightning.modules.cold_start",
    "RewardDPOK": "rgsd_lightning.modules.reward_dpok",
    "LookaheadReID": "rgsd_lightning.modules.lookahead_reid",
    "CosFaceRecognizer": "rgsd_lightning.modules.cosface",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rgsd_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
