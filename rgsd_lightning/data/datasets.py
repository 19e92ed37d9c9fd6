"""Map-style datasets over identity records, verification sets and generation requests.

Every item is a dict, so batches are dicts of tensors (and lists of strings) that all stages read by key:

* generator training: ``image`` (C, S, S) in [-1, 1], ``label`` (identity index);
* recognizer training: ``image``, ``label``, ``is_synthetic``, ``camera``, ``index``;
* ReID evaluation: ``image``, ``pid`` (evaluation id), ``camera``, ``is_query``;
* verification: ``image``, ``index`` (position in the set's image list);
* generation requests: ``label``, ``seed``, ``identity``, ``request`` (running number);
* RL rollouts: ``label``, ``identity`` (one item per identity).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from rgsd_lightning.data.images import BadImageError, load_image
from rgsd_lightning.data.records import IdentityRecord


class RecordDataset(Dataset):
    """Images of identity records, decoded on access.

    Args:
        records: the records to serve.
        transform: PIL image -> tensor.
        label_of: identity name -> training label index (None: no ``label`` key).
        mode: PIL mode to decode to ("RGB" or "L").
        kind: which keys to emit: "generator", "train", "reid_eval" or "classify".
        pid_of: identity name -> evaluation id (``reid_eval`` only).
        synthetic_seed: when given, synthetic records are transformed on their own random stream (seeded by
            it and the loader worker's seed), leaving torch's global generator to the real records: their
            augmentations are then those of a real-only run that sees the same real images in the same
            order (common random numbers with the sampler's separate synthetic stream). None: one stream.
    """

    def __init__(
        self,
        records: Sequence[IdentityRecord],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        label_of: Mapping[str, int] | None = None,
        mode: str = "RGB",
        kind: str = "train",
        pid_of: Mapping[str, int] | None = None,
        synthetic_seed: int | None = None,
    ) -> None:
        self.records = list(records)
        self.synthetic_seed = synthetic_seed
        self._synthetic_rng: tuple[int | None, torch.Generator] | None = None  # (worker seed, generator)
        self.transform = transform
        self.label_of = label_of
        self.mode = mode
        self.kind = kind
        self.pid_of = pid_of
        if kind in ("generator", "train", "classify") and label_of is not None:
            unknown = sorted({r.identity for r in self.records} - set(label_of))
            if unknown:
                raise ValueError(f"records name identities outside the label space: {unknown[:10]}")

    def __len__(self) -> int:
        return len(self.records)

    def _transform_apart(self, image: Image.Image) -> torch.Tensor:
        """``transform(image)`` on this dataset's synthetic stream; torch's global generator is untouched."""
        info = get_worker_info()
        worker_seed = None if info is None else info.seed
        if self._synthetic_rng is None or self._synthetic_rng[0] != worker_seed:
            entropy = [self.synthetic_seed] + ([] if worker_seed is None else [worker_seed])
            seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)
            self._synthetic_rng = (worker_seed, torch.Generator().manual_seed(seed))
        seed = int(torch.randint(0, 2**62, (), generator=self._synthetic_rng[1]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        image = load_image(rec.path, self.mode)
        if self.synthetic_seed is not None and rec.source == "synthetic":
            image = self._transform_apart(image)
        else:
            image = self.transform(image)
        if self.kind == "reid_eval":
            assert self.pid_of is not None
            return {
                "image": image,
                "pid": self.pid_of[rec.identity],
                "camera": rec.camera,
                "is_query": rec.split == "query",
            }
        item = {"image": image}
        if self.label_of is not None:
            item["label"] = self.label_of[rec.identity]
        if self.kind == "train":
            item.update(is_synthetic=rec.source == "synthetic", camera=rec.camera, index=i)
        return item


class ImageListDataset(Dataset):
    """Images given as paths or encoded bytes (a verification set's image list).

    Args:
        images: paths or encoded image bytes.
        transform: PIL image -> tensor.
        mode: PIL mode to decode to.
        name: the set's name, for error messages.
    """

    def __init__(
        self,
        images: Sequence[str | bytes],
        transform: Callable[[Image.Image], torch.Tensor],
        mode: str = "RGB",
        name: str = "images",
    ) -> None:
        self.images, self.transform, self.mode, self.name = list(images), transform, mode, name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        source = self.images[i]
        label = f"{self.name}[{i}]" if isinstance(source, bytes | bytearray) else None
        return {"image": self.transform(load_image(source, self.mode, name=label)), "index": i}


class IdentityLabels(Dataset):
    """One item per identity (``label``, ``identity``): what an RL rollout step draws from."""

    def __init__(self, identities: Sequence[str]) -> None:
        self.identities = list(identities)

    def __len__(self) -> int:
        return len(self.identities)

    def __getitem__(self, i: int) -> dict:
        return {"label": i, "identity": self.identities[i]}


@dataclass(frozen=True)
class GenerationRequest:
    """One image to generate: identity name, its label index, the seed and a running number."""

    identity: str
    label: int
    seed: int
    request: int


def request_seed(base_seed: int, identity: str, n: int) -> int:
    """A stable per-image seed: the same (base seed, identity, n) always gives the same image."""
    return zlib.crc32(f"{base_seed}:{identity}:{n}".encode()) & 0x7FFFFFFF


def make_requests(
    identities: Sequence[str],
    label_of: Mapping[str, int],
    per_identity: int,
    base_seed: int = 0,
) -> list[GenerationRequest]:
    """``per_identity`` requests for each identity, seeds from :func:`request_seed`."""
    unknown = [i for i in identities if i not in label_of]
    if unknown:
        raise ValueError(f"cannot generate unknown identities {unknown[:10]}")
    out = []
    for identity in identities:
        for n in range(per_identity):
            out.append(
                GenerationRequest(
                    identity, label_of[identity], request_seed(base_seed, identity, n), len(out)
                )
            )
    return out


class RequestDataset(Dataset):
    """Generation requests as items (``label``, ``seed``, ``identity``, ``request``)."""

    def __init__(self, requests: Sequence[GenerationRequest]) -> None:
        self.requests = list(requests)

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> dict:
        r = self.requests[i]
        return {"label": r.label, "seed": r.seed, "identity": r.identity, "request": r.request}


def filter_decodable(
    records: Sequence[IdentityRecord], mode: str = "RGB"
) -> tuple[list, list[BadImageError]]:
    """Split records into those whose image decodes and the errors of those that do not."""
    good, bad = [], []
    for rec in records:
        try:
            load_image(rec.path, mode)
            good.append(rec)
        except BadImageError as err:
            bad.append(err)
    return good, bad
