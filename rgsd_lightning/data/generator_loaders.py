"""The loaders of the generator-side tasks of :class:`~rgsd_lightning.data.datamodule.IdentityDataModule`.

* ``task="generator"`` (cold start): square images + label, shuffled; held-out images for the val loss;
* ``task="rl"``: P distinct identity labels per step (one RL rollout), different identities on every rank;
  no validation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import DataLoader

from rgsd_lightning.data.datasets import IdentityLabels, RecordDataset
from rgsd_lightning.data.records import IdentityRecord, by_identity
from rgsd_lightning.data.samplers import PKBatchSampler

if TYPE_CHECKING:
    from rgsd_lightning.data.datamodule import IdentityDataModule


class GeneratorLoaders:
    """``task="generator"``: the denoising loss's training images and held-out images.

    Args:
        dm: the datamodule (records, label map, transforms, sharded loader factory).
    """

    def __init__(self, dm: IdentityDataModule) -> None:
        self.dm = dm
        self.val_names: list[str] = []

    def setup(self) -> None:
        """Nothing to prepare."""

    def split(self) -> tuple[list[IdentityRecord], list[IdentityRecord]]:
        """(train, held-out): the test split's images of training identities, or else
        ``generator_val_fraction`` of each identity's training images (identities with one image keep it)."""
        dm = self.dm
        held = [r for r in dm.split_records("test") if r.identity in dm.label_of]
        if held:
            return dm.train_records, held
        frac = dm.hparams.generator_val_fraction
        rng = np.random.default_rng(dm.hparams.seed + 1)
        train, val = [], []
        by_id = by_identity(dm.train_records)
        for name in sorted(by_id):
            group = by_id[name]
            n_val = int(round(len(group) * frac)) if len(group) > 1 else 0
            order = rng.permutation(len(group))
            val += [group[i] for i in order[:n_val]]
            train += [group[i] for i in sorted(order[n_val:])]
        return train, val

    def _dataset(self, records: list[IdentityRecord], train: bool) -> RecordDataset:
        dm = self.dm
        transform = dm.generator_transform(train)
        return RecordDataset(records, transform, label_of=dm.label_of, mode=dm.mode, kind="generator")

    def train_dataloader(self) -> DataLoader:
        train, _ = self.split()
        return self.dm.make_loader(self._dataset(train, True), shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        _, val = self.split()
        if not val:
            return []
        self.val_names = ["heldout"]
        return self.dm.make_loader(self._dataset(val, False))


class RLLoaders:
    """``task="rl"``: P identity labels per step (the rollout's identities), no validation.

    Args:
        dm: the datamodule.
    """

    def __init__(self, dm: IdentityDataModule) -> None:
        self.dm = dm
        self.val_names: list[str] = []

    def setup(self) -> None:
        """Nothing to prepare."""

    def train_dataloader(self) -> DataLoader:
        dm, hp = self.dm, self.dm.hparams
        labels = list(range(dm.num_identities))
        rank, world = dm.rank_world()
        sampler = PKBatchSampler(
            labels,
            min(hp.p, len(labels)),
            1,
            batches_per_epoch=hp.batches_per_epoch or 1,
            seed=hp.seed,
            rank=rank,
            world_size=world,
        )
        return dm.make_loader(IdentityLabels(dm.identities), batch_sampler=sampler)

    def val_dataloader(self) -> list:
        return []
