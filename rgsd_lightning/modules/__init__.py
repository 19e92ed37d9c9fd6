"""The stage modules (imported here so the CLI resolves ``--model ColdStartDiT`` by short name)."""

from rgsd_lightning.modules.cold_start import ColdStartDiT
from rgsd_lightning.modules.generate import SyntheticGenerator

__all__ = ["ColdStartDiT", "SyntheticGenerator"]
