"""Generator quality of a synthetic set, measured in a judge recognizer's feature space.

The judge is a recognizer trained on ALL real images of the target identities (so it knows every
identity as well as the data allows; it never trains a downstream model; a run without one may use its
baseline recognizer, a weaker judge). Every image - real or
synthetic - goes through the generator's square geometry (``generator_transform``) and then the judge
(``FeatureExtractor``: its own resize and normalisation), so both sides are processed alike. Features are
L2-normalised.

* identity fidelity: the share of samples whose nearest judge prototype (normalised mean feature of an
  identity's real images, largest cosine) is the identity they were generated for; below rank 1, the
  median rank of that identity's prototype among all of them (:func:`identity_ranks`; chance is the middle);
* intra-identity diversity: mean pairwise Euclidean distance between the features of one identity's
  images, averaged over identities, for the samples and for the real images (ratio syn / real). A judge
  compresses the images it trained on (their spread was 1.5x smaller than that of real images of the same
  people it never saw, on ORL), so new samples measured against its training images look over-spread.
  Given held-out real images of the judge's identities (``heldout``: a judge trained on part of each
  identity's images), the reference is their spread instead - real images as new to the judge as the
  samples - and their nearest-prototype accuracy is the fidelity a real new image reaches;
* FID and KID from torchmetrics with the judge as the feature extractor (no Inception network);
* the reward components recorded in the set's manifest (``card.json`` ``reward_stats``) and its privacy
  audit summary;
* coverage (:func:`coverage_gain`, the report's ``coverage`` section): the 1-nearest-neighbour
  identification gain on real images of the identities that no stage trained on when the set's images join
  the real training images as the gallery, in the space of a recognizer trained on those training images
  only. Fidelity asks whether a sample looks like its identity; coverage asks whether it looks like the
  identity's *unseen* images, and ranked sets by their downstream gain where fidelity did not
  (benchmarks/results/coverage_faces_k1.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from rgsd_lightning.data.images import load_image
from rgsd_lightning.data.records import IdentityRecord
from rgsd_lightning.data.transforms import generator_transform


# ------------------------------------------------------------------------------------- pure maths
def prototypes(features: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Per-identity prototypes: the L2-normalised mean of each identity's features (sorted names).

    Args:
        features: (N, D) features.
        labels: N identity names.
    """
    feats = np.asarray(features, dtype=np.float64)
    names = sorted(set(labels))
    if not names:
        raise ValueError("prototypes need at least one labelled feature")
    labels_arr = np.asarray(labels)
    protos = np.stack([feats[labels_arr == n].mean(axis=0) for n in names])
    norms = np.linalg.norm(protos, axis=1, keepdims=True)
    return protos / np.maximum(norms, 1e-12), names


