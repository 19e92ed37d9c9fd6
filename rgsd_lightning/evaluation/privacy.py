"""Memorisation audit of a synthetic identity set against the real training images.

A synthetic set is only worth sharing if it does not hand out the real, privacy-restricted images it was
trained on. Diffusion models can reproduce training images (Carlini et al. 2023, "Extracting training data
from diffusion models"; Somepalli et al. 2023, "Diffusion art or digital forgery?"), and small datasets with
few images per identity are where that is most likely. This module finds, for every synthetic image, its
nearest real training image and decides whether it is a *near copy*.

Two spaces
----------
* **Pixel descriptor** (always; :class:`PixelSpace`). The image is converted to grayscale, resized
  (antialiased) to ``2s x 2s``, blurred with a Gaussian of sigma one descriptor cell, average-pooled to
  ``s x s`` (``s = 16``), then made zero-mean and unit-norm. The blur and the coarse grid make it tolerant
  to noise, re-encoding and sub-cell shifts; removing mean and norm makes it tolerant to brightness and
  contrast changes; grayscale makes it tolerant to colour casts. The similarity of a synthetic image to a
  real one is the largest inner product between the real descriptor and the synthetic descriptor taken
  as is, shifted by up to ``max_shift = 1`` cell (1/16 of the image) in x and y, and mirrored
  (18 variants, each renormalised): a shifted or mirrored copy is a copy. Candidates come from an exact
  search with the plain and mirrored descriptors (``shortlist`` per query), re-scored with all variants.
  A flat image has the zero descriptor (similarity 0 with everything).
* **Recognizer features** (optional): an exported recognizer (``FeatureExtractor``) maps images to
  L2-normalised embeddings; similarity is their cosine, maximised over mirroring the synthetic image.

Nearest neighbours are exact inner-product searches (faiss ``IndexFlatIP`` on float32 vectors). Images are
decoded in batches and only their small descriptors / embeddings are kept, so sets of tens of thousands of
images run on a CPU in bounded memory.

Real-vs-real baseline
---------------------
For every real training image: the similarity to its nearest *other* real image of the same identity, and
(on a sample of ``baseline_sample`` images) to its nearest other real image of any identity. This is the
distribution a synthetic set should be compared with: a generator that draws genuinely new images of an
identity produces nearest-real similarities like those of the real images among themselves; a memorising
generator produces similarities far above them. Baseline similarities use the same shifts and mirroring.

Near-copy decision (each criterion can be switched off with ``None``; a flag from any one is a near copy)
--------------------------------------------------------------------------------------------------------
* **Absolute pixel threshold** ``pixel = 0.95``: ``sim_pixel >= 0.95``. Carlini et al. judge copies by an
  l2 distance in normalised pixel space. For unit-norm descriptors ``||a - b||^2 = 2 (1 - sim)``, so
  ``sim >= 0.95`` means the residual between the two images has at most ~0.32 of the image's own
  contrast (after blur and normalisation): visibly the same picture, with at most light noise, a small
  shift or a re-encoding between them. Different images of the same scene rarely get there.
* **Relative criterion** ``relative_alpha = 0.5``, ``baseline_quantile = 0.99`` (applied in each space).
  Carlini et al. found a fixed pixel distance misleading on its own: some images simply have many close
  neighbours. In their CIFAR-10 study they divide the distance to the closest training image by ``alpha``
  (0.5) times the mean distance to the 50 closest training images, and call a generation extracted when
  that ratio is small: it is far closer to one training image than to the others around it. We use the
  same ratio idea with the real-vs-real baseline as the reference: let ``s_q`` be the
  ``baseline_quantile`` of the same-identity baseline similarities and ``d_q = sqrt(2 (1 - s_q))`` the
  matching distance; a synthetic image is flagged when its distance to its nearest real image is below
  ``alpha * d_q``, i.e. ``sim >= 1 - alpha^2 (1 - s_q)``. It is at least twice as close to a real image as
  (almost) any real image is to its closest sibling of the same identity. This adapts to the data: on video
  crops whose consecutive frames are near-duplicates the bar rises towards 1, on varied photos it falls.
  The baseline falls back to the any-identity one when no identity has two real images.
* **Absolute feature threshold** ``feature = None`` (off by default). Somepalli et al. detect replicas
  with SSCD, a *copy-detection* descriptor, and treat a similarity above about 0.5 as a replica (0.5 - 0.6
  in their analysis). That level is calibrated for copy-detection features only: a recognizer is trained
  to map *all* images of a person close together, so genuine new images of an identity routinely exceed
  0.5. Set ``feature=0.5`` when the extractor is an SSCD-type copy detector; with a recognizer rely on the
  relative criterion, which measures closeness against the recognizer's own same-identity spread.

What the numbers do not guarantee: a set with no flagged image is not proven private. The audit compares
whole images with the training images given to it; it does not detect partial copies (a copied face on a
new background), copies of images outside the given real set, attribute leakage or membership inference.
With the relative criterion, a perfect generator whose samples are distributed like the real images is
still flagged on a small fraction (well under ``1 - baseline_quantile``) of its samples.

Outputs: every manifest row gains ``nn_real_pixel``, ``sim_pixel``, ``nn_real_feature``, ``sim_feature``
and ``near_copy`` (paths of real images relative to the real images' common folder); ``card.json`` gains an
``"audit"`` summary; ``audit_pairs.png`` shows the closest synthetic/real pairs. Everything is computed
first and written at the end, each file atomically; images are only ever read.

Layout: the pixel space and the nearest-neighbour search are in ``privacy_search``, the summary and the pair
grid in ``privacy_report``; the per-row fields (``AUDIT_FIELDS``) and dropping flagged images
(``drop_flagged``) belong to the set format, :mod:`rgsd_lightning.data.synthetic_set`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rgsd_lightning.data import synthetic_set
from rgsd_lightning.data.images import BadImageError
from rgsd_lightning.data.records import IdentityRecord, read_manifest, write_manifest
from rgsd_lightning.evaluation.privacy_report import GRID_NAME, audit_summary, pair_grid
from rgsd_lightning.evaluation.privacy_search import (
    AuditEmbedder,
    PixelSpace,
    SimilaritySpace,
    extractor_device,
    resolve_extractor,
)
from rgsd_lightning.io import save_png

if TYPE_CHECKING:
    import torch

    from rgsd_lightning.backbones import FeatureExtractor

__all__ = [
    "AuditResult",
    "ImageAudit",
    "NearCopyThresholds",
    "audit_synthetic_set",
    "relative_threshold",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ thresholds
@dataclass(frozen=True)
class NearCopyThresholds:
    """When a synthetic image counts as a near copy of a real one (see the module docstring).

    Attributes:
        pixel: absolute pixel-descriptor similarity at or above which an image is flagged; None = off.
        feature: absolute feature-space similarity at or above which an image is flagged; None = off
            (use ~0.5 only with a copy-detection extractor such as SSCD).
        relative_alpha: relative criterion, in every available space: flagged when the distance to the
            nearest real image is below ``relative_alpha`` times the baseline distance at
            ``baseline_quantile``; smaller = stricter; None = off.
        baseline_quantile: quantile of the real-vs-real same-identity similarities used as the reference.
    """

    pixel: float | None = 0.95
    feature: float | None = None
    relative_alpha: float | None = 0.5
    baseline_quantile: float = 0.99

    def __post_init__(self) -> None:
        for name in ("pixel", "feature"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise ValueError(f"threshold {name!r} is a cosine similarity in [-1, 1], got {value}")
        if self.relative_alpha is not None and not 0.0 < self.relative_alpha <= 1.0:
            raise ValueError(f"relative_alpha must be in (0, 1], got {self.relative_alpha}")
        if not 0.0 <= self.baseline_quantile <= 1.0:
            raise ValueError(f"baseline_quantile must be in [0, 1], got {self.baseline_quantile}")


def relative_threshold(baseline: np.ndarray, quantile: float, alpha: float) -> float | None:
    """Similarity bar of the relative criterion: ``1 - alpha^2 (1 - s_q)``, ``s_q`` the baseline quantile.

    Equivalent to "distance below ``alpha`` times the baseline distance at that quantile" for unit
    vectors (``d^2 = 2 (1 - s)``). None when the baseline is empty.
    """
    values = np.asarray(baseline, dtype=np.float64)
    if values.size == 0:
        return None
    s_q = float(np.quantile(values, quantile))
    return 1.0 - alpha**2 * (1.0 - min(s_q, 1.0))


# ------------------------------------------------------------------------------------------ results
@dataclass
class ImageAudit:
    """The audit of one synthetic image.

    Attributes:
        path: the image path as stored in the manifest (relative to the synthetic set).
        identity: the synthetic image's identity.
        nn_real_pixel: nearest real image in the pixel space (relative to the real images' common folder).
        sim_pixel: its pixel-descriptor similarity (max over mirroring).
        mirrored_pixel: True when the best pixel match was the mirrored synthetic image.
        nn_real_feature: nearest real image in the feature space (None without an extractor).
        sim_feature: its feature similarity (None without an extractor).
        near_copy: flagged by at least one criterion.
        reasons: the criteria that flagged it ("pixel", "pixel_relative", "feature", "feature_relative").
    """

    path: str
    identity: str
    nn_real_pixel: str
    sim_pixel: float
    mirrored_pixel: bool
    nn_real_feature: str | None = None
    sim_feature: float | None = None
    near_copy: bool = False
    reasons: tuple[str, ...] = ()

    def manifest_fields(self) -> dict[str, Any]:
        """The fields the audit adds to this image's manifest row."""
        return {
            "nn_real_pixel": self.nn_real_pixel,
            "sim_pixel": round(self.sim_pixel, 6),
            "nn_real_feature": self.nn_real_feature,
            "sim_feature": None if self.sim_feature is None else round(self.sim_feature, 6),
            "near_copy": self.near_copy,
        }


@dataclass
class AuditResult:
    """What :func:`audit_synthetic_set` found.

    Attributes:
        synthetic_dir: the audited set.
        images: one entry per manifest row, in manifest order.
        summary: the JSON summary written under ``card.json["audit"]``.
        baseline: real-vs-real nearest-neighbour similarities per space (``"pixel"``, ``"feature"``) and kind
            (``"same_identity"``, ``"any_identity"``), as arrays.
        thresholds: the similarity bars actually applied (absolute and relative, per space).
        grid: the pair grid written (None when none was asked for or written).
    """

    synthetic_dir: Path
    images: list[ImageAudit]
    summary: dict[str, Any]
    baseline: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    thresholds: dict[str, float | None] = field(default_factory=dict)
    grid: Path | None = None

    @property
    def flagged(self) -> list[ImageAudit]:
        """The images flagged as near copies."""
        return [a for a in self.images if a.near_copy]


# ------------------------------------------------------------------------------------------ the audit
def audit_synthetic_set(
    synthetic_dir: str | os.PathLike,
    real_records: Sequence[IdentityRecord],
    *,
    extractor: FeatureExtractor | str | os.PathLike | None = None,
    thresholds: NearCopyThresholds | None = None,
    pixel_space: PixelSpace | None = None,
    shortlist: int = 16,
    batch_size: int = 256,
    num_threads: int = 2,
    baseline_sample: int | None = 5000,
    device: str | torch.device | None = None,
    update_manifest: bool = True,
    write_card: bool = True,
    grid_path: str | os.PathLike | None = GRID_NAME,
    grid_pairs: int = 16,
    seed: int = 0,
) -> AuditResult:
    """Audit a synthetic set (``manifest.jsonl`` + images) for near copies of the real training images.

    Args:
        synthetic_dir: the synthetic set folder (``images/``, ``manifest.jsonl``, ``card.json``).
        real_records: the real TRAINING images the generator saw (any split given is used as is).
        extractor: a ``FeatureExtractor`` or a recognizer export folder for the feature space; None = pixel
            space only.
        thresholds: the near-copy criteria (defaults: :class:`NearCopyThresholds`).
        pixel_space: the pixel descriptor (defaults: :class:`PixelSpace`).
        shortlist: candidates per query from the exact search, re-scored over shifts and mirroring.
        batch_size: images decoded (and embedded) at a time.
        num_threads: image-decoding threads.
        baseline_sample: real images used as queries for the any-identity baseline (None = all).
        device: device for the extractor (default: where its parameters are).
        update_manifest: write the per-image fields into ``manifest.jsonl``.
        write_card: write the summary under ``card.json["audit"]`` (other card fields are kept).
        grid_path: PNG grid of the closest pairs; relative paths are inside ``synthetic_dir``; None = none.
        grid_pairs: number of pairs in the grid.
        seed: seed of the any-identity baseline sample.

    Raises:
        FileNotFoundError: no manifest in ``synthetic_dir``.
        BadImageError: a synthetic or real image is missing or unreadable (named); nothing is written.
        ValueError: empty manifest or real set, a malformed ``card.json``, bad arguments.
    """
    thresholds = thresholds or NearCopyThresholds()
    space = pixel_space or PixelSpace()
    for name, value in (("batch_size", batch_size), ("shortlist", shortlist)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    synthetic_dir = Path(synthetic_dir)
    manifest_path = synthetic_dir / synthetic_set.MANIFEST
    synthetic = read_manifest(manifest_path)
    if not synthetic:
        raise ValueError(f"{manifest_path}: the synthetic set lists no images")
    real = list(real_records)
    if not real:
        raise ValueError("audit needs the real training records: got none")
    card = synthetic_set.read_card(synthetic_dir) if write_card else {}
    for line, rec in enumerate(synthetic, start=1):  # fail fast on missing files, before any real work
        if not Path(rec.path).is_file():
            raise BadImageError(rec.path, f"file not found (listed in {manifest_path}, row {line})")
    extractor = resolve_extractor(extractor)
    embedder = AuditEmbedder(space, extractor, extractor_device(extractor, device), batch_size, num_threads)

    # real images: descriptors / features kept (small), decoded images dropped batch by batch
    real_root = _common_root([r.path for r in real])
    real_names = [os.path.relpath(os.path.abspath(r.path), real_root) for r in real]
    n_real = len(real)
    real_pix, real_feat = _embed_real(embedder, real)
    mirror_probe = space.num_variants // 2
    spaces = {
        "pixel": SimilaritySpace(
            real_pix, lambda rows: space.variants(real_pix[rows]), (0, mirror_probe), shortlist
        )
    }
    if real_feat is not None:
        spaces["feature"] = SimilaritySpace(real_feat[:, 0], lambda rows: real_feat[rows], (0, 1), shortlist)

    # real-vs-real baselines
    groups = _groups([r.identity for r in real])
    sample = np.arange(n_real)
    if baseline_sample is not None and n_real > baseline_sample:
        sample = np.sort(np.random.default_rng(seed).choice(n_real, size=baseline_sample, replace=False))
    baseline = {
        name: {
            "same_identity": sp.same_identity_baseline(groups),
            "any_identity": sp.any_identity_baseline(sample),
        }
        for name, sp in spaces.items()
    }
    bars, baseline_used = _bars(thresholds, baseline)

    sims, nns, mirrored_pix = _search_synthetic(embedder, synthetic, spaces)
    images = _decide(synthetic, synthetic_dir, real_names, sims, nns, mirrored_pix, bars)
    grid_file = None if grid_path is None else _in_dir(synthetic_dir, grid_path)
    grid = pair_grid(images, synthetic, real, nns["pixel"], grid_pairs) if grid_file else None
    summary = audit_summary(
        images, baseline, baseline_used, bars, thresholds, real, real_root, extractor, space
    )
    summary["grid"] = synthetic_set.set_relative(grid_file, synthetic_dir) if grid is not None else None

    # write everything at the end, each file atomically
    if grid is not None:
        save_png(grid, grid_file)
    if update_manifest:
        rows = [
            replace(rec, extra={**rec.extra, **a.manifest_fields()})
            for rec, a in zip(synthetic, images, strict=True)
        ]
        write_manifest(manifest_path, rows)
    if write_card:
        card["audit"] = summary
        synthetic_set.write_card(synthetic_dir, card)
    return AuditResult(
        synthetic_dir, images, summary, baseline, bars, grid_file if grid is not None else None
    )


def _embed_real(embedder: AuditEmbedder, real: list[IdentityRecord]) -> tuple[np.ndarray, np.ndarray | None]:
    """Pixel descriptors (N, d) and features (N, 2, D) or None of the real images; images are not kept."""
    real_pix = np.zeros((len(real), embedder.space.dim), dtype=np.float32)
    real_feat = None
    for start, desc, feats in embedder.batches([r.path for r in real]):
        real_pix[start : start + len(desc)] = desc
        if feats is not None:
            if real_feat is None:
                real_feat = np.zeros((len(real), 2, feats.shape[2]), dtype=np.float32)
            real_feat[start : start + len(feats)] = feats
    log.info("audit: embedded %d real images", len(real))
    return real_pix, real_feat


def _search_synthetic(
    embedder: AuditEmbedder, synthetic: list[IdentityRecord], spaces: dict[str, SimilaritySpace]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Nearest real image (similarity, index) per space of every synthetic image, streamed in batches;
    also whether the best pixel match was the mirrored image."""
    n = len(synthetic)
    sims = {name: np.zeros(n) for name in spaces}
    nns = {name: np.zeros(n, dtype=np.int64) for name in spaces}
    mirrored = np.zeros(n, dtype=bool)
    mirror_probe = embedder.space.num_variants // 2
    for start, desc, feats in embedder.batches([r.path for r in synthetic]):
        stop = start + len(desc)
        s, i, v = spaces["pixel"].nearest(embedder.space.variants(desc))
        sims["pixel"][start:stop], nns["pixel"][start:stop], mirrored[start:stop] = s, i, v >= mirror_probe
        if feats is not None:
            s, i, _ = spaces["feature"].nearest(feats)
            sims["feature"][start:stop], nns["feature"][start:stop] = s, i
    log.info("audit: searched %d synthetic images", n)
    return sims, nns, mirrored


def _bars(
    thresholds: NearCopyThresholds, baseline: dict[str, dict[str, np.ndarray]]
) -> tuple[dict[str, float | None], dict[str, str | None]]:
    bars: dict[str, float | None] = {"pixel": thresholds.pixel, "feature": None}
    used: dict[str, str | None] = {}
    for space, kinds in baseline.items():
        kind = "same_identity" if kinds["same_identity"].size else "any_identity"
        rel = None
        if thresholds.relative_alpha is not None:
            rel = relative_threshold(kinds[kind], thresholds.baseline_quantile, thresholds.relative_alpha)
        used[space] = kind if rel is not None else None
        bars[f"{space}_relative"] = rel
    if "feature" in baseline:
        bars["feature"] = thresholds.feature
    return bars, used


def _decide(
    synthetic: list[IdentityRecord],
    synthetic_dir: Path,
    real_names: list[str],
    sims: dict[str, np.ndarray],
    nns: dict[str, np.ndarray],
    mirrored_pix: np.ndarray,
    bars: dict[str, float | None],
) -> list[ImageAudit]:
    images = []
    for j, rec in enumerate(synthetic):
        reasons = []
        for crit in ("pixel", "pixel_relative", "feature", "feature_relative"):
            space = crit.split("_")[0]
            bar = bars.get(crit)
            if bar is not None and space in sims and sims[space][j] >= bar:
                reasons.append(crit)
        has_feat = "feature" in sims
        images.append(
            ImageAudit(
                path=synthetic_set.set_relative(rec.path, synthetic_dir),
                identity=rec.identity,
                nn_real_pixel=real_names[nns["pixel"][j]],
                sim_pixel=float(sims["pixel"][j]),
                mirrored_pixel=bool(mirrored_pix[j]),
                nn_real_feature=real_names[nns["feature"][j]] if has_feat else None,
                sim_feature=float(sims["feature"][j]) if has_feat else None,
                near_copy=bool(reasons),
                reasons=tuple(reasons),
            )
        )
    return images


# ------------------------------------------------------------------------------------------ helpers
def _groups(identities: list[str]) -> list[np.ndarray]:
    by_id: dict[str, list[int]] = {}
    for i, identity in enumerate(identities):
        by_id.setdefault(identity, []).append(i)
    return [np.asarray(v, dtype=np.int64) for _, v in sorted(by_id.items())]


def _common_root(paths: list[str]) -> str:
    folders = [os.path.dirname(os.path.abspath(p)) for p in paths]
    return os.path.commonpath(folders) if folders else ""


def _in_dir(base: Path, path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.is_absolute() else base / path
