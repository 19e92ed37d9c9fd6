"""The loaders of the face task of :class:`~rgsd_lightning.data.datamodule.IdentityDataModule`:
P x K training batches (shared with ReID) and the verification sets (+ closed-set identification).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import DataLoader

from rgsd_lightning.data.datasets import ImageListDataset, RecordDataset
from rgsd_lightning.data.pairs import (
    VerificationPairs,
    load_pairs,
    make_pairs,
    read_pairs_txt,
    read_rfw_groups,
    read_verification_bin,
)
from rgsd_lightning.data.recognizer_loaders import RecognizerLoaders
from rgsd_lightning.data.records import IdentityRecord
from rgsd_lightning.data.transforms import face_transform


@dataclass
class VerificationSpec:
    """A face verification set for validation/test.

    Attributes:
        kind: "auto" (balanced pairs built from the test split, fixed by ``seed``), "bin" (insightface
            .bin file), "pairs" (a pair list saved by ``pairs.save_pairs``), "lfw" (LFW pairs.txt over
            an identity-folder ``root``) or "rfw" (RFW group folders under ``root``: one set per group).
        path: the .bin / pairs / pairs.txt file.
        root: image root for "lfw" and "rfw".
        name: display name (defaults to the file stem / "auto").
        num_pairs: number of pairs for "auto".
        seed: seed for "auto".
    """

    kind: Literal["auto", "bin", "pairs", "lfw", "rfw"] = "auto"
    path: str | None = None
    root: str | None = None
    name: str | None = None
    num_pairs: int = 600
    seed: int = 0


def build_verification_sets(
    specs: Sequence[VerificationSpec | Mapping[str, Any]] | None,
    test: list[IdentityRecord],
    dataset: str,
) -> list[VerificationPairs]:
    """The verification sets of ``specs`` (None: one "auto" set).

    Args:
        specs: the sets (dataclasses or mappings of their fields).
        test: the dataset's test split ("auto" pairs are drawn from it).
        dataset: the dataset root, named in errors.
    """
    if specs is None:
        specs = [VerificationSpec(kind="auto")]
    sets: list[VerificationPairs] = []
    for spec in specs:
        spec = spec if isinstance(spec, VerificationSpec) else VerificationSpec(**spec)
        if spec.kind == "auto":
            if not test:
                raise ValueError(
                    f"verification kind 'auto' needs a test split in {dataset!r} "
                    "(set train_per_identity for identity folders)"
                )
            sets.append(make_pairs(test, num_pairs=spec.num_pairs, seed=spec.seed, name=spec.name or "auto"))
        elif spec.kind == "bin":
            sets.append(read_verification_bin(_required(spec.path, "path", spec), name=spec.name))
        elif spec.kind == "pairs":
            sets.append(load_pairs(_required(spec.path, "path", spec)))
        elif spec.kind == "lfw":
            path, root = _required(spec.path, "path", spec), _required(spec.root, "root", spec)
            sets.append(read_pairs_txt(path, root, name=spec.name))
        elif spec.kind == "rfw":
            sets += list(read_rfw_groups(_required(spec.root, "root", spec)).values())
        else:
            raise ValueError(f"unknown verification kind {spec.kind!r}")
    return sets


def _required(value: str | None, field: str, spec: VerificationSpec) -> str:
    if not value:
        raise ValueError(f"verification set of kind {spec.kind!r} needs '{field}'")
    return value


class FaceLoaders(RecognizerLoaders):
    """``task="face"``: P x K training batches; one loader per verification set, then "identification"
    (held-out images of the training identities) when the dataset has a test split."""

    def __init__(self, dm) -> None:
        super().__init__(dm)
        self.verification_sets: list[VerificationPairs] = []

    def setup(self) -> None:
        if not self.verification_sets:
            dm = self.dm
            self.verification_sets = build_verification_sets(
                dm.hparams.verification, dm.split_records("test"), dm.root
            )

    def transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        hp = self.dm.hparams
        return face_transform(
            hp.face_size,
            train=train,
            flip=hp.flip,
            channels=hp.channels,
            random_erasing=hp.random_erasing,
            erasing_fill=hp.erasing_fill,
            photometric=hp.photometric,
        )

    def preprocessing(self) -> dict[str, Any]:
        size = self.dm.hparams.face_size
        return {"input_size": [size, size], "mean": [0.5] * 3, "std": [0.5] * 3}

    def val_dataloader(self) -> list[DataLoader]:
        self.setup()
        dm = self.dm
        transform = self.transform(False)
        loaders, names = [], []
        for vs in self.verification_sets:
            loaders.append(dm.make_loader(ImageListDataset(vs.images, transform, dm.mode, name=vs.name)))
            names.append(vs.name)
        test = [r for r in dm.split_records("test") if r.identity in dm.label_of]
        if test:  # closed-set identification of held-out images of the training identities
            ds = RecordDataset(test, transform, label_of=dm.label_of, mode=dm.mode, kind="classify")
            loaders.append(dm.make_loader(ds))
            names.append("identification")
        self.val_names = names
        return loaders
