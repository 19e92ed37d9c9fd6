"""IdentityDataModule: parsing, loaders per task, synthetic mixing, bad input, DDP sharding."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
import torch
from conftest import SMALL_MARKET
from PIL import Image

from rgsd_lightning import IdentityDataModule
from rgsd_lightning.data import IdentityRecord, write_manifest
from rgsd_lightning.data.face_loaders import VerificationSpec
from rgsd_lightning.data.images import BadImageError
from rgsd_lightning.data.transforms import PhotometricJitter


def _dm(root, **kw) -> IdentityDataModule:
    args = dict(root=root, format="toy_market", height=32, width=16, image_size=16, p=3, k=2, batch_size=4)
    args.update(kw)
    return IdentityDataModule(**args)


def _synthetic_set(tmp_path, identities, per_identity=2, name="syn", sem=None):
    """``sem(identity index, n)``: a reward value recorded per image (none by default)."""
    out = tmp_path / name
    records = []
    for i, identity in enumerate(identities):
        for n in range(per_identity):
            path = out / "images" / identity / f"{n}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (n * 40, 90, 200)).save(path)
            extra = {"seed": n} if sem is None else {"seed": n, "sem": sem(i, n)}
            records.append(IdentityRecord(str(path), identity, source="synthetic", extra=extra))
    write_manifest(out / "manifest.jsonl", records)
    return out


def test_identities_are_known_at_construction_and_sorted(toy_market):
    dm = _dm(toy_market)
    assert dm.num_identities == SMALL_MARKET["num_train_ids"]
    assert dm.identities == sorted(dm.identities)
    assert dm.label_of == {name: i for i, name in enumerate(dm.identities)}
    again = _dm(toy_market)  # toy=None reuses the data already written
    assert again.identities == dm.identities


def test_generator_loaders(toy_market):
    dm = _dm(toy_market, task="generator", generator_val_fraction=0.2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].min() >= -1
    train, val = dm.task_loaders.split()
    assert val and not {r.path for r in train} & {r.path for r in val}
    assert {r.identity for r in val} <= set(dm.identities)
    assert len(train) + len(val) == len(dm.split_records("train"))


def test_shuffled_order_is_a_function_of_seed_and_epoch(toy_market):
    """Lightning calls set_epoch on the training sampler each epoch: every epoch has its own order, and a
    fresh loader (a resumed run) set to epoch 1 repeats epoch 1's order, not epoch 0's."""

    def order(epoch, seed=0):
        dm = _dm(toy_market, task="generator", generator_val_fraction=0.0, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return list(loader.sampler)

    first, second = order(0), order(1)
    assert sorted(first) == sorted(second) == list(range(len(first)))
    assert first != second and order(1) == second and order(1, seed=1) != second


def test_reid_loaders_pk_batches_and_query_gallery(toy_market):
    dm = _dm(toy_market, task="reid")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (6, 3, 32, 16)
    assert sorted(Counter(batch["label"].tolist()).values()) == [2, 2, 2]
    assert not batch["is_synthetic"].any()
    val = list(dm.val_dataloader())
    n_query = sum(int(b["is_query"].sum()) for b in val)
    assert n_query == len(dm.split_records("query"))
    assert sum(len(b["pid"]) for b in val) == len(dm.split_records("query")) + len(
        dm.split_records("gallery")
    )


@pytest.mark.parametrize("slots", ["replace", "add"])
def test_synthetic_records_mix_into_every_identity_batch(toy_market, tmp_path, slots):
    dm0 = _dm(toy_market)
    syn = _synthetic_set(tmp_path, dm0.identities[:3])
    options = dict(synthetic_fraction=0.5, synthetic_slots=slots, p=3, k=4, batches_per_epoch=6)
    dm = _dm(toy_market, synthetic=[str(syn)], **options)
    dm.setup("fit")
    assert len(dm.synthetic_records) == 6
    mixed = 0
    for batch in dm.train_dataloader():
        for y in set(batch["label"].tolist()):
            members = batch["label"] == y
            n_syn = int((batch["is_synthetic"] & members).sum())
            assert n_syn == (2 if y < 3 else 0)
            n_real = int((~batch["is_synthetic"] & members).sum())  # "add": K real, as without synthetic
            assert n_real == (4 if slots == "add" or y >= 3 else 2)
        mixed += bool(batch["is_synthetic"].any())
    assert mixed > 0
    with pytest.raises(ValueError, match="synthetic_slots"):
        _dm(toy_market, synthetic_slots="extra")


def test_the_real_control_puts_the_real_training_images_into_the_synthetic_slots(toy_market):
    from rgsd_lightning.data.datamodule import REAL_CONTROL

    dm = _dm(toy_market, synthetic=[REAL_CONTROL], synthetic_fraction=0.5, p=3, k=4, batches_per_epoch=4)
    dm.setup("fit")
    assert [(r.path, r.identity) for r in dm.synthetic_records] == [
        (r.path, r.identity) for r in dm.train_records
    ]
    assert {r.source for r in dm.synthetic_records} == {"synthetic"}
    real_paths = {r.path for r in dm.train_records}
    for batch in dm.train_dataloader():
        syn = batch["is_synthetic"]
        assert int(syn.sum()) == 6  # 2 of each identity's 4 slots
        records = [dm.training_records()[int(i)] for i in batch["index"][syn]]
        assert {r.path for r in records} <= real_paths and all(r.source == "synthetic" for r in records)


def test_synthetic_keep_ranks_each_identity_by_its_recorded_reward(toy_market, tmp_path):
    """keep 0.5 of 5 images per identity: the 2 or 3 (round half to even: 2) with the highest sem of
    each identity, whatever the other identities score; without the column it is an error naming it."""
    ids = _dm(toy_market).identities[:3]
    scores = {(0, n): [0.1, 0.9, 0.5, 0.7, 0.3][n] for n in range(5)}
    scores.update({(1, n): [0.01, 0.02, 0.05, 0.04, 0.03][n] for n in range(5)})  # all below identity 0's
    scores.update({(2, n): 0.2 for n in range(5)})  # ties: the first ones
    syn = _synthetic_set(tmp_path, ids, per_identity=5, sem=lambda i, n: scores[(i, n)])
    dm = _dm(toy_market, synthetic=[str(syn)], synthetic_keep=0.5)
    kept = {(ids.index(r.identity), int(r.extra["seed"])) for r in dm.synthetic_records}
    assert kept == {(0, 1), (0, 3), (1, 2), (1, 3), (2, 0), (2, 1)}
    assert len(_dm(toy_market, synthetic=[str(syn)], synthetic_keep=0.01).synthetic_records) == 3  # >= 1 each
    assert len(_dm(toy_market, synthetic=[str(syn)]).synthetic_records) == 15
    plain = _synthetic_set(tmp_path, ids, name="plain")
    with pytest.raises(ValueError, match=r"has no finite 'sem'.*reward_extractor"):
        _dm(toy_market, synthetic=[str(plain)], synthetic_keep=0.5)
    with pytest.raises(ValueError, match="synthetic_keep must lie in"):
        _dm(toy_market, synthetic_keep=0.0)


def test_unknown_synthetic_identity_is_an_error_or_mapped(toy_market, tmp_path):
    syn = _synthetic_set(tmp_path, ["9999"])
    with pytest.raises(ValueError, match="unknown to the real label space"):
        _dm(toy_market, synthetic=[str(syn)])
    dm = _dm(toy_market, synthetic=[str(syn)], unknown_synthetic="drop")
    assert dm.synthetic_records == []
    first = _dm(toy_market).identities[0]
    mapped = _dm(toy_market, synthetic=[str(syn)], synthetic_identity_map={"9999": first})
    assert {r.identity for r in mapped.synthetic_records} == {first}


def test_empty_synthetic_set_warns_and_trains_on_real(toy_market, tmp_path, caplog):
    empty = tmp_path / "empty"
    write_manifest(empty / "manifest.jsonl", [])
    with caplog.at_level(logging.WARNING):
        dm = _dm(toy_market, synthetic=[str(empty)])
    assert "real data only" in caplog.text and dm.synthetic_records == []
    with pytest.raises(FileNotFoundError, match="no manifest"):
        _dm(toy_market, synthetic=[str(tmp_path / "missing")])


def test_few_shot_keeps_k_images_per_identity(toy_market):
    dm = _dm(toy_market, max_train_per_identity=2)
    counts = Counter(r.identity for r in dm.split_records("train"))
    assert set(counts.values()) == {2} and len(counts) == dm.num_identities
    # held out: the training identities' images that few-shot sampling left out (query / gallery hold
    # other identities), never a training image
    full = _dm(toy_market)
    heldout = dm.heldout_records()
    used = {r.path for r in dm.train_records}
    assert len(heldout) == len(full.train_records) - len(dm.train_records)
    assert not used & {r.path for r in heldout} and {r.identity for r in heldout} <= set(dm.identities)
    assert full.heldout_records() == []


def test_face_task_verification_and_identification(toy_faces):
    dm = IdentityDataModule(
        root=toy_faces,
        format="toy_faces",
        task="face",
        train_per_identity=3,
        face_size=16,
        p=3,
        k=2,
        batch_size=8,
        verification=[VerificationSpec(kind="auto", num_pairs=20)],
    )
    dm.setup("fit")
    loaders = dm.val_dataloader()
    assert dm.val_names == ["auto", "identification"] and len(loaders) == 2
    pairs = dm.verification_sets[0]
    assert len(pairs) == 20 and pairs.issame.sum() == 10
    batch = next(iter(loaders[0]))
    assert set(batch) == {"image", "index"} and batch["image"].shape[1:] == (3, 16, 16)
    ident = next(iter(loaders[1]))
    assert set(ident) == {"image", "label"}
    assert len(dm.split_records("test")) == 6 * 3  # 6 images per id, 3 for training
    assert dm.heldout_records() == dm.split_records("test")
    assert dm.hparams.verification == [  # plain dicts: checkpoints load with weights_only
        {"kind": "auto", "path": None, "root": None, "name": None, "num_pairs": 20, "seed": 0}
    ]


def test_photometric_jitter_reaches_the_recognizer_training_transforms(toy_faces, toy_market):
    def jitter_strengths(dm, train):
        steps = dm.task_loaders.transform(train).transforms
        return [t.strength for t in steps if isinstance(t, PhotometricJitter)]

    faces = IdentityDataModule(
        root=toy_faces, format="toy_faces", task="face", train_per_identity=3, photometric=0.3
    )
    assert jitter_strengths(faces, True) == [0.3] and jitter_strengths(faces, False) == []
    reid = _dm(toy_market, photometric=0.2)
    assert jitter_strengths(reid, True) == [0.2] and jitter_strengths(reid, False) == []
    assert jitter_strengths(_dm(toy_market), True) == []
    with pytest.raises(ValueError, match="photometric must be a strength >= 0, got -0.5"):
        _dm(toy_market, photometric=-0.5)


def test_rl_task_serves_distinct_identities(toy_market):
    dm = _dm(toy_market, task="rl", p=4, batches_per_epoch=5)
    batches = list(dm.train_dataloader())
    assert len(batches) == 5
    for b in batches:
        assert len(set(b["label"].tolist())) == 4 and b["identity"][0] in dm.identities
    assert dm.val_dataloader() == []


def test_generation_requests_are_stable_and_skip_completed(toy_market):
    dm = _dm(toy_market, generate_per_identity=3, generate_seed=7)
    reqs = dm.generation_requests()
    assert len(reqs) == 3 * dm.num_identities
    assert reqs == _dm(toy_market, generate_per_identity=3, generate_seed=7).generation_requests()
    assert len({r.seed for r in reqs}) == len(reqs)
    dm.completed_requests = {(reqs[0].identity, reqs[0].seed)}
    assert dm.generation_requests() == reqs[1:]
    batch = next(iter(dm.predict_dataloader()))
    assert set(batch) == {"label", "seed", "identity", "request"}
    with pytest.raises(ValueError, match="unknown identities"):
        _dm(toy_market, generate_identities=["nope"]).generation_requests()


def test_eval_and_predict_loaders_are_sharded_without_padding(toy_market, monkeypatch):
    dm = _dm(toy_market, task="reid")
    seen = []
    for rank in range(2):
        monkeypatch.setattr(IdentityDataModule, "rank_world", lambda self, r=rank: (r, 2))
        seen.append([p for b in dm.val_dataloader() for p in b["pid"].tolist()])
        train_labels = [set(b["label"].tolist()) for b in dm.train_dataloader()]
        assert train_labels
    total = len(dm.split_records("query")) + len(dm.split_records("gallery"))
    assert len(seen[0]) + len(seen[1]) == total  # every image exactly once over the ranks


def test_bad_images_error_or_skip(toy_market, tmp_path):
    import shutil

    root = tmp_path / "market"
    shutil.copytree(toy_market, root)
    victim = sorted((root / "bounding_box_train").iterdir())[0]
    victim.write_bytes(b"truncated")
    dm = _dm(str(root), task="generator", batch_size=64)
    dm.setup("fit")
    with pytest.raises(BadImageError, match=victim.name):
        next(iter(dm.train_dataloader()))
    dm = _dm(str(root), task="generator", on_bad_image="skip")
    dm.setup("fit")
    assert dm.skipped_images == [str(victim)]
    assert str(victim) not in {r.path for r in dm.split_records("train")}


def test_bad_configuration_errors(toy_market, tmp_path):
    with pytest.raises(FileNotFoundError):
        _dm(str(tmp_path / "nope"), format="market1501")
    with pytest.raises(ValueError, match="cuhk03_variant"):
        _dm(toy_market, format="cuhk03np")
    with pytest.raises(ValueError, match="channels"):
        _dm(toy_market, channels=2)
    dm = _dm(toy_market, task="face")
    with pytest.raises(ValueError, match="test split"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="task must be one of"):
        _dm(toy_market, task="segmentation")
    with pytest.raises(ValueError, match="task 'generator' has no recognizer input"):
        _dm(toy_market, task="generator").recognizer_preprocessing()


def test_label_map_is_saved_with_the_run(toy_market, tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.w - 1).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = _dm(toy_market, task="generator")
    trainer = L.Trainer(
        max_steps=1,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
    )
    trainer.fit(Tiny(), dm)
    saved = json.loads((tmp_path / "lightning_logs" / "version_0" / "labels.json").read_text())
    assert saved["identities"] == dm.identities


def test_synthetic_images_are_augmented_on_their_own_stream(tmp_path):
    """With ``synthetic_seed``, a synthetic item's augmentation leaves torch's global generator alone (so a
    real item after it is augmented as in a real-only run), varies between draws and repeats with the seed;
    in a loader worker the stream is the worker's own."""
    from torch.utils.data import DataLoader

    from rgsd_lightning.data.datasets import RecordDataset

    paths = []
    for name in ("real", "syn"):
        paths.append(str(tmp_path / f"{name}.png"))
        Image.new("RGB", (4, 4), (9, 9, 9)).save(paths[-1])
    records = [IdentityRecord(paths[0], "a"), IdentityRecord(paths[1], "a", source="synthetic")]

    def draw(_image):
        return torch.rand(3)  # an augmentation's random parameters

    def dataset(seed):
        return RecordDataset(records, draw, label_of={"a": 0}, synthetic_seed=seed)

    ds = dataset(7)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first, second = ds[1]["image"], ds[1]["image"]
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched
    assert not torch.equal(first, second)  # a new augmentation at every draw
    assert torch.equal(dataset(7)[1]["image"], first)  # reproducible from the seed
    assert not torch.equal(dataset(8)[1]["image"], first)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(ds[0]["image"], expected)  # real items: the global stream, as before
    shared = RecordDataset(records, draw, label_of={"a": 0})  # no seed: one stream for both
    torch.manual_seed(0)
    shared[1]
    assert not torch.equal(torch.get_rng_state(), state)

    loader = DataLoader(dataset(7), batch_size=None, sampler=[1, 1], num_workers=1)
    in_worker = [item["image"] for item in loader]
    assert not torch.equal(in_worker[0], in_worker[1]) and not torch.equal(in_worker[0], first)
