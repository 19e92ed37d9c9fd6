"""Face verification: the insightface 10-fold accuracy protocol, flip-test fusion and per-group reports.

Protocol (insightface ``eval/verification.py``, as used for LFW, AgeDB-30, CFP-FP, CALFW, CPLFW and RFW):
embeddings are L2-normalised; a pair's distance is the squared L2 distance (0..4); candidate thresholds are
``np.arange(0, 4, 0.01)``; a pair is predicted "same" iff its distance is strictly below the threshold; pairs
are split into contiguous folds in file order (scikit-learn ``KFold(n_splits, shuffle=False)``: the first
``n % k`` folds get one extra pair); for each fold the threshold with the best accuracy on the *other* folds
is chosen (the lowest one on a tie) and applied to the held-out fold; the result is the mean of the fold
accuracies and their population standard deviation (ddof=0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

_DUPLICATE_RTOL = 1e-4  # an image embedded twice (DDP padding) must agree to this tolerance
_DUPLICATE_ATOL = 1e-5


class VerificationResult(NamedTuple):
    """Result of :func:`verification_accuracy` (unpacks as ``acc, std, thresholds``).

    Attributes:
        accuracy: mean of the per-fold accuracies.
        std: population standard deviation (ddof=0) of the per-fold accuracies.
        thresholds: (n_folds,) squared-L2 threshold chosen on the training folds of each fold.
    """

    accuracy: float
    std: float
    thresholds: np.ndarray


def _as_array(x: Any, name: str) -> np.ndarray:
    """Any array-like (numpy, torch on any device, list) as a numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}") from err


def _embeddings(x: Any, name: str) -> np.ndarray:
    """A finite 2-D float64 embedding matrix (ValueError naming ``name`` otherwise)."""
    a = _as_array(x, name)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_pairs, dim), got shape {a.shape}")
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    bad = int((~np.isfinite(a)).any(axis=1).sum())
    if bad:
        raise ValueError(f"{name} has {bad} row(s) with NaN/inf values")
    return a


