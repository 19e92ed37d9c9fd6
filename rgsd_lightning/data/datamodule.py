"""IdentityDataModule: one LightningDataModule for every stage.

It parses a real dataset (any parser in ``sources``, or the embedded toy identities) in its constructor -
file names only, no decoding - so ``num_identities`` is known before the model is built and the CLI can
link it. Synthetic sets (manifests written by generation) join the real training records with a
``source`` flag. The train / val / test loaders depend on ``task`` and are built by a small helper per task:

=============  ===========================================  ================================  ================
task           train                                        val / test                        helper
=============  ===========================================  ================================  ================
``generator``  square images + label (shuffled)             held-out images (denoising loss)  GeneratorLoaders
``rl``         P identity labels per step (the RL rollout)  none                              RLLoaders
``reid``       P x K identity batches, real + synthetic     query + gallery (mAP / CMC)       ReIDLoaders
``face``       P x K identity batches, real + synthetic     verification + identification    FaceLoaders
=============  ===========================================  ================================  ================

(:mod:`.generator_loaders`, :mod:`.recognizer_loaders`, :mod:`.face_loaders`). ``predict`` always serves
generation requests (identity, seed); the reward's reference loader is the same for every task. Under DDP
every loader is sharded here (:meth:`IdentityDataModule.make_loader`), per rank, without padding (the
trainer runs with ``use_distributed_sampler=False``, which the CLI sets).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, DistributedSampler, Subset

from rgsd_lightning.data import sources, toy
from rgsd_lightning.data.datasets import (
    GenerationRequest,
    RecordDataset,
    RequestDataset,
    filter_decodable,
    make_requests,
)
from rgsd_lightning.data.face_loaders import FaceLoaders, VerificationSpec
from rgsd_lightning.data.generator_loaders import GeneratorLoaders, RLLoaders
from rgsd_lightning.data.listing import name_excluded
from rgsd_lightning.data.pairs import VerificationPairs
from rgsd_lightning.data.recognizer_loaders import RecognizerLoaders, ReIDLoaders
from rgsd_lightning.data.records import IdentityRecord, by_identity, read_manifest
from rgsd_lightning.data.samplers import check_synthetic_slots
from rgsd_lightning.data.synthetic_set import best_per_identity, manifest_path
from rgsd_lightning.data.transforms import ERASING_FILLS, ErasingFill, generator_transform
from rgsd_lightning.io import atomic_write_json, run_dir

log = logging.getLogger(__name__)

DatasetFormat = Literal[
    "toy_market", "toy_faces", "market1501", "cuhk03np", "identity_folders", "unlabelled", "manifest"
]


TASKS = {"generator": GeneratorLoaders, "rl": RLLoaders, "reid": ReIDLoaders, "face": FaceLoaders}
"""The loader helper of each task."""


# a ``synthetic`` entry: the real training images in the synthetic slots (a control)
REAL_CONTROL = "@real"


class IdentityDataModule(L.LightningDataModule):
    """Real identity data (+ optional synthetic sets) for generator, ReID and face stages.

    Args:
        root: dataset folder (toy formats: where the toy data is written if missing).
        format: dataset layout; see ``sources`` for each parser.
        task: which train/val loaders to serve: "generator", "reid", "face" or "rl" (identity labels for
            RL rollouts: P distinct identities per step, different identities on every rank).
        cuhk03_variant: "labeled" or "detected" (required for ``cuhk03np``).
        train_per_identity: identity folders: the first k images of each identity train, the rest test.
        split_seed: identity folders: draw the k train images at random with this seed instead.
        max_train_per_identity: keep at most this many real training images per identity (few-shot).
        exclude: file-name patterns (fnmatch) of real images to leave out, e.g. ``["*_Ambient*"]`` for Yale B;
            identity folders whose every image is left out are left out (``"yaleB2*"``: split identities).
        synthetic: synthetic sets to mix into training (folders holding manifest.jsonl, or manifest files).
            The entry ``"@real"`` (``REAL_CONTROL``) fills the synthetic slots with the real training images
            themselves: the control row that separates what the batch composition does from what the
            synthetic images do.
        synthetic_fraction: share of each identity's K slots filled with synthetic images.
        synthetic_slots: "replace" (those slots are taken from the K real ones) or "add" (they come on top
            of K real images: batches of P x (K + round(K * synthetic_fraction)), the real images of a
            real-only run). Recognizer tasks only.
        synthetic_identity_map: renames synthetic identities onto real ones (e.g. an imported set).
        unknown_synthetic: what to do with synthetic records of identities outside the real label space.
        synthetic_keep: share of each identity's synthetic images kept, the ones ranked highest by
            ``synthetic_rank_by`` (1: all). A reward filter (best-of-N) before training and selection.
        synthetic_rank_by: manifest column ranking the synthetic images (``sem``: the semantic-consistency
            reward in the reward extractor's space; ``total``: the composite reward).
        image_size: generator input side.
        channels: image channels for every task (3 = RGB, 1 = grayscale).
        square: generator squaring of non-square images ("stretch" or "pad").
        height: ReID input height.
        width: ReID input width.
        face_size: face recognizer input side.
        flip: random horizontal flip in training.
        pad: ReID pad-crop padding in training.
        random_erasing: Random Erasing probability for recognizer training (the real-augmentation baseline).
        erasing_fill: what Random Erasing writes into its box: "random" (per-pixel noise) or "mean" (the
            normalisation's mean pixel; ``transforms.random_erasing_step``).
        photometric: strength of the photometric jitter in recognizer training (gamma, brightness, contrast;
            ``transforms.PhotometricJitter``; 0: none), the real-only baseline for lighting changes.
        batch_size: batch size of generator training and of every evaluation/predict loader.
        p: identities per recognizer training batch (and per RL rollout).
        k: images per identity in a recognizer training batch.
        batches_per_epoch: recognizer batches per epoch (None: about one pass over the real images).
        generator_val_fraction: generator task: share of each identity's images held out for the val loss
            when the dataset has no test split (identities with one image keep it for training).
        verification: face task: the verification sets (``face_loaders.VerificationSpec``; default: one "auto"
            set from the test split).
        generate_per_identity: predict: images to generate per identity.
        generate_seed: predict: base seed of the per-image seeds.
        generate_identities: predict: only these identities (default: all).
        toy: toy formats: keyword arguments of ``toy.make_toy_market`` / ``toy.make_toy_faces``; None uses
            the toy data already at ``root`` or writes the defaults there.
        on_bad_image: "error" raises on the first unreadable image (naming it); "skip" decodes every image
            once at setup, drops the unreadable ones and reports how many.
        num_workers: DataLoader workers.
        pin_memory: DataLoader pin_memory.
        seed: seed of shuffling, P x K sampling and few-shot selection.
    """

    def __init__(
        self,
        root: str = "runs/data/toy_market",
        format: DatasetFormat = "toy_market",
        task: Literal["generator", "reid", "face", "rl"] = "reid",
        cuhk03_variant: Literal["labeled", "detected"] | None = None,
        train_per_identity: int | None = None,
        split_seed: int | None = None,
        max_train_per_identity: int | None = None,
        exclude: list[str] | None = None,
        synthetic: list[str] | None = None,
        synthetic_fraction: float = 0.25,
        synthetic_slots: Literal["replace", "add"] = "replace",
        synthetic_identity_map: dict[str, str] | None = None,
        unknown_synthetic: Literal["error", "drop"] = "error",
        synthetic_keep: float = 1.0,
        synthetic_rank_by: str = "sem",
        image_size: int = 32,
        channels: int = 3,
        square: Literal["stretch", "pad"] = "stretch",
        height: int = 256,
        width: int = 128,
        face_size: int = 112,
        flip: bool = True,
        pad: int = 10,
        random_erasing: float = 0.0,
        erasing_fill: ErasingFill = "random",
        photometric: float = 0.0,
        batch_size: int = 32,
        p: int = 16,
        k: int = 4,
        batches_per_epoch: int | None = None,
        generator_val_fraction: float = 0.1,
        verification: list[VerificationSpec] | None = None,
        generate_per_identity: int = 8,
        generate_seed: int = 0,
        generate_identities: list[str] | None = None,
        toy: dict | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["verification"])  # this __init__'s other arguments
        specs = None if verification is None else [_spec_dict(v) for v in verification]
        self.save_hyperparameters({"verification": specs})  # plain dicts: checkpoints stay weights-only
        if task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if not photometric >= 0:
            raise ValueError(f"photometric must be a strength >= 0, got {photometric}")
        if not 0 <= random_erasing <= 1:
            raise ValueError(f"random_erasing must be a probability in [0, 1], got {random_erasing}")
        if erasing_fill not in ERASING_FILLS:
            raise ValueError(f"erasing_fill must be one of {ERASING_FILLS}, got {erasing_fill!r}")
        check_synthetic_slots(synthetic_slots)
        if format == "cuhk03np" and cuhk03_variant is None:
            raise ValueError("format 'cuhk03np' needs cuhk03_variant: 'labeled' or 'detected'")
        self.root = root
        self.format = format
        self.task = task
        self.mode = "L" if channels == 1 else "RGB"
        self.skipped_images: list[str] = []
        self._splits = self._read_real()
        train = self._splits.get("train", [])
        if not train:
            raise ValueError(f"dataset {root!r} ({format}) has no training images")
        self.identities: list[str] = sorted({r.identity for r in train})
        self.label_of = {name: i for i, name in enumerate(self.identities)}
        self.train_records = self._few_shot(train)
        self.synthetic_records = self._read_synthetic()
        self.task_loaders = TASKS[task](self)
        # (identity, seed) pairs a resumed generation already wrote; set by SyntheticSetWriter.setup
        self.completed_requests: set[tuple[str, int]] = set()

    # ------------------------------------------------------------------ parsing (cheap, in __init__)
    @property
    def num_identities(self) -> int:
        """Number of identities in the training label space (linked into the models by the CLI)."""
        return len(self.identities)

    def _read_real(self) -> dict[str, list[IdentityRecord]]:
        splits = self._parse_real()
        patterns = self.hparams.exclude or []
        if patterns:
            splits = {k: [r for r in v if not name_excluded(r.path, patterns)] for k, v in splits.items()}
        return splits

    def _parse_real(self) -> dict[str, list[IdentityRecord]]:
        hp, root = self.hparams, self.root
        fmt = self.format
        if fmt == "toy_market":
            self._ensure_toy(toy.make_toy_market)
            return sources.read_market1501(root)
        if fmt == "market1501":
            return sources.read_market1501(root)
        if fmt == "cuhk03np":
            return sources.read_cuhk03np(root, hp.cuhk03_variant)
        if fmt in ("toy_faces", "identity_folders"):
            if fmt == "toy_faces":
                self._ensure_toy(toy.make_toy_faces)
            records = sources.read_identity_folders(
                root,
                train_per_identity=hp.train_per_identity,
                seed=hp.split_seed,
                exclude=(lambda name: name_excluded(name, hp.exclude)) if hp.exclude else None,
            )
            return _group_by_split(records)
        if fmt == "unlabelled":
            return {"train": [_replace(r, split="train") for r in sources.read_unlabelled_images(root)]}
        if fmt == "manifest":
            return _group_by_split(read_manifest(manifest_path(root)))
        raise ValueError(f"unknown dataset format {fmt!r}")

    def _ensure_toy(self, make) -> None:
        """Write the toy data if missing; ``toy=None`` reuses whatever toy data is already at ``root``."""
        if self.hparams.toy is None and (Path(self.root) / "toy.json").is_file():
            return
        make(self.root, **(self.hparams.toy or {}))

    def _few_shot(self, records: list[IdentityRecord]) -> list[IdentityRecord]:
        k = self.hparams.max_train_per_identity
        if k is None:
            return list(records)
        rng = np.random.default_rng(self.hparams.seed)
        by_id = by_identity(records)
        kept = []
        for name in sorted(by_id):
            group = by_id[name]
            idx = sorted(rng.permutation(len(group))[:k])
            kept += [group[i] for i in idx]
        return kept

    def _read_synthetic(self) -> list[IdentityRecord]:
        hp = self.hparams
        out: list[IdentityRecord] = []
        mapping = hp.synthetic_identity_map or {}
        for entry in hp.synthetic or []:
            if entry == REAL_CONTROL:
                out += [_replace(rec, source="synthetic") for rec in self.train_records]
                continue
            for rec in read_manifest(manifest_path(entry)):
                out.append(
                    _replace(rec, identity=mapping.get(rec.identity, rec.identity), source="synthetic")
                )
        unknown = sorted({r.identity for r in out} - set(self.label_of))
        if unknown:
            if hp.unknown_synthetic == "error":
                raise ValueError(
                    f"synthetic records name {len(unknown)} identities unknown to the real label space "
                    f"(e.g. {unknown[:5]}); pass synthetic_identity_map to rename them or "
                    "unknown_synthetic='drop' to ignore them"
                )
            log.warning("dropping synthetic records of %d unknown identities", len(unknown))
            out = [r for r in out if r.identity in self.label_of]
        out = best_per_identity(out, hp.synthetic_rank_by, hp.synthetic_keep)
        if hp.synthetic and not out:
            log.warning(
                "the synthetic sets %s hold no usable images: training on real data only", hp.synthetic
            )
        return out

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if self.hparams.on_bad_image == "skip":
            self._drop_bad_images()
        self.task_loaders.setup()
        self._save_label_map()

    def _drop_bad_images(self) -> None:
        if self.skipped_images:
            return
        bad_all = []
        self.train_records, bad = filter_decodable(self.train_records, self.mode)
        bad_all += bad
        self.synthetic_records, bad = filter_decodable(self.synthetic_records, self.mode)
        bad_all += bad
        for split in [s for s in self._splits if s != "train"]:
            self._splits[split], bad = filter_decodable(self._splits[split], self.mode)
            bad_all += bad
        self.skipped_images = [e.source for e in bad_all]
        if bad_all:
            log.warning(
                "skipped %d unreadable images (on_bad_image='skip'), e.g. %s",
                len(bad_all),
                "; ".join(str(e) for e in bad_all[:3]),
            )

    def _save_label_map(self) -> None:
        trainer = self._trainer_or_none()
        if trainer is None or not trainer.loggers:  # no logger, no run folder to write into
            return
        directory = run_dir(trainer)  # a collective under DDP: every rank asks
        if trainer.is_global_zero:
            atomic_write_json(directory / "labels.json", self.label_map())

    def label_map(self) -> dict:
        """The identity <-> index mapping (sorted names, identical on every rank) as saved in labels.json."""
        return {"identities": self.identities, "num_identities": self.num_identities, "dataset": self.root}

    def _trainer_or_none(self):
        try:
            return self.trainer
        except RuntimeError:
            return None

    def rank_world(self) -> tuple[int, int]:
        """(rank, world size) of the attached trainer, (0, 1) without one."""
        trainer = self._trainer_or_none()
        if trainer is None:
            return 0, 1
        world = int(trainer.world_size)
        connector = getattr(trainer, "_accelerator_connector", None)
        if world > 1 and getattr(connector, "use_distributed_sampler", False):
            raise RuntimeError(
                "IdentityDataModule shards its loaders itself: build the Trainer with "
                "use_distributed_sampler=False (the rgsd CLI does this by default)"
            )
        return int(trainer.global_rank), world

    # ------------------------------------------------------------------ transforms and records
    def generator_transform(self, train: bool = True):
        """The generator's square transform (flip only in training)."""
        hp = self.hparams
        return generator_transform(hp.image_size, hp.channels, square=hp.square, hflip=train and hp.flip)

    def _recognizer_loaders(self) -> RecognizerLoaders:
        if not isinstance(self.task_loaders, RecognizerLoaders):
            raise ValueError(f"task {self.task!r} has no recognizer input: use task 'reid' or 'face'")
        return self.task_loaders

    def recognizer_transform(self, train: bool = True):
        """The recognizer's transform for this task (ReID or face)."""
        return self._recognizer_loaders().transform(train)

    def recognizer_preprocessing(self) -> dict:
        """Input geometry and normalisation of the recognizer (what its export records)."""
        return self._recognizer_loaders().preprocessing()

    @property
    def val_names(self) -> list[str]:
        """Names of the validation / test loaders, in order (known once they are built)."""
        return self.task_loaders.val_names

    @property
    def verification_sets(self) -> list[VerificationPairs]:
        """The face task's verification sets (built at setup; empty for other tasks)."""
        loaders = self.task_loaders
        return loaders.verification_sets if isinstance(loaders, FaceLoaders) else []

    def split_records(self, split: str) -> list[IdentityRecord]:
        """Real records of a split ("train" = the few-shot training set actually used)."""
        if split == "train":
            return list(self.train_records)
        return list(self._splits.get(split, []))

    def heldout_records(self) -> list[IdentityRecord]:
        """Real records of the training identities that training does not use: their images in other
        splits and those the few-shot sampling left out (a quality judge's unseen reference)."""
        used = {str(r.path) for r in self.train_records}
        known = set(self.identities)
        return [
            r
            for records in self._splits.values()
            for r in records
            if r.identity in known and str(r.path) not in used
        ]

    # ------------------------------------------------------------------ loaders
    def make_loader(self, dataset, *, shuffle: bool = False, batch_sampler=None, drop_last: bool = False):
        """A DataLoader sharded for this rank: a batch sampler as given, a shuffled (distributed) sampler,
        or an unpadded strided shard for evaluation / predict."""
        hp = self.hparams
        kwargs = dict(
            num_workers=hp.num_workers, pin_memory=hp.pin_memory, persistent_workers=hp.num_workers > 0
        )
        if batch_sampler is not None:
            return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
        rank, world = self.rank_world()
        if shuffle:
            # one replica too: the order is a function of (seed, epoch) - Lightning calls set_epoch - so a
            # resumed run continues with the interrupted epoch's order instead of replaying epoch 0's
            sampler = DistributedSampler(
                dataset, world, rank, shuffle=True, seed=hp.seed, drop_last=world > 1
            )
            drop_last = drop_last and len(dataset) >= hp.batch_size * world
            return DataLoader(
                dataset, batch_size=hp.batch_size, sampler=sampler, drop_last=drop_last, **kwargs
            )
        if world > 1:  # evaluation / predict: an unpadded strided shard per rank, nothing duplicated
            dataset = Subset(dataset, list(range(rank, len(dataset), world)))
        return DataLoader(dataset, batch_size=hp.batch_size, shuffle=False, **kwargs)

    def training_records(self) -> list[IdentityRecord]:
        """The recognizer training set: real, then synthetic records (a batch's ``index`` points here)."""
        return self.train_records + self.synthetic_records

    def train_dataloader(self) -> DataLoader:
        return self.task_loaders.train_dataloader()

    def val_dataloader(self):
        return self.task_loaders.val_dataloader()

    def test_dataloader(self):
        return self.task_loaders.val_dataloader()

    def reference_dataloader(self) -> DataLoader:
        """Every real training image through the generator's test transform, unsharded and in order.

        The reward memory bank is built from this loader on every rank (identical banks), so real
        references pass through the same square geometry as generated images before feature extraction.
        """
        hp = self.hparams
        ds = RecordDataset(
            self.train_records,
            self.generator_transform(False),
            label_of=self.label_of,
            mode=self.mode,
            kind="generator",
        )
        return DataLoader(ds, batch_size=hp.batch_size, shuffle=False, num_workers=hp.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return self.make_loader(RequestDataset(self.generation_requests()))

    # ------------------------------------------------------------------ generation requests
    def generation_requests(self) -> list[GenerationRequest]:
        """The predict requests: ``generate_per_identity`` seeded images per identity."""
        hp = self.hparams
        names = hp.generate_identities or self.identities
        requests = make_requests(names, self.label_of, hp.generate_per_identity, hp.generate_seed)
        return [r for r in requests if (r.identity, r.seed) not in self.completed_requests]


def _group_by_split(records: list[IdentityRecord]) -> dict[str, list[IdentityRecord]]:
    out: dict[str, list[IdentityRecord]] = {}
    for r in records:
        out.setdefault(r.split, []).append(r)
    return out


_replace = dataclasses.replace


def _spec_dict(spec: VerificationSpec | dict) -> dict:
    return dataclasses.asdict(spec) if isinstance(spec, VerificationSpec) else dict(spec)
