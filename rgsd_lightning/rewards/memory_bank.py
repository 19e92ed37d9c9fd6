"""The memory bank: per-identity reference features of the real training images (paper §4.2.1).

The bank is data, not a metric state: two persistent buffers (``features`` L2-normalised, ``identities``)
that travel with the module (device moves, checkpoints) and are identical on every rank, so they are never
synchronised. Prototypes, median-heuristic bandwidths and reference spreads are computed on first use and
cached until the buffers change (re-assignment, in-place edit, device/dtype move, ``load_state_dict``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rgsd_lightning.rewards import functional as RF


class MemoryBank(nn.Module):
    """Per-identity reference features: persistent buffers ``features`` (M, D) and ``identities`` (M,).

    Args:
        features: (M, D) reference features (normalised here; M may be 0 for a placeholder that a
            checkpoint fills).
        identities: (M,) identity index of each row, in ``[0, num_identities)``.
        num_identities: N, the number of identities of the generator's label space.
    """

    features: Tensor
    identities: Tensor

    def __init__(self, features: Tensor, identities: Tensor, num_identities: int) -> None:
        super().__init__()
        if int(num_identities) < 1:
            raise ValueError(f"num_identities must be >= 1, got {num_identities}")
        self.num_identities = int(num_identities)
        RF._check_matrix(features, "memory bank features")
        RF._check_labels(identities, features.shape[0], "memory bank identities", "memory bank features")
        RF._check_identity_range(identities, self.num_identities, "memory bank identities")
        dtype = features.dtype if features.is_floating_point() else torch.float32
        feats = RF.l2_normalize(features.detach().to(dtype)).clone()
        self.register_buffer("features", feats)
        self.register_buffer(
            "identities", identities.detach().to(device=feats.device, dtype=torch.long).clone()
        )
        self._cache: dict[str, Tensor] = {}
        self._cache_key: tuple[Any, ...] | None = None

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    @torch.no_grad()
    def from_extractor(
        cls,
        extractor: nn.Module,
        dataloader: Iterable[Any],
        num_identities: int,
        device: torch.device | str | None = None,
    ) -> MemoryBank:
        """Build a bank by running a feature extractor over real images, under no_grad in eval mode.

        Args:
            extractor: any module mapping an image batch to (B, D) features; its train/eval mode is restored.
            dataloader: iterable of batches ``{"image": (B, C, H, W), "label": (B,)}`` or ``(image, label)``.
            num_identities: N, the number of identities.
            device: where to run the extractor; default = the device of its first parameter (else CPU).
        """
        if device is None:
            param = next(iter(extractor.parameters()), None)
            device = param.device if param is not None else torch.device("cpu")
        was_training = extractor.training
        extractor.eval()
        feats, labels = [], []
        try:
            for i, batch in enumerate(dataloader):
                image, label = _unpack(batch, i)
                out = extractor(image.to(device))
                if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != image.shape[0]:
                    got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ValueError(
                        f"the feature extractor must return a (B, D) tensor; batch {i} of {image.shape[0]} "
                        f"images gave {got}"
                    )
                if not bool(torch.isfinite(out).all()):
                    raise ValueError(f"the feature extractor gave NaN or inf features for batch {i}")
                label = torch.as_tensor(label)
                if label.is_floating_point() or label.dtype == torch.bool:
                    raise ValueError(
                        f"batch {i}: labels must be integer identity indices, got dtype {label.dtype} "
                        "(a float label would be truncated)"
                    )
                feats.append(out.float().cpu())
                labels.append(label.long().cpu())
        finally:
            extractor.train(was_training)
        if not feats:
            raise ValueError("the dataloader gave no batches: cannot build a memory bank")
        return cls(torch.cat(feats), torch.cat(labels), num_identities)

    # --------------------------------------------------------------------------------------- queries
    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def counts(self) -> Tensor:
        """(N,) number of bank features of each identity."""
        return self._cached("counts", lambda: torch.bincount(self.identities, minlength=self.num_identities))

    def prototypes(self) -> Tensor:
        """(N, D) normalised mean feature of each identity (Eq. 2); a zero row for an identity without any."""
        return self._cached(
            "prototypes", lambda: RF.prototypes(self.features, self.identities, self.num_identities)
        )

    def bandwidths(self) -> Tensor:
        """(N,) RBF bandwidth of each identity, median heuristic (see ``functional.median_bandwidth``)."""
        return self._cached(
            "bandwidths", lambda: RF.median_bandwidth(self.features, self.identities, self.num_identities)
        )

    def spread(self) -> Tensor:
        """(N,) reference spread S_r (covariance trace) of each identity; 0 with fewer than two features."""
        return self._cached(
            "spread", lambda: RF.reference_spread(self.features, self.identities, self.num_identities)
        )

    def floored_tau(self, floor: float) -> Tensor:
        """(N,) expansion scale ``max(S_r, floor * median S_r)`` per identity (``functional.floored_tau``)."""
        return self._cached(
            f"floored_tau_{float(floor)!r}", lambda: RF.floored_tau(self.spread(), self.counts(), floor)
        )

    def check_covers(self, identities: Tensor | Sequence[int]) -> None:
        """Raise ValueError unless every identity in ``identities`` has at least one bank feature.

        Args:
            identities: identity indices (tensor or sequence of ints).
        """
        ids = torch.as_tensor(identities)
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"identities must be integer identity indices, got dtype {ids.dtype}")
        ids = ids.long().flatten().cpu()
        if ids.numel() == 0:
            return
        RF._check_identity_range(ids, self.num_identities, "identities")
        counts = self.counts().cpu()
        for y in torch.unique(ids).tolist():
            if int(counts[y]) == 0:
                raise ValueError(f"identity {y} has no entries in the memory bank")

    def extra_repr(self) -> str:
        return f"size={len(self)}, dim={self.dim}, num_identities={self.num_identities}"

    # ------------------------------------------------------------------------------------- the cache
    def _key(self) -> tuple[Any, ...]:
        f, i = self.features, self.identities
        return (weakref.ref(f), f._version, weakref.ref(i), i._version, self.num_identities)

    def _cached(self, name: str, fn: Any) -> Tensor:
        key = self._key()
        old = self._cache_key
        valid = (
            old is not None
            and old[0]() is self.features
            and old[2]() is self.identities
            and old[1::2] == key[1::2]
        )
        if not valid:
            self._cache, self._cache_key = {}, key
        if name not in self._cache:
            self._cache[name] = fn()
        return self._cache[name]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # the cache holds weak references, which do not pickle
        state["_cache"], state["_cache_key"] = {}, None
        return state

    # ---------------------------------------------------------------------------------- checkpoints
    def get_extra_state(self) -> dict[str, int]:
        """Saved beside the buffers: the size of the label space."""
        return {"num_identities": self.num_identities}

    def set_extra_state(self, state: Any) -> None:
        """Check the checkpoint's label space matches this bank's."""
        n = int(state["num_identities"]) if isinstance(state, Mapping) else int(state)
        if n != self.num_identities:
            raise ValueError(
                f"memory bank checkpoint has num_identities={n} but this bank has {self.num_identities}"
            )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        feats = state_dict.get(prefix + "features")
        ids = state_dict.get(prefix + "identities")
        if isinstance(feats, Tensor):
            if feats.dim() != 2 or feats.shape[1] != self.dim:
                raise ValueError(
                    f"memory bank checkpoint '{prefix}features' has shape {tuple(feats.shape)} but this bank "
                    f"has feature dimension {self.dim}"
                )
            if isinstance(ids, Tensor) and ids.shape != feats.shape[:1]:
                raise ValueError(
                    f"memory bank checkpoint has {feats.shape[0]} features but {ids.numel()} identities"
                )
            if isinstance(ids, Tensor):
                RF._check_identity_range(
                    ids, self.num_identities, f"memory bank checkpoint '{prefix}identities'"
                )
            # a bank of another size M: resize the buffers so the copy below fits
            self.features = self.features.new_empty(feats.shape)
            self.identities = self.identities.new_empty(feats.shape[:1])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._cache, self._cache_key = {}, None


def _unpack(batch: Any, index: int) -> tuple[Tensor, Any]:
    if isinstance(batch, Mapping):
        if "image" not in batch or "label" not in batch:
            raise ValueError(f"batch {index} must have the keys 'image' and 'label', got {sorted(batch)}")
        return batch["image"], batch["label"]
    if isinstance(batch, Sequence) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"batch {index} must be a dict with 'image' and 'label' or an (image, label) pair")