def _cosines(features: np.ndarray, protos: np.ndarray) -> np.ndarray:
    """(N, C) cosines of float64 features (N, D) with unit prototypes (C, D)."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return unit @ np.asarray(protos).T


def identity_fidelity(
    features: np.ndarray, labels: Sequence[str], protos: np.ndarray, proto_names: Sequence[str]
) -> float:
    """Share of features whose nearest prototype (largest cosine) carries their own label.

    Args:
        features: (N, D) features of the samples.
        labels: N intended identities.
        protos: (C, D) unit prototypes.
        proto_names: C identity names of the prototypes.
    """
    feats = np.asarray(features, dtype=np.float64)
    if len(feats) == 0:
        raise ValueError("identity_fidelity needs at least one sample")
    if len(feats) != len(labels):
        raise ValueError(f"{len(feats)} features but {len(labels)} labels")
    predicted = np.asarray(proto_names)[np.argmax(_cosines(feats, protos), axis=1)]
    return float(np.mean(predicted == np.asarray(labels)))


def identity_ranks(
    features: np.ndarray, labels: Sequence[str], protos: np.ndarray, proto_names: Sequence[str]
) -> np.ndarray:
    """Per sample, the rank (1 = nearest) of its intended identity's prototype among all prototypes by
    cosine; ties count against it (rank = 1 + the number of prototypes at least as near, itself excluded).

    Fidelity is the share at rank 1; the ranks show how much identity a set holds below that (chance: a
    median of (C + 1) / 2 over C identities).

    Args:
        features: (N, D) features of the samples.
        labels: N intended identities, each one of ``proto_names``.
        protos: (C, D) unit prototypes.
        proto_names: C identity names of the prototypes.
    """
    feats = np.asarray(features, dtype=np.float64)
    if len(feats) != len(labels):
        raise ValueError(f"{len(feats)} features but {len(labels)} labels")
    index = {name: i for i, name in enumerate(proto_names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"identities without a prototype: {unknown[:5]}")
    sims = _cosines(feats, protos)
    own = sims[np.arange(len(feats)), [index[name] for name in labels]]
    return (sims >= own[:, None]).sum(axis=1)  # counts the own prototype once: rank 1 when none is nearer


def intra_identity_distance(features: np.ndarray, labels: Sequence[str]) -> float | None:
    """Mean over identities (with >= 2 images) of the mean pairwise Euclidean distance of their features.

    Args:
        features: (N, D) features.
        labels: N identity names.

    Returns:
        The mean, or None when no identity has two images.
    """
    feats = np.asarray(features, dtype=np.float64)
    labels_arr = np.asarray(labels)
    per_identity = []
    for name in sorted(set(labels)):
        group = feats[labels_arr == name]
        n = len(group)
        if n < 2:
            continue
        diff = group[:, None, :] - group[None, :, :]
        dist = np.sqrt((diff**2).sum(-1))
        per_identity.append(dist[np.triu_indices(n, 1)].mean())
    return float(np.mean(per_identity)) if per_identity else None


class FeatureModule(nn.Module):
    """Wraps a feature extractor for torchmetrics: exposes ``num_features``, runs without gradients.

    Args:
        extractor: module mapping an image batch to (B, D) features.
        num_features: D.
    """

    def __init__(self, extractor: nn.Module, num_features: int) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features = int(num_features)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor(images).float()


def fid_kid(
    extractor: nn.Module,
    num_features: int,
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    kid_subset_size: int = 100,
    kid_subsets: int = 100,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """FID and KID (torchmetrics) of two image batches in ``extractor``'s feature space.

    Args:
        extractor: the feature network (the judge); it receives the images as given.
        num_features: its feature size.
        real: real images, (N, C, H, W).
        fake: synthetic images, (M, C, H, W).
        kid_subset_size: KID subset size (clipped to min(N, M)).
        kid_subsets: KID subsets.
        batch_size: images per feature forward.
        seed: torch seed of KID's subset draws (the global RNG state is restored afterwards).
    """
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs >= 2 real and >= 2 synthetic images, got {len(real)} and {len(fake)}")
    module = FeatureModule(extractor, num_features)
    subset = int(min(kid_subset_size, len(real), len(fake)))
    fid = FrechetInceptionDistance(feature=module, normalize=False)
    with warnings.catch_warnings():  # "will save all extracted features": a few thousand here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(
            feature=module, subsets=kid_subsets, subset_size=subset, normalize=False
        )
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            fid.update(batch, real=is_real)
            kid.update(batch, real=is_real)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid": float(kid_mean),
        "kid_std": float(kid_std),
        "kid_subset_size": subset,
    }


# ----------------------------------------------------------------------------------- image loading
def load_images(records: Sequence[IdentityRecord], size: int, channels: int) -> torch.Tensor:
    """Images as the generator sees them: (N, C, size, size) in [-1, 1], no flip."""
    transform = generator_transform(size, channels, hflip=False)
    mode = "L" if channels == 1 else "RGB"
    if not records:
        return torch.zeros(0, channels, size, size)
    return torch.stack([transform(load_image(r.path, mode)) for r in records])


@torch.no_grad()
def embed(extractor: nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Features of an image batch, computed in chunks."""
    out = [
        extractor(images[i : i + batch_size]).float().cpu().numpy() for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0))


