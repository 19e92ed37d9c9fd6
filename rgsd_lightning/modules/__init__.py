"""The stage modules (imported here so the CLI resolves ``--model ColdStartDiT`` by short name)."""

from rgsd_lightning.modules.cold_start import ColdStartDiT
from rgsd_lightning.modules.cosface import CosFaceRecognizer
from rgsd_lightning.modules.generate import SyntheticGenerator
from rgsd_lightning.modules.lookahead_reid import LookaheadReID
from rgsd_lightning.modules.reward_dpok import RewardDPOK

__all__ = ["ColdStartDiT", "CosFaceRecognizer", "LookaheadReID", "RewardDPOK", "SyntheticGenerator"]