def _l2_normalise(a: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm; all-zero rows stay zero (as scikit-learn's ``normalize``)."""
    norms = np.sqrt(np.einsum("ij,ij->i", a, a))
    return a / np.where(norms == 0, 1.0, norms)[:, None]


def _fold_bounds(n: int, n_folds: int) -> np.ndarray:
    """Start offsets of ``n_folds`` contiguous folds (+ the end): the first ``n % n_folds`` get one extra."""
    sizes = np.full(n_folds, n // n_folds, dtype=np.int64)
    sizes[: n % n_folds] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def verification_accuracy(
    embeddings1: Any, embeddings2: Any, issame: Any, n_folds: int = 10
) -> VerificationResult:
    """10-fold verification accuracy with the best threshold chosen on the training folds (insightface).

    Args:
        embeddings1: (N, D) embeddings of the first image of each pair (numpy array or torch tensor).
        embeddings2: (N, D) embeddings of the second image of each pair.
        issame: (N,) bool, True when the pair shows the same identity.
        n_folds: number of contiguous folds (2 <= n_folds <= N).

    Returns:
        ``VerificationResult(accuracy, std, thresholds)``.

    Raises:
        ValueError: on mismatched shapes, NaN/inf embeddings, non-binary ``issame`` or a bad ``n_folds``.
    """
    e1 = _embeddings(embeddings1, "embeddings1")
    e2 = _embeddings(embeddings2, "embeddings2")
    if e1.shape != e2.shape:
        raise ValueError(f"embeddings1 has shape {e1.shape} but embeddings2 has shape {e2.shape}")
    same = _as_array(issame, "issame")
    n = e1.shape[0]
    if same.ndim != 1 or same.shape[0] != n:
        raise ValueError(f"issame must have shape ({n},) like the embeddings, got {same.shape}")
    if same.dtype.kind not in "biuf" or not np.isin(same, (0, 1)).all():
        raise ValueError("issame must hold booleans (or 0/1)")
    same = same.astype(bool)
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    if n_folds > n:
        raise ValueError(f"n_folds={n_folds} is larger than the number of pairs ({n})")

    diff = _l2_normalise(e1) - _l2_normalise(e2)
    dist = np.einsum("ij,ij->i", diff, diff)
    thresholds = np.arange(0, 4, 0.01)
    correct = (dist[None, :] < thresholds[:, None]) == same[None, :]  # (T, N): prediction right at threshold
    bounds = _fold_bounds(n, int(n_folds))
    per_fold = np.add.reduceat(correct, bounds[:-1], axis=1, dtype=np.int64)  # (T, K) correct pairs per fold
    total = per_fold.sum(axis=1)
    sizes = np.diff(bounds)
    accuracies = np.empty(int(n_folds))
    chosen = np.empty(int(n_folds))
    for fold in range(int(n_folds)):
        best = int(np.argmax(total - per_fold[:, fold]))  # same train size: counts rank like accuracies
        accuracies[fold] = per_fold[best, fold] / sizes[fold]
        chosen[fold] = thresholds[best]
    return VerificationResult(float(accuracies.mean()), float(accuracies.std()), chosen)


def flip_fuse(embeddings: Any, embeddings_flipped: Any) -> Any:
    """Flip-test embedding: the sum of the embeddings of an image and of its mirror image, L2-normalised.

    Args:
        embeddings: (N, D) embeddings of the original images (numpy array or torch tensor).
        embeddings_flipped: (N, D) embeddings of the horizontally flipped images.

    Returns:
        (N, D) unit-norm embeddings, a torch tensor when ``embeddings`` is one, else a numpy array.
    """
    if isinstance(embeddings, torch.Tensor):
        other = torch.as_tensor(embeddings_flipped, device=embeddings.device)
        if other.shape != embeddings.shape:
            raise ValueError(
                f"embeddings_flipped has shape {tuple(other.shape)} but embeddings {tuple(embeddings.shape)}"
            )
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(embeddings.shape)}")
        for name, value in (("embeddings", embeddings), ("embeddings_flipped", other)):
            bad = int((~torch.isfinite(value)).any(dim=1).sum()) if value.is_floating_point() else 0
            if bad:
                raise ValueError(f"{name} has {bad} row(s) with NaN/inf values")
        return F.normalize(embeddings + other.to(embeddings.dtype), dim=1)
    a = _embeddings(embeddings, "embeddings")
    b = _embeddings(embeddings_flipped, "embeddings_flipped")
    if a.shape != b.shape:
        raise ValueError(f"embeddings_flipped has shape {b.shape} but embeddings {a.shape}")
    return _l2_normalise(a + b)


def group_report(accuracies: Mapping[str, float]) -> dict[str, float]:
    """Per-group accuracies with their mean, spread and skewed error ratio (e.g. the four RFW groups).

    Args:
        accuracies: group name -> verification accuracy in [0, 1].

    Returns:
        The per-group accuracies plus ``mean``, ``std`` (population, ddof=0) and ``max_min_error_ratio``
        (largest error / smallest error with error = 1 - accuracy; ``inf`` when the smallest error is 0 and
        the largest is not, 1.0 when every error is 0).
    """
    reserved = {"mean", "std", "max_min_error_ratio"}
    if not accuracies:
        raise ValueError("group_report needs at least one group")
    clash = reserved.intersection(accuracies)
    if clash:
        raise ValueError(f"group names {sorted(clash)} clash with the summary keys {sorted(reserved)}")
    values = np.array([float(v) for v in accuracies.values()])
    if not (np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()):
        raise ValueError(f"accuracies must lie in [0, 1], got {dict(accuracies)}")
    errors = 1.0 - values
    if errors.min() > 0:
        ratio = float(errors.max() / errors.min())
    else:
        ratio = float("inf") if errors.max() > 0 else 1.0
    report = {str(name): float(value) for name, value in accuracies.items()}
    report.update(mean=float(values.mean()), std=float(values.std()), max_min_error_ratio=ratio)
    return report


class VerificationMetric(Metric):
    """10-fold verification accuracy over a fixed list of image pairs, as a torchmetrics ``Metric``.

    ``update`` receives embeddings of images (already flip-fused if wanted, see :func:`flip_fuse`) with their
    image indices; ``compute`` places them by index, so batches may arrive in any order and on any rank.
    Under DDP an index seen twice (padding of a distributed sampler) must carry the same embedding (to a
    relative tolerance of 1e-4); an image used by a pair but never seen is an error.

    Args:
        pairs: (N, 2) int image indices of each pair.
        issame: (N,) bool, True when the pair shows the same identity.
        num_images: number of images the indices refer to (indices lie in ``[0, num_images)``).
        n_folds: number of contiguous folds of the protocol.
        kwargs: passed to ``torchmetrics.Metric`` (e.g. ``process_group``).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, pairs: Any, issame: Any, num_images: int, n_folds: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        pair_idx = _as_array(pairs, "pairs")
        if pair_idx.ndim != 2 or pair_idx.shape[1] != 2 or pair_idx.shape[0] == 0:
            raise ValueError(f"pairs must have shape (num_pairs, 2), got {pair_idx.shape}")
        if pair_idx.dtype.kind not in "iu":
            raise ValueError(f"pairs must hold integer image indices, got dtype {pair_idx.dtype}")
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
            raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
        if pair_idx.min() < 0 or pair_idx.max() >= num_images:
            raise ValueError(f"pairs hold image indices outside [0, {num_images}) (num_images)")
        same = _as_array(issame, "issame")
        if same.shape != (pair_idx.shape[0],) or not np.isin(same, (0, 1)).all():
            raise ValueError(
                f"issame must be ({pair_idx.shape[0]},) booleans like pairs, got shape {same.shape}"
            )
        if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
            raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
        if n_folds > pair_idx.shape[0]:
            raise ValueError(f"n_folds={n_folds} is larger than the number of pairs ({pair_idx.shape[0]})")
        self.pairs = pair_idx.astype(np.int64)
        self.issame = same.astype(bool)
        self.num_images = int(num_images)
        self.n_folds = int(n_folds)
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: torch.Tensor, indices: torch.Tensor) -> None:
        """Store a batch: (B, D) embeddings and the (B,) image indices they belong to."""
        embeddings = torch.as_tensor(embeddings).detach()
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be 2-D (batch, dim), got shape {tuple(embeddings.shape)}")
        idx = torch.as_tensor(indices, device=embeddings.device)
        if idx.dim() != 1 or idx.shape[0] != embeddings.shape[0]:
            raise ValueError(f"indices must have shape ({embeddings.shape[0]},), got {tuple(idx.shape)}")
        if embeddings.is_floating_point():
            bad = ~torch.isfinite(embeddings).all(dim=1)
            if bool(bad.any()):
                raise ValueError(
                    f"embeddings has {int(bad.sum())} row(s) with NaN/inf values "
                    f"(image indices {idx[bad][:5].tolist()})"
                )
        self.embeddings.append(embeddings.to(torch.float32))
        self.indices.append(idx.long())

    def compute(self) -> dict[str, torch.Tensor]:
        """Mean and std of the fold accuracies over all pairs."""
        if isinstance(self.embeddings, list) and not self.embeddings:
            raise ValueError("VerificationMetric.compute() called before any update()")
        emb = dim_zero_cat(self.embeddings).detach().cpu().double().numpy()
        idx = dim_zero_cat(self.indices).cpu().numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise ValueError(
                f"VerificationMetric got image indices outside [0, {self.num_images}) (num_images)"
            )
        table = np.full((self.num_images, emb.shape[1]), np.nan)
        seen = np.zeros(self.num_images, dtype=bool)
        first = np.unique(idx, return_index=True)[1]
        table[idx[first]] = emb[first]
        seen[idx[first]] = True
        if not np.allclose(emb, table[idx], rtol=_DUPLICATE_RTOL, atol=_DUPLICATE_ATOL):
            raise ValueError("VerificationMetric got different embeddings for the same image index")
        missing = np.flatnonzero(~seen[np.unique(self.pairs)])
        if missing.size:
            absent = np.unique(self.pairs)[missing]
            raise ValueError(
                f"VerificationMetric is missing the embeddings of {absent.size} image(s) used by pairs, "
                f"e.g. index {absent[: min(5, absent.size)].tolist()}"
            )
        result = verification_accuracy(
            table[self.pairs[:, 0]], table[self.pairs[:, 1]], self.issame, self.n_folds
        )
        return {
            "accuracy": torch.tensor(result.accuracy, dtype=torch.float32, device=self.device),
            "std": torch.tensor(result.std, dtype=torch.float32, device=self.device),
        }
