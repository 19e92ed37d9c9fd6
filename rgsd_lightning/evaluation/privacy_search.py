"""Pixel descriptors, image embedding and exact nearest-neighbour search of the privacy audit.

The audit itself (criteria, decisions, :func:`~rgsd_lightning.evaluation.privacy.audit_synthetic_set`) and
the description of both similarity spaces are in :mod:`rgsd_lightning.evaluation.privacy`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from rgsd_lightning.data.images import load_image

if TYPE_CHECKING:
    import torch

_GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# ------------------------------------------------------------------------------------------ descriptors
@dataclass(frozen=True)
class PixelSpace:
    """The shift- and mirror-tolerant pixel space of the audit (see the ``privacy`` module docstring).

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


# ------------------------------------------------------------------------------------------ embedding
class AuditEmbedder:
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


def resolve_extractor(extractor: Any) -> Any:
    """A FeatureExtractor as given, one loaded from a recognizer export folder, or None."""
    if extractor is None or hasattr(extractor, "input_size"):
        return extractor
    if isinstance(extractor, str | os.PathLike):
        from rgsd_lightning.backbones import FeatureExtractor

        return FeatureExtractor.from_export(extractor)
    raise TypeError(
        f"extractor must be a FeatureExtractor (with .input_size), a recognizer export folder or None, "
        f"got {type(extractor).__name__}"
    )


def extractor_device(extractor: Any, device: str | torch.device | None) -> Any:
    """The device the extractor runs on: ``device`` (the extractor is moved there) or its parameters'."""
    if extractor is None:
        return None
    import torch

    if device is not None:
        extractor.to(device)
        return torch.device(device)
    param = next(extractor.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# ------------------------------------------------------------------------------------------ search
class SimilaritySpace:
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
