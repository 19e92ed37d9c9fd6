"""Reporting of a privacy audit: the JSON summary (``card.json["audit"]``) and the closest-pairs grid.

The audit itself is :func:`rgsd_lightning.evaluation.privacy.audit_synthetic_set`; dropping the flagged images
is :func:`rgsd_lightning.data.synthetic_set.drop_flagged`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from rgsd_lightning.data.images import load_image
from rgsd_lightning.data.records import IdentityRecord

if TYPE_CHECKING:
    from rgsd_lightning.evaluation.privacy import ImageAudit, NearCopyThresholds
    from rgsd_lightning.evaluation.privacy_search import PixelSpace

GRID_NAME = "audit_pairs.png"
AUDIT_VERSION = 1


# ------------------------------------------------------------------------------------------ summary
def similarity_stats(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Count, mean, std, min, median, 90th/99th percentile and max of similarities (None when empty)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"count": 0}
    q50, q90, q99 = np.quantile(v, [0.5, 0.9, 0.99])
    return {
        "count": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "q50": float(q50),
        "q90": float(q90),
        "q99": float(q99),
        "max": float(v.max()),
    }


def audit_summary(
    images: list[ImageAudit],
    baseline: dict[str, dict[str, np.ndarray]],
    baseline_used: dict[str, str | None],
    bars: dict[str, float | None],
    thresholds: NearCopyThresholds,
    real: list[IdentityRecord],
    real_root: str,
    extractor: Any,
    space: PixelSpace,
) -> dict[str, Any]:
    """The audit summary written under ``card.json["audit"]`` (see the privacy module for the fields)."""
    n = len(images)
    flagged = sum(a.near_copy for a in images)
    by_identity: dict[str, list[ImageAudit]] = {}
    for a in images:
        by_identity.setdefault(a.identity, []).append(a)
    per_identity: dict[str, dict[str, Any]] = {}
    for identity, group in sorted(by_identity.items()):
        pix = [a.sim_pixel for a in group]
        entry: dict[str, Any] = {
            "count": len(group),
            "flagged": sum(a.near_copy for a in group),
            "fraction_flagged": sum(a.near_copy for a in group) / len(group),
            "mean_sim_pixel": float(np.mean(pix)),
            "max_sim_pixel": float(np.max(pix)),
        }
        feats = [a.sim_feature for a in group if a.sim_feature is not None]
        if feats:
            entry.update(mean_sim_feature=float(np.mean(feats)), max_sim_feature=float(np.max(feats)))
        per_identity[identity] = entry
    worst = sorted(per_identity.items(), key=lambda kv: (-kv[1]["fraction_flagged"], -kv[1]["max_sim_pixel"]))
    closest = sorted(images, key=lambda a: -a.sim_pixel)[:10]
    return {
        "version": AUDIT_VERSION,
        "num_images": n,
        "num_flagged": flagged,
        "fraction_flagged": flagged / n,
        "flagged_by": {
            crit: sum(crit in a.reasons for a in images)
            for crit in ("pixel", "pixel_relative", "feature", "feature_relative")
        },
        "thresholds": {
            **{k: _round(v) for k, v in bars.items()},
            "relative_alpha": thresholds.relative_alpha,
            "baseline_quantile": thresholds.baseline_quantile,
            "relative_baseline": baseline_used,
        },
        "pixel_space": {"side": space.side, "blur": space.blur, "max_shift": space.max_shift, "mirror": True},
        "feature_extractor": None if extractor is None else type(extractor).__name__,
        "num_real_images": len(real),
        "num_real_identities": len({r.identity for r in real}),
        "real_root": real_root,
        "baseline": {
            name: {kind: similarity_stats(values) for kind, values in kinds.items()}
            for name, kinds in baseline.items()
        },
        "synthetic_nn": {
            "pixel": similarity_stats([a.sim_pixel for a in images]),
            **(
                {"feature": similarity_stats([a.sim_feature for a in images])}
                if images[0].sim_feature is not None
                else {}
            ),
        },
        "per_identity": per_identity,
        "worst_identities": [
            {"identity": k, "fraction_flagged": v["fraction_flagged"], "max_sim_pixel": v["max_sim_pixel"]}
            for k, v in worst[:10]
        ],
        "closest_pairs": [
            {"synthetic": a.path, "real": a.nn_real_pixel, "sim_pixel": a.sim_pixel, "near_copy": a.near_copy}
            for a in closest
        ],
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


# ------------------------------------------------------------------------------------------ grid
def pair_grid(
    images: list[ImageAudit],
    synthetic: list[IdentityRecord],
    real: list[IdentityRecord],
    nn_pixel: np.ndarray,
    pairs: int,
    cell: int = 64,
    per_row: int = 4,
) -> Image.Image | None:
    """The ``pairs`` closest pairs in pixel space: synthetic left, real right, similarity underneath."""
    order = sorted(range(len(images)), key=lambda j: -images[j].sim_pixel)[: max(0, pairs)]
    if not order:
        return None
    per_row = min(per_row, len(order))
    label_h, gap = 12, 6
    pair_w, pair_h = 2 * cell + 2, cell + label_h
    rows = math.ceil(len(order) / per_row)
    canvas = Image.new("RGB", (per_row * (pair_w + gap) + gap, rows * (pair_h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, j in enumerate(order):
        x0 = gap + (k % per_row) * (pair_w + gap)
        y0 = gap + (k // per_row) * (pair_h + gap)
        syn = load_image(synthetic[j].path, mode="RGB")
        ref = load_image(real[int(nn_pixel[j])].path, mode="RGB")
        if images[j].mirrored_pixel:
            syn = syn.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # shown as it matched
        canvas.paste(_fit(syn, cell), (x0, y0))
        canvas.paste(_fit(ref, cell), (x0 + cell + 2, y0))
        text = f"{images[j].sim_pixel:.3f}" + (" COPY" if images[j].near_copy else "")
        draw.text((x0 + 1, y0 + cell), text, fill=(200, 0, 0) if images[j].near_copy else (0, 0, 0))
    return canvas


def _fit(img: Image.Image, cell: int) -> Image.Image:
    """The image scaled to fit a cell x cell square (aspect kept), centred on grey."""
    scale = cell / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    out = Image.new("RGB", (cell, cell), (128, 128, 128))
    out.paste(img.resize(size, Image.Resampling.BICUBIC), ((cell - size[0]) // 2, (cell - size[1]) // 2))
    return out