class Judge:
    """The judge's view of the real target images, ready to score synthetic sets.

    Args:
        extractor: the judge (a ``FeatureExtractor``: images in [-1, 1] -> unit features).
        real: every real image of the target identities.
        image_size: generator side (real images are squared to it first, like the samples).
        channels: image channels.
        kid_subset_size: KID subset size.
        heldout: real images of the judge's identities it did not train on (other identities are
            ignored); when any remain, their spread is the reference of the syn/real ratio.
    """

    def __init__(
        self,
        extractor: nn.Module,
        real: Sequence[IdentityRecord],
        image_size: int,
        channels: int,
        kid_subset_size: int = 100,
        heldout: Sequence[IdentityRecord] = (),
    ) -> None:
        self.extractor = extractor.eval()
        self.image_size, self.channels, self.kid_subset_size = image_size, channels, kid_subset_size
        self.real_labels = [r.identity for r in real]
        self.real_images = load_images(real, image_size, channels)
        self.real_features = embed(self.extractor, self.real_images)
        self.protos, self.proto_names = prototypes(self.real_features, self.real_labels)
        self.train_diversity = intra_identity_distance(self.real_features, self.real_labels)
        self.real_fidelity = identity_fidelity(
            self.real_features, self.real_labels, self.protos, self.proto_names
        )
        known = set(self.proto_names)
        trained = {str(r.path) for r in real}
        heldout = [r for r in heldout if r.identity in known and str(r.path) not in trained]
        self.heldout_diversity: float | None = None
        self.heldout_fidelity: float | None = None
        if heldout:
            feats = embed(self.extractor, load_images(heldout, image_size, channels))
            labels = [r.identity for r in heldout]
            self.heldout_diversity = intra_identity_distance(feats, labels)
            self.heldout_fidelity = identity_fidelity(feats, labels, self.protos, self.proto_names)
        self.num_heldout = len(heldout)
        # the syn/real reference: held-out real images when there are (>= 2 of an identity), else training
        self.real_diversity = self.heldout_diversity or self.train_diversity

    def score(self, records: Sequence[IdentityRecord]) -> dict[str, Any]:
        """Fidelity, diversity (vs real), FID and KID of a synthetic set's records."""
        known = set(self.proto_names)
        records = [r for r in records if r.identity in known]
        if len(records) < 2:
            raise ValueError(
                f"a synthetic set needs >= 2 images of the judge's identities, got {len(records)}"
            )
        return self.score_images(
            load_images(records, self.image_size, self.channels), [r.identity for r in records]
        )

    def score_images(self, images: torch.Tensor, labels: Sequence[str]) -> dict[str, Any]:
        """:meth:`score` of images already in memory: (N, C, size, size) in [-1, 1] and their identities."""
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} identity labels")
        unknown = sorted(set(labels) - set(self.proto_names))
        if unknown:
            raise ValueError(f"identities unknown to the judge: {unknown[:5]}")
        if len(images) < 2:
            raise ValueError(f"scoring needs >= 2 images, got {len(images)}")
        labels = list(labels)
        feats = embed(self.extractor, images)
        diversity = intra_identity_distance(feats, labels)
        ratio = None
        if diversity is not None and self.real_diversity:
            ratio = diversity / self.real_diversity
        out: dict[str, Any] = {
            "num_images": len(labels),
            "num_identities": len(set(labels)),
            "fidelity": identity_fidelity(feats, labels, self.protos, self.proto_names),
            "median_rank": float(np.median(identity_ranks(feats, labels, self.protos, self.proto_names))),
            "num_prototypes": len(self.proto_names),
            "diversity": diversity,
            "real_diversity": self.real_diversity,
            "diversity_ratio": ratio,
            "reference": self.reference,
        }
        out.update(
            fid_kid(
                self.extractor,
                feats.shape[1],
                self.real_images,
                images,
                kid_subset_size=self.kid_subset_size,
            )
        )
        return out

    def verdicts(self, records: Sequence[IdentityRecord]) -> np.ndarray:
        """Per record: True when the judge's nearest prototype is the record's identity (False for
        identities the judge does not know)."""
        if not records:
            return np.zeros(0, dtype=bool)
        feats = embed(self.extractor, load_images(records, self.image_size, self.channels))
        unit = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        predicted = np.asarray(self.proto_names)[np.argmax(unit @ self.protos.T, axis=1)]
        return predicted == np.asarray([r.identity for r in records])

    def describe(self) -> dict[str, Any]:
        """Facts about the judge's reference (reported with the quality table)."""
        return {
            "num_real_images": len(self.real_labels),
            "num_identities": len(self.proto_names),
            "real_diversity": self.real_diversity,
            "real_fidelity": self.real_fidelity,
            "train_diversity": self.train_diversity,
            "num_heldout": self.num_heldout,
            "heldout_diversity": self.heldout_diversity,
            "heldout_fidelity": self.heldout_fidelity,
            "reference": self.reference,
        }

    @property
    def reference(self) -> str:
        """Which real images the syn/real spread ratio compares with: ``heldout`` or ``train``."""
        return "heldout" if self.heldout_diversity else "train"


