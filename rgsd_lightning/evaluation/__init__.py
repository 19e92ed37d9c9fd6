"""Evaluation protocols: ReID mAP/CMC (Market-1501 protocol) and face verification (insightface 10-fold)."""

from rgsd_lightning.evaluation.reid import ReIDMetric, reid_evaluate, reid_evaluate_sources, reid_map_cmc
from rgsd_lightning.evaluation.verification import (
    VerificationMetric,
    VerificationResult,
    flip_fuse,
    group_report,
    verification_accuracy,
)

__all__ = [
    "ReIDMetric",
    "VerificationMetric",
    "VerificationResult",
    "flip_fuse",
    "group_report",
    "reid_evaluate",
    "reid_evaluate_sources",
    "reid_map_cmc",
    "verification_accuracy",
]
