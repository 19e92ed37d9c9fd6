"""ReID metrics of an exported recognizer: mAP / Rank-1 overall and per source (camera pair).

A source is a pair of cameras (``VIPeR: [1, 2]`` - camera numbers as in the ``_c<n>`` of the file names);
per source, the queries taken by its cameras are ranked against the gallery images of its cameras only,
under the same Market-1501 protocol as the overall numbers (``rgsd_lightning.evaluation.reid_evaluate``).
Images go through the recognizer's test transform (resize + normalise of its export config), decoded once
per study and reused for every recognizer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rgsd_lightning.backbones import load_embedding_net
from rgsd_lightning.data.images import load_image
from rgsd_lightning.data.records import IdentityRecord
from rgsd_lightning.data.sources import read_market1501
from rgsd_lightning.data.transforms import reid_transform
from rgsd_lightning.evaluation import reid_evaluate


def source_metrics(
    query_features: np.ndarray,
    gallery_features: np.ndarray,
    query: Sequence[IdentityRecord],
    gallery: Sequence[IdentityRecord],
    sources: Mapping[str, Sequence[int]],
) -> dict[str, float]:
    """``mAP``, ``rank1`` overall and ``<source>/mAP``, ``<source>/rank1`` per camera-pair source.

    Args:
        query_features: (Q, D) query features.
        gallery_features: (G, D) gallery features.
        query: the Q query records (identity "0000" never queries; cameras 0-based in the records).
        gallery: the G gallery records ("0000" = distractor).
        sources: source name -> camera numbers (1-based, as in the file names).
    """
    qp = np.array([int(r.identity) for r in query])
    gp = np.array([int(r.identity) for r in gallery])
    qc = np.array([r.camera for r in query])
    gc = np.array([r.camera for r in gallery])
    overall = reid_evaluate(query_features, gallery_features, qp, gp, qc, gc)
    out = {"mAP": float(overall["mAP"]), "rank1": float(overall["rank1"])}
    for name, cams in sources.items():
        zero_based = [int(c) - 1 for c in cams]
        qm, gm = np.isin(qc, zero_based), np.isin(gc, zero_based)
        if not qm.any() or not gm.any():
            raise ValueError(f"source {name!r}: no query or gallery image from cameras {list(cams)}")
        if not _has_valid_query(qp[qm], qc[qm], gp[gm], gc[gm]):
            continue  # nothing to rank in this source: its cells stay empty (n/a)
        res = reid_evaluate(query_features[qm], gallery_features[gm], qp[qm], gp[gm], qc[qm], gc[gm])
        out[f"{name}/mAP"] = float(res["mAP"])
        out[f"{name}/rank1"] = float(res["rank1"])
    return out


def _has_valid_query(qp: np.ndarray, qc: np.ndarray, gp: np.ndarray, gc: np.ndarray) -> bool:
    """True when some query has a gallery image of its identity from another camera."""
    return bool(((qp[:, None] == gp[None, :]) & (qc[:, None] != gc[None, :])).any())


class ReIDEvaluator:
    """Callable: recognizer export folder -> overall and per-source metrics on the target's query/gallery.

    Args:
        root: the Market-layout target dataset.
        sources: source name -> camera numbers (1-based).
        batch_size: images per forward.
    """

    def __init__(self, root: str, sources: Mapping[str, Sequence[int]], batch_size: int = 256) -> None:
        splits = read_market1501(root)
        self.query, self.gallery = splits["query"], splits["gallery"]
        self.sources = dict(sources)
        self.batch_size = batch_size
        self._cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: Any) -> ReIDEvaluator:
        """From a StudyConfig (target path and ``reid_sources``)."""
        return cls(cfg.target.path, cfg.reid_sources)

    def _images(self, config: dict[str, Any]) -> torch.Tensor:
        h, w = (int(s) for s in config["input_size"])
        channels = int(config.get("in_chans", 3))
        key = (h, w, tuple(config["mean"]), tuple(config["std"]), channels)
        if key not in self._cache:
            transform = reid_transform(
                h, w, train=False, mean=config["mean"], std=config["std"], channels=channels
            )
            mode = "L" if channels == 1 else "RGB"
            self._cache[key] = torch.stack(
                [transform(load_image(r.path, mode)) for r in self.query + self.gallery]
            )
        return self._cache[key]

    @torch.no_grad()
    def __call__(self, export: str | os.PathLike) -> dict[str, float]:
        net, config = load_embedding_net(export)
        images = self._images(config)
        feats = torch.cat(
            [net(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        )
        feats = feats.float().numpy()
        nq = len(self.query)
        return source_metrics(feats[:nq], feats[nq:], self.query, self.gallery, self.sources)