def selection_precision(
    seen: Sequence[int], kept: Sequence[int], correct: Sequence[bool]
) -> dict[str, float]:
    """How well lookahead selection picked synthetic images, by the judge's verdicts.

    Per synthetic image i: ``seen[i]`` batches it was in, ``kept[i]`` of them in which selection kept it,
    ``correct[i]`` whether the judge assigns it to its intended identity. Returns ``kept_share`` (Σ kept /
    Σ seen), ``precision_kept`` (judge-correct share among kept samples, weighted by how often each was
    kept), ``precision_seen`` (the same among all samples selection saw) and ``gain`` (their difference:
    > 0 when selection prefers faithful samples).
    """
    seen_a, kept_a = np.asarray(seen, dtype=np.float64), np.asarray(kept, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if not (len(seen_a) == len(kept_a) == len(ok)):
        raise ValueError(f"seen, kept and correct differ in length: {len(seen_a)}, {len(kept_a)}, {len(ok)}")
    if (kept_a > seen_a).any() or (kept_a < 0).any():
        raise ValueError("kept counts must lie between 0 and the seen counts")
    if seen_a.sum() == 0:
        raise ValueError("selection saw no synthetic sample")
    out = {
        "kept_share": float(kept_a.sum() / seen_a.sum()),
        "precision_seen": float(seen_a @ ok / seen_a.sum()),
    }
    out["precision_kept"] = float(kept_a @ ok / kept_a.sum()) if kept_a.sum() else float("nan")
    out["gain"] = out["precision_kept"] - out["precision_seen"]
    return out


def nn_accuracy(
    gallery: np.ndarray, gallery_labels: Sequence[str], queries: np.ndarray, query_labels: Sequence[str]
) -> float:
    """Share of ``queries`` (N, D) whose nearest ``gallery`` row (M, D; Euclidean) has their label."""
    gallery, queries = np.asarray(gallery, dtype=np.float64), np.asarray(queries, dtype=np.float64)
    if len(gallery) != len(gallery_labels) or len(queries) != len(query_labels):
        raise ValueError("gallery / queries and their labels differ in length")
    if not len(gallery) or not len(queries):
        raise ValueError("nn_accuracy needs a non-empty gallery and queries")
    nearest = np.asarray(gallery_labels)[nearest_rows(gallery, queries)]
    return float(np.mean(nearest == np.asarray(query_labels)))


def nearest_rows(gallery: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index of each query's nearest ``gallery`` row (Euclidean, in float64)."""
    gallery, queries = np.asarray(gallery, dtype=np.float64), np.asarray(queries, dtype=np.float64)
    d2 = (queries**2).sum(1)[:, None] - 2 * queries @ gallery.T + (gallery**2).sum(1)[None, :]
    return np.argmin(d2, axis=1)


def coverage_gain(
    train: np.ndarray,
    train_labels: Sequence[str],
    extra: np.ndarray,
    extra_labels: Sequence[str],
    test: np.ndarray,
    test_labels: Sequence[str],
) -> dict[str, float]:
    """1-NN accuracy of the test rows with the training rows as the gallery (``before``), with the extra
    (synthetic) rows added under their labels (``after``), and the ``gain`` split in two: ``gained``, the
    share of test rows a right-label extra row became nearest to (wrong before, right after), and
    ``taken``, the share a wrong-label one took away (right before, wrong after); gain = gained - taken."""
    train, extra, test = (np.asarray(a, dtype=np.float64) for a in (train, extra, test))
    if len(train) != len(train_labels) or len(extra) != len(extra_labels) or len(test) != len(test_labels):
        raise ValueError("coverage_gain: rows and their labels differ in length")
    if not len(train) or not len(test):
        raise ValueError("coverage_gain needs training and test rows")
    truth = np.asarray(test_labels)
    right_before = np.asarray(train_labels)[nearest_rows(train, test)] == truth
    right_after = right_before
    if len(extra):
        gallery = np.concatenate([train, extra])
        right_after = np.asarray([*train_labels, *extra_labels])[nearest_rows(gallery, test)] == truth
    before, after = float(right_before.mean()), float(right_after.mean())
    return {
        "before": before,
        "after": after,
        "gain": after - before,
        "gained": float((right_after & ~right_before).mean()),
        "taken": float((right_before & ~right_after).mean()),
    }


def set_summary(card: dict[str, Any]) -> dict[str, Any]:
    """Reward component means and the privacy audit summary from a synthetic set's card.json.

    ``num_images``, ``num_flagged`` and ``fraction_flagged`` describe the set as it is: where the writer
    dropped the flagged images (``drop_near_copies``), they are counted in ``num_dropped`` (and
    ``fraction_dropped``, the share of the audited images) and no longer in the set's numbers.
    """
    rewards = {k: v.get("mean") for k, v in (card.get("reward_stats") or {}).items()}
    audit = card.get("audit") or {}
    nn_stats = audit.get("synthetic_nn", {})
    same = audit.get("baseline", {})
    summary = None
    if audit:
        audited, flagged = audit.get("num_images"), audit.get("num_flagged")
        dropped = audit["dropped"].get("count", 0) if isinstance(audit.get("dropped"), dict) else 0
        kept = flagged_kept = fraction = None
        if audited is not None and flagged is not None:
            kept, flagged_kept = audited - dropped, max(flagged - dropped, 0)
            fraction = flagged_kept / kept if kept else None
        summary = {
            "num_images": kept,
            "num_flagged": flagged_kept,
            "fraction_flagged": fraction if dropped else audit.get("fraction_flagged"),
            "num_dropped": dropped,
            "fraction_dropped": dropped / audited if audited else None,
            "pixel_nn_median": (nn_stats.get("pixel") or {}).get("q50"),
            "pixel_same_identity_median": ((same.get("pixel") or {}).get("same_identity") or {}).get("q50"),
            "feature_nn_median": (nn_stats.get("feature") or {}).get("q50"),
            "feature_same_identity_median": ((same.get("feature") or {}).get("same_identity") or {}).get(
                "q50"
            ),
        }
    return {"rewards": rewards, "audit": summary}


def records_summary(records: Sequence[IdentityRecord]) -> dict[str, Any]:
    """:func:`set_summary` of a subset of a set's records (a reward-filtered share): the reward component
    means and the near-copy share from the per-image manifest fields."""
    rewards = {}
    for key in ("sem", "cov", "exp", "total"):
        values = [float(r.extra[key]) for r in records if r.extra.get(key) is not None]
        if values:
            rewards[key] = float(np.mean(values))
    flags = [bool(r.extra["near_copy"]) for r in records if "near_copy" in r.extra]
    audit = {"num_images": len(flags), "fraction_flagged": float(np.mean(flags))} if flags else None
    return {"rewards": rewards, "audit": audit}
