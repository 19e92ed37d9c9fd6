from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch

from rgsd_lightning.data.samplers import PKBatchSampler


def _pool(num_ids=12, real_per_id=5, syn_per_id=3):
    labels, syn = [], []
    for y in range(num_ids):
        labels += [y] * real_per_id
        syn += [False] * real_per_id
    for y in range(num_ids // 2):  # only half the identities have synthetic images
        labels += [y] * syn_per_id
        syn += [True] * syn_per_id
    return np.array(labels), np.array(syn)


def test_batches_are_p_identities_by_k_images():
    labels, syn = _pool()
    sampler = PKBatchSampler(labels, 4, 3, is_synthetic=syn, batches_per_epoch=20, seed=1)
    assert len(sampler) == 20
    for batch in sampler:
        counts = Counter(labels[batch].tolist())
        assert len(counts) == 4 and set(counts.values()) == {3}
        assert not syn[batch].any()  # synthetic_fraction defaults to 0


def test_synthetic_fraction_fills_slots_of_identities_that_have_synthetic_images():
    labels, syn = _pool()
    sampler = PKBatchSampler(labels, 6, 4, is_synthetic=syn, synthetic_fraction=0.5, batches_per_epoch=30)
    seen_mixed = 0
    for batch in sampler:
        for y in set(labels[batch].tolist()):
            members = [i for i in batch if labels[i] == y]
            n_syn = int(syn[members].sum())
            assert n_syn == (2 if y < 6 else 0)
            assert len(members) == 4
        seen_mixed += syn[batch].any() and (~syn[batch]).any()
    assert seen_mixed == 30


def test_added_synthetic_slots_come_on_top_of_k_real_images():
    labels, syn = _pool()
    options = dict(is_synthetic=syn, synthetic_fraction=0.5, batches_per_epoch=30, seed=4)
    added = PKBatchSampler(labels, 6, 4, synthetic_slots="add", **options)
    for batch in added:
        for y in set(labels[batch].tolist()):
            members = [i for i in batch if labels[i] == y]
            assert int((~syn[members]).sum()) == 4  # K real images, as without synthetic data
            assert int(syn[members].sum()) == (2 if y < 6 else 0)
    replaced = PKBatchSampler(labels, 6, 4, **options)
    assert all(len(batch) == 24 for batch in replaced)  # 6 x 4, synthetic slots included
    with pytest.raises(ValueError, match="synthetic_slots"):
        PKBatchSampler(labels, 6, 4, synthetic_slots="extra")


@pytest.mark.parametrize("epoch", [0, 3])
def test_added_synthetic_images_leave_the_real_only_batches_unchanged(epoch):
    """Common random numbers: the synthetic picks have their own stream, so the real images of every
    batch - which and in which order - are those of the real-only run with the same seed and epoch."""
    labels, syn = _pool()
    real_only = PKBatchSampler(labels[~syn], 6, 4, batches_per_epoch=30, seed=4)
    mixed = PKBatchSampler(
        labels, 6, 4, is_synthetic=syn, synthetic_fraction=0.5, synthetic_slots="add",
        batches_per_epoch=30, seed=4,
    )  # fmt: skip
    for sampler in (real_only, mixed):
        sampler.set_epoch(epoch)
    # the real items come first in the pool, so their indices are the same in both datasets
    pairs = list(zip(real_only, mixed, strict=True))
    assert all([i for i in b if not syn[i]] == a for a, b in pairs)
    # every 2 batches of 6 take each of the 12 identities once; 6 of them have 2 synthetic slots
    assert sum(int(syn[b].sum()) for _, b in pairs) == 15 * 6 * 2
    other = PKBatchSampler(labels[~syn], 6, 4, batches_per_epoch=30, seed=5)
    assert [list(b) for b in other] != [list(a) for a, _ in pairs]  # the seed matters (the check can fail)


def test_ranks_get_different_identities_and_same_stream_per_seed():
    labels, syn = _pool(num_ids=20)
    samplers = [
        PKBatchSampler(labels, 5, 2, rank=r, world_size=2, batches_per_epoch=10, seed=3) for r in range(2)
    ]
    for b0, b1 in zip(*samplers, strict=True):
        assert not set(labels[b0]) & set(labels[b1])
    again = PKBatchSampler(labels, 5, 2, rank=1, world_size=2, batches_per_epoch=10, seed=3)
    assert list(again) == list(samplers[1])
    again.set_epoch(1)
    assert list(again) != list(samplers[1])


def test_few_images_are_sampled_with_replacement_and_every_identity_appears():
    labels = np.array([0, 1, 2, 3, 3, 3, 3, 3])
    sampler = PKBatchSampler(labels, 2, 4, batches_per_epoch=40)
    seen = Counter()
    for batch in sampler:
        assert len(batch) == 8
        seen.update(set(labels[batch].tolist()))
    assert set(seen) == {0, 1, 2, 3}
    assert min(seen.values()) > 10  # identities are cycled, not starved


def test_bad_configuration_errors():
    labels, syn = _pool(num_ids=3)
    with pytest.raises(ValueError, match="only 3"):
        PKBatchSampler(labels, 4, 2)
    with pytest.raises(ValueError, match="synthetic_fraction"):
        PKBatchSampler(labels, 2, 2, synthetic_fraction=1.5)
    with pytest.raises(ValueError, match="without real images"):
        PKBatchSampler([0, 1, 2], 1, 2, is_synthetic=[False, False, True])
    with pytest.raises(ValueError, match="rank"):
        PKBatchSampler(labels, 1, 2, rank=2, world_size=2)


class _IndexData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 60

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i)])


class _Recorder(L.LightningModule):
    """Records the dataset indices of every training batch, per epoch; learns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[list[int]]] = {}

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.setdefault(self.current_epoch, []).append(batch.flatten().long().tolist())
        return (self.w * batch).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_gives_every_epoch_its_own_batches_and_a_resumed_run_the_interrupted_epochs(tmp_path):
    """Under Trainer.fit, epoch e draws the stream of set_epoch(e) - not epoch 0's again (Lightning reaches
    the batch sampler's set_epoch only through ``batch_sampler.sampler``) - and a run resumed from the
    end of epoch 1 continues with epoch 2's batches."""
    labels = np.arange(60) // 4

    def stream(epoch: int) -> list[list[int]]:
        sampler = PKBatchSampler(labels, 3, 2, batches_per_epoch=4, seed=5)
        sampler.set_epoch(epoch)
        return list(sampler)

    def fit(epochs: int, ckpt: str | None = None) -> _Recorder:
        loader = torch.utils.data.DataLoader(
            _IndexData(), batch_sampler=PKBatchSampler(labels, 3, 2, batches_per_epoch=4, seed=5)
        )
        module = _Recorder()
        trainer = L.Trainer(
            max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path, accelerator="cpu", devices=1,
        )  # fmt: skip
        trainer.fit(module, loader, ckpt_path=ckpt)
        return module

    full = fit(3)
    assert [full.seen[e] for e in range(3)] == [stream(e) for e in range(3)]
    assert stream(0) != stream(1) != stream(2)
    next(tmp_path.rglob("*.ckpt")).unlink()  # keep only the checkpoint of a 2-epoch run
    fit(2)
    resumed = fit(3, ckpt=str(next(tmp_path.rglob("*.ckpt"))))
    assert list(resumed.seen) == [2] and resumed.seen[2] == stream(2)
