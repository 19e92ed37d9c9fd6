"""Report figures: real | synthetic sample grids (paper Figure 2) and the feature-space plot (Figure 4)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rgsd_lightning.data.records import IdentityRecord, by_identity  # noqa: E402
from rgsd_lightning.evaluation.quality import embed, load_images  # noqa: E402
from rgsd_lightning.io import image_grid, save_figure, save_png, to_uint8  # noqa: E402


def comparison_grid(
    real: Sequence[IdentityRecord],
    sets: Sequence[Sequence[IdentityRecord]],
    identities: Sequence[str],
    path: str | os.PathLike,
    *,
    per_cell: int = 3,
    size: int = 32,
    channels: int = 3,
) -> Path:
    """Rows = identities; columns = ``per_cell`` real images, then ``per_cell`` from each synthetic set."""
    groups = [by_identity(real)] + [by_identity(s) for s in sets]
    blank = -torch.ones(channels, size, size)
    rows = []
    for identity in identities:
        row: list[torch.Tensor] = []
        for group in groups:
            images = list(load_images(group.get(identity, [])[:per_cell], size, channels))
            row += images + [blank] * (per_cell - len(images))
        rows.append(row)
    path = Path(path)
    save_png(to_uint8(image_grid(rows, pad=2).unsqueeze(0))[0], path)
    return path


def feature_plot(
    extractor: torch.nn.Module,
    groups: dict[str, Sequence[IdentityRecord]],
    identities: Sequence[str],
    path: str | os.PathLike,
    *,
    size: int = 32,
    channels: int = 3,
) -> Path:
    """2-D PCA of real and synthetic features per identity (the paper's Figure 4; colour = identity,
    marker = source; the first group is drawn as the reference)."""
    markers = ["o", "s", "^", "D", "v"]
    keep = set(identities)
    feats, meta = [], []
    for gi, (name, records) in enumerate(groups.items()):
        recs = [r for r in records if r.identity in keep]
        if recs:
            feats.append(embed(extractor, load_images(recs, size, channels)))
            meta += [(gi, name, r.identity) for r in recs]
    if not feats:
        raise ValueError(f"feature plot: no images of the identities {list(identities)}")
    x = np.concatenate(feats)
    x = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for gi in range(len(groups)):
        for ci, identity in enumerate(identities):
            idx = [i for i, (g, _, ident) in enumerate(meta) if g == gi and ident == identity]
            if idx:
                ax.scatter(
                    xy[idx, 0],
                    xy[idx, 1],
                    s=26 if gi == 0 else 18,
                    marker=markers[gi % len(markers)],
                    color=colours(ci % 10),
                    alpha=0.85 if gi == 0 else 0.6,
                    edgecolors="k" if gi == 0 else "none",
                    linewidths=0.4,
                )
    for gi, name in enumerate(groups):
        ax.scatter([], [], marker=markers[gi % len(markers)], color="grey", label=name)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("recognizer features, PCA (colour = identity)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
