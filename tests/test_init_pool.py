"""Start images for generation from images (SDEdit): the pool, its draw per request, and generation."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_MARKET, quiet_trainer
from PIL import Image

from rgsd_lightning import IdentityDataModule
from rgsd_lightning.callbacks.writer import SyntheticSetWriter
from rgsd_lightning.data import read_manifest
from rgsd_lightning.data.init_pool import InitPool
from rgsd_lightning.diffusion import build_dit
from rgsd_lightning.modules.config import InitImagesConfig, SamplerConfig
from rgsd_lightning.modules.generate import SyntheticGenerator


@pytest.fixture
def pool_root(tmp_path):
    """Two identity folders of flat grey images (grey level = 10 x index) and one image to exclude."""
    root = tmp_path / "pool"
    for person, levels in (("p1", [10, 20, 30]), ("p2", [40, 50])):
        (root / person).mkdir(parents=True)
        for level in levels:
            Image.fromarray(np.full((12, 10), level, np.uint8)).save(root / person / f"{person}_{level}.png")
    Image.fromarray(np.full((12, 10), 250, np.uint8)).save(root / "p2" / "p2_Ambient.png")
    return root


def test_pool_lists_recursively_and_loads_generator_inputs(pool_root):
    pool = InitPool(pool_root, exclude=["*_Ambient*"], image_size=4, channels=1)
    assert len(pool) == 5 and not any("Ambient" in p for p in pool.paths)
    images, paths = pool.images(["a", "b"], [1, 2])
    assert images.shape == (2, 1, 4, 4)
    for image, path in zip(images, paths, strict=True):
        level = int(path.rsplit("_", 1)[1].split(".")[0])
        assert torch.allclose(image, torch.full_like(image, level / 127.5 - 1.0), atol=1e-6)  # [-1, 1]
    assert len(InitPool(pool_root, image_size=4, channels=1)) == 6
    rgb, _ = InitPool(pool_root, image_size=6, channels=3).images(["a"], [0])
    assert rgb.shape == (1, 3, 6, 6)


def test_draw_depends_on_the_request_only(pool_root):
    pool = InitPool(pool_root, image_size=4, channels=1, seed=0)
    together, _ = pool.images(["a", "b", "c"], [1, 2, 3])
    alone, _ = pool.images(["b"], [2])
    assert torch.equal(together[1], alone[0])  # batch-independent
    again = InitPool(pool_root, image_size=4, channels=1, seed=0)
    picks = [pool.choose(f"id{i}", 7) for i in range(40)]
    assert picks == [again.choose(f"id{i}", 7) for i in range(40)]  # reproducible
    assert len(set(picks)) > 3  # identities asked for one seed start from different images
    assert np.bincount(picks, minlength=6).min() > 0  # every pool image reachable
    other_seed = InitPool(pool_root, image_size=4, channels=1, seed=1)
    assert [other_seed.choose(f"id{i}", 7) for i in range(40)] != picks


def test_folder_draw_is_a_seeded_uniform_pick(pool_root):
    """The folder pool's pick, recomputed from its definition (the sets generated before own pools existed
    keep their start images)."""
    pool = InitPool(pool_root, image_size=4, channels=1, seed=3)
    for identity, seed in (("a", 0), ("b", 5), ("0042", 17)):
        key = [3, seed, zlib.crc32(identity.encode("utf-8"))]
        assert pool.choose(identity, seed) == np.random.default_rng(key).integers(6)


def test_own_pool_draws_from_the_identity_s_own_images(pool_root):
    by_person = {p.name: sorted(str(f) for f in p.iterdir()) for p in sorted(pool_root.iterdir())}
    pool = InitPool.own(by_person, exclude=["*_Ambient*"], image_size=4, channels=1)
    assert len(pool) == 5
    for person in ("p1", "p2"):
        own = {f for f in by_person[person] if "Ambient" not in f}
        picks = [pool.paths[pool.choose(person, seed)] for seed in range(60)]
        assert set(picks) == own  # only its own images, each reachable
    images, paths = pool.images(["p2", "p1"], [4, 4])
    assert "p2" in paths[0] and "p1" in paths[1]
    level = int(paths[0].rsplit("_", 1)[1].split(".")[0])
    assert torch.allclose(images[0], torch.full_like(images[0], level / 127.5 - 1.0), atol=1e-6)
    again = InitPool.own(by_person, exclude=["*_Ambient*"], image_size=4, channels=1)
    assert [again.choose("p1", s) for s in range(20)] == [pool.choose("p1", s) for s in range(20)]
    with pytest.raises(ValueError, match="'p3' has no image"):
        pool.images(["p3"], [0])
    with pytest.raises(ValueError, match="'p2' has no image"):  # all of p2's images excluded
        InitPool.own(by_person, exclude=["p2_*"], image_size=4, channels=1).choose("p2", 0)
    with pytest.raises(ValueError, match="leaves no image"):
        InitPool.own(by_person, exclude=["*.png"], image_size=4, channels=1)


def test_bad_pools_fail_clearly(pool_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        InitPool(tmp_path / "missing", image_size=4, channels=1)
    with pytest.raises(ValueError, match="leaves no image"):
        InitPool(pool_root, exclude=["*.png"], image_size=4, channels=1)
    with pytest.raises(ValueError, match="identities but"):
        InitPool(pool_root, image_size=4, channels=1).images(["a"], [1, 2])
    for bad in (0.0, 1.2, float("nan")):
        with pytest.raises(ValueError, match="init_images.strength"):
            InitImagesConfig(root=str(pool_root), strength=bad)
    with pytest.raises(ValueError, match="init_images.seed"):
        InitImagesConfig(seed=-1)
    with pytest.raises(ValueError, match="root .* or own: true, not both"):
        InitImagesConfig(root=str(pool_root), own=True)
    assert InitImagesConfig(own=True).enabled and not InitImagesConfig().enabled


def _toy_export(dm: IdentityDataModule, export: Path) -> Path:
    """A tiny DiT export over the datamodule's identities, its weights drawn wide enough that its samples
    differ visibly from its start images."""
    gen = build_dit(num_identities=dm.num_identities, preset="tiny", image_size=8)
    with torch.no_grad():
        for p in gen.transformer.parameters():
            p.normal_(0.0, 0.3)
    gen.identities = list(dm.identities)
    gen.save_pretrained(export)
    return export


def test_generation_from_images_records_each_start_image(toy_market, pool_root, tmp_path):
    """SyntheticGenerator with init_images: every manifest row names its start image from the pool, the card
    the settings, and every image differs from the pure-noise image of the same request."""
    torch.manual_seed(0)
    dm_args = dict(
        root=toy_market, format="toy_market", task="generator", image_size=8, toy=SMALL_MARKET, batch_size=4
    )
    dm = IdentityDataModule(**dm_args, generate_per_identity=2)
    export = _toy_export(dm, tmp_path / "export")
    sampler = SamplerConfig(method="dpmsolver", steps=5)
    init = InitImagesConfig(root=str(pool_root), exclude=("*_Ambient*",), strength=0.4)
    out = {}
    for name, cfg in (("plain", InitImagesConfig()), ("sdedit", init)):
        model = SyntheticGenerator(dm.num_identities, export=str(export), sampler=sampler, init_images=cfg)
        assert model.hparams["init_images"] == {**cfg.__dict__, "exclude": list(cfg.exclude)}  # plain dict
        writer = SyntheticSetWriter(str(tmp_path / name))
        dm = IdentityDataModule(**dm_args, generate_per_identity=2)
        quiet_trainer(tmp_path / f"run_{name}", callbacks=[writer]).predict(
            model, dm, return_predictions=False
        )
        out[name] = {
            (r.identity, r.extra["seed"]): r for r in read_manifest(tmp_path / name / "manifest.jsonl")
        }
    pool = InitPool(pool_root, exclude=["*_Ambient*"], image_size=8, channels=3)
    rows = out["sdedit"]
    assert len(rows) == 2 * dm.num_identities and rows.keys() == out["plain"].keys()
    for (identity, seed), r in rows.items():
        assert r.extra["init_image"] == pool.paths[pool.choose(identity, seed)]
        assert r.extra["init_strength"] == 0.4
        assert "init_image" not in out["plain"][(identity, seed)].extra
    assert all(rows[k].extra["sha256"] != out["plain"][k].extra["sha256"] for k in rows)
    card = json.loads((tmp_path / "sdedit" / "card.json").read_text())
    assert card["init_images"] == {
        "root": str(pool_root),
        "own": False,
        "exclude": ["*_Ambient*"],
        "strength": 0.4,
        "seed": 0,
        "pool_size": 5,
    }
    assert "init_images" not in json.loads((tmp_path / "plain" / "card.json").read_text())


def test_generation_from_own_images_starts_each_sample_from_its_training_images(toy_market, tmp_path):
    """init_images.own: every image starts from a real training image of its own identity (the few-shot
    ones the datamodule keeps, never a test image), recorded in the manifest and the card."""
    torch.manual_seed(0)
    dm_args = dict(
        root=toy_market,
        format="toy_market",
        task="generator",
        image_size=8,
        toy=SMALL_MARKET,
        batch_size=4,
        max_train_per_identity=2,
        generate_per_identity=3,
    )
    dm = IdentityDataModule(**dm_args)
    export = _toy_export(dm, tmp_path / "export")
    init = InitImagesConfig(own=True, strength=0.5)
    model = SyntheticGenerator(
        dm.num_identities,
        export=str(export),
        sampler=SamplerConfig(method="dpmsolver", steps=4),
        init_images=init,
    )
    quiet_trainer(tmp_path / "run", callbacks=[SyntheticSetWriter(str(tmp_path / "own"))]).predict(
        model, dm, return_predictions=False
    )
    train = {}
    for rec in dm.train_records:
        train.setdefault(rec.identity, set()).add(rec.path)
    assert all(len(paths) == 2 for paths in train.values())
    rows = read_manifest(tmp_path / "own" / "manifest.jsonl")
    assert len(rows) == 3 * dm.num_identities
    for r in rows:
        assert r.extra["init_image"] in train[r.identity]
        assert r.extra["init_own"] is True and r.extra["init_strength"] == 0.5
    assert {r.extra["init_image"] for r in rows} <= set().union(*train.values())
    card = json.loads((tmp_path / "own" / "card.json").read_text())
    assert card["init_images"]["own"] is True and card["init_images"]["pool_size"] == 2 * dm.num_identities
