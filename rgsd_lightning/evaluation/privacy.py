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
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from rgsd_lightning.data.images import BadImageError, load_image
from rgsd_lightning.data.records import IdentityRecord, atomic_write_json, read_manifest, write_manifest

if TYPE_CHECKING:
    import torch

    from rgsd_lightning.backbones import FeatureExtractor

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
CARD = "card.json"
GRID_NAME = "audit_pairs.png"
REJECTED = "rejected"
AUDIT_FIELDS = ("nn_real_pixel", "sim_pixel", "nn_real_feature", "sim_feature", "near_copy")
AUDIT_VERSION = 1
_GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


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


# ------------------------------------------------------------------------------------------ descriptors
@dataclass(frozen=True)
class PixelSpace:
    """The shift- and mirror-tolerant pixel space of the audit (see the module docstring).

    Attributes:
        side: the descriptor is a ``side x side`` grid (``side**2`` values).
        blur: Gaussian blur sigma, in descriptor cells, applied before pooling.
        max_shift: query images are also compared shifted by up to this many cells in x and y.
    """

    side: int = 16
    blur: float = 1.0
    max_shift: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.side, bool) or not isinstance(self.side, int) or self.side < 2:
            raise ValueError(f"pixel descriptor side must be an integer >= 2, got {self.side!r}")
        if self.blur < 0:
            raise ValueError(f"pixel descriptor blur must be >= 0, got {self.blur}")
        if not isinstance(self.max_shift, int) or not 0 <= self.max_shift < self.side:
            raise ValueError(f"max_shift must be an integer in [0, side), got {self.max_shift!r}")

    @property
    def dim(self) -> int:
        """Length of a descriptor."""
        return self.side * self.side

    @property
    def num_variants(self) -> int:
        """Variants per query: (2 max_shift + 1)^2 shifts, each also mirrored."""
        return 2 * (2 * self.max_shift + 1) ** 2

    def describe(self, image: Image.Image) -> np.ndarray:
        """The descriptor of one image: (side * side,) float32, zero-mean, unit-norm (zero if flat).

        Grayscale, antialiased resize to ``2 side``, Gaussian blur, 2x2 average pooling, then mean
        removal and L2 normalisation.
        """
        side = self.side
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
        gray = Image.fromarray(np.ascontiguousarray(rgb @ _GRAY, dtype=np.float32))  # mode "F"
        work = np.asarray(gray.resize((2 * side, 2 * side), Image.Resampling.BILINEAR), dtype=np.float32)
        kernel = _gaussian(2.0 * self.blur)
        work = _blur(_blur(work, kernel, axis=0), kernel, axis=1)
        pooled = work.reshape(side, 2, side, 2).mean(axis=(1, 3))
        vec = (pooled - pooled.mean()).reshape(-1)
        norm = float(np.linalg.norm(vec))
        if norm < 1e-3 * side:  # RMS contrast under 1/1000 of a grey level: a flat image
            return np.zeros(self.dim, dtype=np.float32)
        return (vec / norm).astype(np.float32)

    def variants(self, descriptors: np.ndarray) -> np.ndarray:
        """(B, dim) -> (B, V, dim): each descriptor, then shifted (edge cells repeated), then all of that
        mirrored, each renormalised. Variant 0 is the descriptor itself, variant ``V // 2`` its mirror.
        """
        b, side, r = descriptors.shape[0], self.side, self.max_shift
        grid = descriptors.reshape(b, side, side)
        shifts = [(0, 0)] + [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy or dx]
        out = []
        for g in (grid, grid[:, :, ::-1]):
            padded = np.pad(g, ((0, 0), (r, r), (r, r)), mode="edge")
            for dy, dx in shifts:
                out.append(padded[:, r + dy : r + dy + side, r + dx : r + dx + side].reshape(b, -1))
        v = np.stack(out, axis=1)
        v = v - v.mean(axis=2, keepdims=True)
        norm = np.linalg.norm(v, axis=2, keepdims=True)
        return np.ascontiguousarray(np.where(norm > 1e-6, v / np.maximum(norm, 1e-12), 0.0), dtype=np.float32)

    def similarity(self, a: Image.Image, b: Image.Image) -> float:
        """The audit's pixel similarity of image ``a`` (shifted / mirrored) to image ``b``."""
        va = self.variants(self.describe(a)[None])[0]
        return float((va @ self.describe(b)).max())


