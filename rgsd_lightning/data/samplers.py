"""Rank-aware P x K identity batch sampler.

Every batch holds P identities x K images each (the paper's P=16 x K=4). Under DDP every rank draws
from the same seeded stream and takes its own slice, so in one step the ranks see *different*
identities (when there are at least P x world_size of them) and no rank waits for another. Lightning's
own sampler replacement would scatter the P x K groups, so the trainer runs with
``use_distributed_sampler=False`` and this sampler does the sharding.

With synthetic images in the pool, each identity's K slots are split into ``round(K * synthetic_fraction)``
synthetic and the rest real (when the identity has synthetic images), so every batch mixes both sources
across several identities - what lookahead sample selection needs. With ``synthetic_slots="add"`` the
synthetic images come on top of K real ones instead (batches of P x (K + round(K * synthetic_fraction))):
the real images in the loss are those of a real-only run. Identities with fewer images than slots are
sampled with replacement.

The stream is a function of (seed, epoch): the identities and real picks draw from one generator, the
synthetic picks from another ([seed, epoch, 1]), so with ``synthetic_slots="add"`` a run with synthetic
images sees exactly the real batches of the same seed's real-only run (common random numbers: a paired
difference between the two measures the synthetic images, not a different draw of the real ones;
``RecordDataset``'s ``synthetic_seed`` does the same for their augmentations).

Lightning sets the epoch of ``loader.sampler`` and of ``loader.batch_sampler.sampler`` (torch's
``BatchSampler`` layout), never of a batch sampler itself, so :attr:`PKBatchSampler.sampler` is the sampler
itself: without it every epoch replayed epoch 0's batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
from torch.utils.data import Sampler

SYNTHETIC_SLOTS = ("replace", "add")
"""Where synthetic images go: into a share of each identity's K slots, or on top of them."""


class PKBatchSampler(Sampler[list[int]]):
    """Batches of P identities x K images, sharded per rank.

    Args:
        labels: identity index of every item of the dataset.
        p: identities per batch (per rank).
        k: images per identity.
        is_synthetic: per item, True for synthetic images (None: all real).
        synthetic_fraction: share of each identity's K slots given to synthetic images.
        synthetic_slots: "replace" (the synthetic images take that share of the K slots) or "add" (they
            come on top of K real images).
        batches_per_epoch: batches per rank and epoch; None = enough for every real image once on average.
        seed: base seed; the stream is identical on every rank.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(
        self,
        labels: Sequence[int],
        p: int,
        k: int,
        *,
        is_synthetic: Sequence[bool] | None = None,
        synthetic_fraction: float = 0.0,
        synthetic_slots: Literal["replace", "add"] = "replace",
        batches_per_epoch: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if p < 1 or k < 1:
            raise ValueError(f"P and K must be >= 1, got P={p}, K={k}")
        if not 0.0 <= synthetic_fraction <= 1.0:
            raise ValueError(f"synthetic_fraction must be in [0, 1], got {synthetic_fraction}")
        check_synthetic_slots(synthetic_slots)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        labels = np.asarray(labels, dtype=np.int64)
        synthetic = np.zeros(len(labels), bool) if is_synthetic is None else np.asarray(is_synthetic, bool)
        if synthetic.shape != labels.shape:
            raise ValueError(f"is_synthetic has {len(synthetic)} entries for {len(labels)} labels")
        self.real = {int(y): np.flatnonzero((labels == y) & ~synthetic) for y in np.unique(labels)}
        self.real = {y: idx for y, idx in self.real.items() if len(idx)}
        syn_ids = np.unique(labels[synthetic])
        self.synthetic = {int(y): np.flatnonzero((labels == y) & synthetic) for y in syn_ids}
        orphans = sorted(set(self.synthetic) - set(self.real))
        if orphans:
            raise ValueError(
                f"synthetic images of identities without real images (label indices {orphans[:10]})"
            )
        self.identities = np.array(sorted(self.real), dtype=np.int64)
        if len(self.identities) < p:
            raise ValueError(f"P={p} identities per batch, but the data has only {len(self.identities)}")
        self.p, self.k = p, k
        self.k_syn = int(round(k * synthetic_fraction))
        self.add_synthetic = synthetic_slots == "add"
        self.seed, self.rank, self.world_size = seed, rank, world_size
        num_real = sum(len(v) for v in self.real.values())
        self.batches_per_epoch = batches_per_epoch or max(1, num_real // (p * k * world_size))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start (through :attr:`sampler`); the stream depends on
        (seed, epoch), so a resumed run continues with the interrupted epoch's batches."""
        self.epoch = epoch

    @property
    def sampler(self) -> PKBatchSampler:
        """This sampler: where Lightning looks for ``set_epoch`` on a loader's batch sampler."""
        return self

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _draw(self, rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
        if n <= 0:
            return pool[:0]
        return rng.choice(pool, size=n, replace=len(pool) < n)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        syn_rng = np.random.default_rng([self.seed, self.epoch, 1])  # the real stream stays real-only's
        per_step = self.p * self.world_size
        distinct = len(self.identities) >= per_step
        stream: list[int] = []  # consumed from the end; refilled with fresh permutations
        for _ in range(self.batches_per_epoch):
            # identities for all ranks of this step, distinct whenever there are enough of them
            chosen: list[int] = []
            while len(chosen) < per_step:
                pos = len(stream) - 1
                while pos >= 0 and distinct and stream[pos] in chosen:
                    pos -= 1
                if pos < 0:
                    stream = [int(y) for y in rng.permutation(self.identities)] + stream
                    continue
                chosen.append(stream.pop(pos))
            batches = []
            for y in chosen:
                syn = self.synthetic.get(y)
                n_syn = self.k_syn if syn is not None else 0
                n_real = self.k if self.add_synthetic else self.k - n_syn
                picks = [self._draw(rng, self.real[y], n_real)]
                if n_syn:
                    picks.append(self._draw(syn_rng, syn, n_syn))
                batches.append(np.concatenate(picks))
            mine = batches[self.rank * self.p : (self.rank + 1) * self.p]
            yield [int(i) for i in np.concatenate(mine)]


def check_synthetic_slots(value: str) -> None:
    """ValueError naming ``synthetic_slots`` unless ``value`` is one of :data:`SYNTHETIC_SLOTS`."""
    if value not in SYNTHETIC_SLOTS:
        raise ValueError(f"synthetic_slots must be one of {SYNTHETIC_SLOTS}, got {value!r}")
