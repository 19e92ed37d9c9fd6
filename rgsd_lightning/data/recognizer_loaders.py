"""The loaders of the recognizer tasks of :class:`~rgsd_lightning.data.datamodule.IdentityDataModule`:
what ReID and faces share (P x K training batches of real + synthetic images) and the ReID evaluation.

The face task's verification sets are in :mod:`rgsd_lightning.data.face_loaders`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from rgsd_lightning.data.datasets import RecordDataset
from rgsd_lightning.data.samplers import PKBatchSampler
from rgsd_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, reid_transform

if TYPE_CHECKING:
    from rgsd_lightning.data.datamodule import IdentityDataModule


class RecognizerLoaders:
    """Base of the recognizer tasks: P x K identity batches of the real and synthetic training images.

    Subclasses give the recognizer's transform and preprocessing and the evaluation loaders.

    Args:
        dm: the datamodule (records, label map, sharded loader factory).
    """

    def __init__(self, dm: IdentityDataModule) -> None:
        self.dm = dm
        self.val_names: list[str] = []

    def setup(self) -> None:
        """Nothing to prepare (subclasses may build evaluation sets)."""

    def transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        """The recognizer's input transform (augmented in training)."""
        raise NotImplementedError

    def preprocessing(self) -> dict[str, Any]:
        """Input geometry and normalisation of the recognizer (what its export records)."""
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        dm, hp = self.dm, self.dm.hparams
        records = dm.training_records()
        ds = RecordDataset(
            records, self.transform(True), label_of=dm.label_of, mode=dm.mode, synthetic_seed=hp.seed
        )
        rank, world = dm.rank_world()
        sampler = PKBatchSampler(
            [dm.label_of[r.identity] for r in records],
            hp.p,
            hp.k,
            is_synthetic=[r.source == "synthetic" for r in records],
            synthetic_fraction=hp.synthetic_fraction if dm.synthetic_records else 0.0,
            synthetic_slots=hp.synthetic_slots,
            batches_per_epoch=hp.batches_per_epoch,
            seed=hp.seed,
            rank=rank,
            world_size=world,
        )
        return dm.make_loader(ds, batch_sampler=sampler)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        raise NotImplementedError


class ReIDLoaders(RecognizerLoaders):
    """``task="reid"``: P x K training batches; query + gallery evaluation (mAP / CMC)."""

    def transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        hp = self.dm.hparams
        return reid_transform(
            hp.height,
            hp.width,
            train=train,
            flip=hp.flip,
            pad=hp.pad,
            random_erasing=hp.random_erasing,
            erasing_fill=hp.erasing_fill,
            photometric=hp.photometric,
            channels=hp.channels,
        )

    def preprocessing(self) -> dict[str, Any]:
        hp = self.dm.hparams
        return {"input_size": [hp.height, hp.width], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

    def val_dataloader(self) -> DataLoader:
        dm = self.dm
        query, gallery = dm.split_records("query"), dm.split_records("gallery")
        if not query or not gallery:
            raise ValueError(f"dataset {dm.root!r} has no query/gallery split for ReID evaluation")
        names = sorted({r.identity for r in query + gallery})
        pid_of = {name: i for i, name in enumerate(names)}
        ds = RecordDataset(
            query + gallery, self.transform(False), mode=dm.mode, kind="reid_eval", pid_of=pid_of
        )
        self.val_names = ["query_gallery"]
        return dm.make_loader(ds)