def _gaussian(sigma: float) -> np.ndarray:
    if sigma <= 0:
        return np.ones(1, dtype=np.float32)
    radius = max(1, math.ceil(2.5 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1, dtype=np.float32) / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _blur(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    r = kernel.size // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (r, r)
    padded = np.pad(x, pad, mode="symmetric")
    n = x.shape[axis]
    out = np.zeros_like(x)
    for i, w in enumerate(kernel):
        out += w * (padded[i : i + n] if axis == 0 else padded[:, i : i + n])
    return out


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


# ------------------------------------------------------------------------------------------ embedding
class _Embedder:
    """Decodes images in batches and turns them into pixel descriptors and (optionally) features."""

    def __init__(
        self, space: PixelSpace, extractor: Any, device: Any, batch_size: int, num_threads: int
    ) -> None:
        self.space = space
        self.extractor = extractor
        self.device = device
        self.batch_size = batch_size
        self.num_threads = max(1, num_threads)
        if extractor is not None:
            h, w = (int(s) for s in extractor.input_size)
            self.feature_size = (w, h)  # PIL order

    def _decode(self, path: str) -> tuple[np.ndarray, np.ndarray | None]:
        img = load_image(path, mode="RGB")
        desc = self.space.describe(img)
        if self.extractor is None:
            return desc, None
        resized = np.asarray(img.resize(self.feature_size, Image.Resampling.BICUBIC), dtype=np.float32)
        return desc, resized.transpose(2, 0, 1) / 127.5 - 1.0

    def batches(self, paths: Sequence[str]) -> Iterator[tuple[int, np.ndarray, Any]]:
        """Yield ``(start, descriptors, features)`` per batch; features are (B, 2, D) -- the image and its
        mirror -- or None without an extractor."""
        with ThreadPoolExecutor(self.num_threads) as pool:
            for start in range(0, len(paths), self.batch_size):
                decoded = list(pool.map(self._decode, paths[start : start + self.batch_size]))
                desc = np.stack([d for d, _ in decoded])
                feats = None
                if self.extractor is not None:
                    feats = self._features(np.stack([x for _, x in decoded]))
                yield start, desc, feats

    def _features(self, images: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            f = self.extractor(x).float().cpu().numpy()
            fm = self.extractor(torch.flip(x, dims=[-1])).float().cpu().numpy()
        return np.stack([_unit(f), _unit(fm)], axis=1)


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.ascontiguousarray((x / np.maximum(norm, 1e-12)).astype(np.float32))


def _resolve_extractor(extractor: Any) -> Any:
    if extractor is None or hasattr(extractor, "input_size"):
        return extractor
    if isinstance(extractor, str | os.PathLike):
        from rgsd_lightning.backbones import FeatureExtractor

        return FeatureExtractor.from_export(extractor)
    raise TypeError(
        f"extractor must be a FeatureExtractor (with .input_size), a recognizer export folder or None, "
        f"got {type(extractor).__name__}"
    )


def _extractor_device(extractor: Any, device: str | torch.device | None) -> Any:
    if extractor is None:
        return None
    import torch

    if device is not None:
        extractor.to(device)
        return torch.device(device)
    param = next(extractor.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# ------------------------------------------------------------------------------------------ search
class _Space:
    """One similarity space: the real vectors (faiss-indexed) and how to expand queries into variants.

    The similarity of a query to a real image is the maximum inner product over the query's variants
    (mirror, and in the pixel space shifts). Candidates come from an exact faiss search with the
    ``probes`` variants (the query and its mirror); they are then re-scored with every variant.
    """

    def __init__(self, vectors: np.ndarray, variants_of, probes: tuple[int, ...], shortlist: int) -> None:
        import faiss  # lazily: faiss and torch both bring OpenMP (DESIGN §7)

        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.variants_of = variants_of  # real row indices -> (n, V, d) variants of those real images
        self.probes = probes
        self.shortlist = shortlist
        self.index = faiss.IndexFlatIP(self.vectors.shape[1])
        self.index.add(self.vectors)

    def nearest(self, variants: np.ndarray, exclude: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """Best (similarity, real index, variant) per query; ``exclude``: one real index per query to skip."""
        n_real = self.index.ntotal
        k = min(n_real, self.shortlist + (exclude is not None))
        cands = np.concatenate(
            [self.index.search(np.ascontiguousarray(variants[:, p]), k)[1] for p in self.probes], axis=1
        )
        scores = np.einsum("bvd,bkd->bvk", variants, self.vectors[cands])  # (B, V, C)
        best_variant = scores.argmax(axis=1)
        best = scores.max(axis=1)
        if exclude is not None:
            best[cands == exclude[:, None]] = -np.inf
        col = best.argmax(axis=1)
        rows = np.arange(len(cands))
        return best[rows, col].astype(np.float64), cands[rows, col], best_variant[rows, col]

    def same_identity_baseline(self, groups: list[np.ndarray], block: int = 256) -> np.ndarray:
        """For every real image in a group of >= 2: similarity to its nearest other image of the group."""
        out: list[np.ndarray] = []
        for idx in groups:
            if idx.size < 2:
                continue
            members = self.vectors[idx]
            for start in range(0, idx.size, block):
                rows = idx[start : start + block]
                sims = (self.variants_of(rows) @ members.T).max(axis=1)  # (b, n)
                sims[np.arange(rows.size), np.arange(start, start + rows.size)] = -np.inf
                out.append(sims.max(axis=1))
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def any_identity_baseline(self, sample: np.ndarray, block: int = 256) -> np.ndarray:
        """For the sampled real images: similarity to the nearest other real image of any identity."""
        if self.index.ntotal < 2 or sample.size == 0:
            return np.zeros(0)
        parts = []
        for start in range(0, sample.size, block):
            rows = sample[start : start + block]
            parts.append(self.nearest(self.variants_of(rows), exclude=rows)[0])
        return np.concatenate(parts)


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
    manifest_path = synthetic_dir / MANIFEST
    synthetic = read_manifest(manifest_path)
    if not synthetic:
        raise ValueError(f"{manifest_path}: the synthetic set lists no images")
    real = list(real_records)
    if not real:
        raise ValueError("audit needs the real training records: got none")
    card = _read_card(synthetic_dir / CARD) if write_card else {}
    for line, rec in enumerate(synthetic, start=1):  # fail fast on missing files, before any real work
        if not Path(rec.path).is_file():
            raise BadImageError(rec.path, f"file not found (listed in {manifest_path}, row {line})")
    extractor = _resolve_extractor(extractor)
    embedder = _Embedder(space, extractor, _extractor_device(extractor, device), batch_size, num_threads)

    # real images: descriptors / features kept (small), decoded images dropped batch by batch
    real_root = _common_root([r.path for r in real])
    real_names = [os.path.relpath(os.path.abspath(r.path), real_root) for r in real]
    n_real = len(real)
    real_pix, real_feat = _embed_real(embedder, real)
    mirror_probe = space.num_variants // 2
    spaces = {
        "pixel": _Space(real_pix, lambda rows: space.variants(real_pix[rows]), (0, mirror_probe), shortlist)
    }
    if real_feat is not None:
        spaces["feature"] = _Space(real_feat[:, 0], lambda rows: real_feat[rows], (0, 1), shortlist)

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
    grid = _pair_grid(images, synthetic, real, nns["pixel"], grid_pairs) if grid_file else None
    summary = _summary(images, baseline, baseline_used, bars, thresholds, real, real_root, extractor, space)
    summary["grid"] = _display_path(grid_file, synthetic_dir) if grid is not None else None

    # write everything at the end, each file atomically
    if grid is not None:
        _save_png_atomic(grid, grid_file)
    if update_manifest:
        rows = [
            replace(rec, extra={**rec.extra, **a.manifest_fields()})
            for rec, a in zip(synthetic, images, strict=True)
        ]
        write_manifest(manifest_path, rows)
    if write_card:
        card["audit"] = summary
        atomic_write_json(synthetic_dir / CARD, card)
    return AuditResult(
        synthetic_dir, images, summary, baseline, bars, grid_file if grid is not None else None
    )


def _embed_real(embedder: _Embedder, real: list[IdentityRecord]) -> tuple[np.ndarray, np.ndarray | None]:
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
    embedder: _Embedder, synthetic: list[IdentityRecord], spaces: dict[str, _Space]
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
                path=_display_path(Path(rec.path), synthetic_dir),
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


def _summary(
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
def _pair_grid(
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


def _save_png_atomic(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ------------------------------------------------------------------------------------------ helpers
def _read_card(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: card.json is not valid JSON ({err}); not overwriting it") from err
    if not isinstance(card, dict):
        raise ValueError(f"{path}: card.json must hold a JSON object, got {type(card).__name__}")
    return card


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


def _display_path(path: Path, base: Path) -> str:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
    return str(path) if rel.startswith("..") else rel


# ------------------------------------------------------------------------------------------ dropping
def drop_flagged(
    synthetic_dir: str | os.PathLike, result: AuditResult, *, move_files: bool = False
) -> list[str]:
    """Remove the rows flagged by ``result`` from the set's manifest (and optionally move their images).

    The new manifest is written first (atomically); then, with ``move_files``, each flagged image is
    moved to ``rejected/<its path under the set>``. ``card.json`` counts are refreshed and
    ``card["audit"]["dropped"]`` records what was dropped. Rows already absent are ignored.

    Args:
        synthetic_dir: the synthetic set folder that ``result`` audited.
        result: the audit result naming the flagged images.
        move_files: move the flagged images to ``rejected/`` instead of leaving them unlisted in place.

    Returns:
        The manifest paths of the dropped rows.
    """
    synthetic_dir = Path(synthetic_dir)
    if os.path.abspath(synthetic_dir) != os.path.abspath(result.synthetic_dir):
        raise ValueError(f"the audit result is for {result.synthetic_dir}, not for {synthetic_dir}")
    manifest_path = synthetic_dir / MANIFEST
    records = read_manifest(manifest_path)
    card_path = synthetic_dir / CARD
    card = _read_card(card_path)
    flagged = {a.path for a in result.flagged}
    keep, dropped = [], []
    for rec in records:
        (dropped if _display_path(Path(rec.path), synthetic_dir) in flagged else keep).append(rec)
    if not dropped:
        return []
    write_manifest(manifest_path, keep)
    moved_to = None
    if move_files:
        moved_to = REJECTED
        for rec in dropped:
            src = Path(rec.path)
            if src.is_file():
                dst = synthetic_dir / REJECTED / _display_path(src, synthetic_dir)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(src), str(dst))
    if card_path.is_file() or card:
        from rgsd_lightning.callbacks.writer import summarize

        rows = [r.to_json(relative_to=synthetic_dir) for r in keep]
        card.update(summarize(rows))
        audit = card.setdefault("audit", {})
        previous = audit.get("dropped", {}).get("count", 0) if isinstance(audit.get("dropped"), dict) else 0
        audit["dropped"] = {"count": previous + len(dropped), "moved_to": moved_to}
        atomic_write_json(card_path, card)
    return [_display_path(Path(r.path), synthetic_dir) for r in dropped]
