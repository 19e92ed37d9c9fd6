"""ColdStartDiT, SyntheticGenerator and SyntheticSetWriter end to end on toy identities (tiny DiT)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import SMALL_MARKET, quiet_trainer

from rgsd_lightning import ColdStartDiT, IdentityDataModule
from rgsd_lightning.callbacks.export import ExportArtifact
from rgsd_lightning.callbacks.writer import SyntheticSetWriter
from rgsd_lightning.data import read_manifest
from rgsd_lightning.diffusion import DiTGenerator, sample
from rgsd_lightning.modules.config import GridConfig, SamplerConfig
from rgsd_lightning.modules.generate import SyntheticGenerator

TINY = {
    "preset": "tiny",
    "image_size": 8,
    "sampler": SamplerConfig(steps=4),
    "grid": GridConfig(identities=2, samples=2),
}


def _dm(root, **kw):
    args = dict(
        root=root, format="toy_market", task="generator", image_size=8, batch_size=8, toy=SMALL_MARKET
    )
    args.update(kw)
    return IdentityDataModule(**args)


@pytest.fixture(scope="module")
def trained(toy_market, tmp_path_factory):
    """A tiny cold start fitted for a few dozen steps, exported."""
    L.seed_everything(0)
    tmp = tmp_path_factory.mktemp("cold")
    dm = _dm(toy_market)
    model = ColdStartDiT(dm.num_identities, trainable="all", lr=3e-3, **TINY)
    before = quiet_trainer(tmp).validate(model, dm, verbose=False)[0]["val/loss"]
    export = ExportArtifact(str(tmp / "export" / "generator"))
    quiet_trainer(tmp, max_steps=60, callbacks=[export], check_val_every_n_epoch=1000).fit(model, dm)
    after = quiet_trainer(tmp).validate(model, dm, verbose=False)[0]["val/loss"]
    return {
        "model": model,
        "dm": dm,
        "export": export.last_path,
        "before": before,
        "after": after,
        "tmp": tmp,
    }


def test_fit_lowers_heldout_denoising_loss(trained):
    assert trained["after"] < 0.8 * trained["before"], (trained["before"], trained["after"])


def test_export_reload_reproduces_samples_bit_for_bit(trained):
    model, export = trained["model"], trained["export"]
    labels = torch.tensor([0, 1, 2, 3])
    seeds = [11, 12, 13, 14]
    ours = sample(model.generator.eval(), labels, seeds=seeds, num_steps=4, guidance_scale=2.0).images
    reloaded = DiTGenerator.from_pretrained(export)
    theirs = sample(reloaded, labels, seeds=seeds, num_steps=4, guidance_scale=2.0).images
    assert torch.equal(ours, theirs)
    labels_json = json.loads((export / "labels.json").read_text())
    assert labels_json["identities"] == trained["dm"].identities
    prov = json.loads((export / "provenance.json").read_text())
    assert prov["stage"] == "ColdStartDiT" and prov["config"]["trainable"] == "all"


def _generate(export, root, out, per_identity, tmp, writer_cls=SyntheticSetWriter):
    dm = _dm(root, generate_per_identity=per_identity)
    model = SyntheticGenerator(dm.num_identities, export=str(export), sampler=SamplerConfig(steps=3))
    writer = writer_cls(str(out))
    quiet_trainer(tmp, callbacks=[writer]).predict(model, dm, return_predictions=False)
    return dm


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_predict_writes_exactly_the_requests(trained, toy_market, tmp_path):
    out = tmp_path / "synthetic"
    dm = _generate(trained["export"], toy_market, out, 3, tmp_path)
    records = read_manifest(out / "manifest.jsonl")
    assert len(records) == 3 * dm.num_identities
    assert {(r.identity, r.extra["seed"]) for r in records} == {
        (q.identity, q.seed) for q in dm.generation_requests()
    }
    files = sorted(p for p in (out / "images").rglob("*.png"))
    assert sorted(Path(r.path) for r in records) == files
    assert all(r.source == "synthetic" for r in records)
    card = json.loads((out / "card.json").read_text())
    assert card["num_images"] == len(records) and card["num_identities"] == dm.num_identities
    assert not list(out.glob("manifest.rank*.jsonl"))


def test_predict_with_the_fast_solver_records_it_and_can_compile(trained, toy_market, tmp_path):
    dm = _dm(toy_market, generate_per_identity=1)
    fast = SamplerConfig(method="dpmsolver", steps=3)
    model = SyntheticGenerator(dm.num_identities, export=str(trained["export"]), sampler=fast)
    out = tmp_path / "synthetic"
    quiet_trainer(tmp_path, callbacks=[SyntheticSetWriter(str(out))]).predict(
        model, dm, return_predictions=False
    )
    records = read_manifest(out / "manifest.jsonl")
    assert len(records) == dm.num_identities
    assert {(r.extra["sampler"], r.extra["num_steps"], r.extra["eta"]) for r in records} == {
        ("dpmsolver", 3, 0.0)
    }
    compiled = SyntheticGenerator(
        dm.num_identities, export=str(trained["export"]), sampler=fast, compile=True
    )
    assert compiled.generator.transformer._compiled_call_impl is None
    compiled.setup("predict")  # compiles lazily: nothing runs until the first forward
    assert compiled.generator.transformer._compiled_call_impl is not None
    assert (
        compiled.generator.transformer.state_dict().keys() == model.generator.transformer.state_dict().keys()
    )


class _Crash(RuntimeError):
    pass


class _CrashingWriter(SyntheticSetWriter):
    """Dies after its first batch, like a killed job."""

    def write_on_batch_end(self, *args, **kwargs):
        super().write_on_batch_end(*args, **kwargs)
        raise _Crash("killed")


def test_interrupted_generation_resumes_without_duplicates_or_gaps(trained, toy_market, tmp_path):
    out = tmp_path / "synthetic"
    with pytest.raises(_Crash):
        _generate(trained["export"], toy_market, out, 3, tmp_path, writer_cls=_CrashingWriter)
    partial = {p: _digest(p) for p in (out / "images").rglob("*.png")}
    assert 0 < len(partial) < 3 * 6 and not (out / "manifest.jsonl").exists()
    # a torn last line (killed mid-append) must not break the resume
    shard = next(out.glob("manifest.rank*.jsonl"))
    shard.write_text(shard.read_text() + '{"path": "images/00')
    dm = _generate(trained["export"], toy_market, out, 3, tmp_path)
    records = read_manifest(out / "manifest.jsonl")
    keys = [(r.identity, r.extra["seed"]) for r in records]
    assert len(keys) == len(set(keys)) == 3 * dm.num_identities
    assert all(_digest(p) == d for p, d in partial.items())  # finished images were not rewritten
    # the resumed set equals a set generated in one go
    fresh = tmp_path / "fresh"
    _generate(trained["export"], toy_market, fresh, 3, tmp_path)
    for r in records:
        rel = Path(r.path).relative_to(out)
        assert _digest(Path(r.path)) == _digest(fresh / rel)


def test_generation_refuses_an_export_for_other_identities(trained, tmp_path):
    from rgsd_lightning.data.toy import make_toy_market

    other = tmp_path / "other"
    make_toy_market(other, num_train_ids=5, num_test_ids=2, images_per_id=4, num_cameras=2, num_distractors=0)
    with pytest.raises(ValueError, match="identities"):
        SyntheticGenerator(5, export=str(trained["export"]))


def test_checkpoint_keeps_only_trainable_weights_of_a_pretrained_model(trained, toy_market, tmp_path):
    model = ColdStartDiT(
        6,
        pretrained=str(trained["export"]),
        trainable="label_table",
        **{k: v for k, v in TINY.items() if k != "preset"},
    )
    assert model.trainable_names == [
        "generator.transformer.transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
    ]
    ckpt = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
    model.on_save_checkpoint(ckpt)
    assert list(ckpt["state_dict"]) == model.trainable_names
    with torch.no_grad():
        model.generator.label_table.weight.add_(1.0)
    fresh = ColdStartDiT(6, pretrained=str(trained["export"]), trainable="label_table", image_size=8)
    fresh.load_state_dict(ckpt["state_dict"])
    saved = ckpt["state_dict"][model.trainable_names[0]]
    assert torch.equal(fresh.generator.label_table.weight, saved)
    assert not torch.equal(fresh.generator.label_table.weight, model.generator.label_table.weight)
    wrong = ColdStartDiT(7, pretrained=str(trained["export"]), trainable="label_table", image_size=8)
    with pytest.raises(ValueError, match="different number of identities"):
        wrong.load_state_dict(ckpt["state_dict"])


def test_geometry_mismatch_between_data_and_model_is_an_error(toy_market, tmp_path):
    dm = _dm(toy_market, image_size=16)
    model = ColdStartDiT(dm.num_identities, **TINY)
    with pytest.raises(ValueError, match="image_size=16"):
        quiet_trainer(tmp_path, max_steps=1).fit(model, dm)


def test_generation_audits_the_set_and_drops_near_copies_for_good(trained, toy_market, tmp_path):
    import shutil

    from PIL import Image

    out = tmp_path / "synthetic"
    dm = _generate(trained["export"], toy_market, out, 2, tmp_path)
    card = json.loads((out / "card.json").read_text())
    assert "audit" in card and card["audit"]["num_images"] == 2 * dm.num_identities
    assert all(
        "sim_pixel" in r.extra and "near_copy" in r.extra for r in read_manifest(out / "manifest.jsonl")
    )
    # plant a memorised image: a real training image (resized like a generated one) replaces a sample
    victim = read_manifest(out / "manifest.jsonl")[0]
    real = next(r for r in dm.split_records("train") if r.identity == victim.identity)
    Image.open(real.path).convert("RGB").resize((8, 8), Image.BICUBIC).save(victim.path)
    writer = SyntheticSetWriter(str(out), drop_near_copies=True)
    result = writer.run_audit(dm.split_records("train"))
    assert victim.path.endswith(result.flagged[0].path) and len(result.flagged) == 1
    kept = read_manifest(out / "manifest.jsonl")
    assert len(kept) == 2 * dm.num_identities - 1 and victim.path not in {r.path for r in kept}
    assert (out / "rejected" / Path(victim.path).relative_to(out)).is_file()
    # resuming generation does not make the rejected image again
    shutil.copy(out / "manifest.jsonl", tmp_path / "before.jsonl")
    _generate(trained["export"], toy_market, out, 2, tmp_path)
    again = read_manifest(out / "manifest.jsonl")
    assert len(again) == len(kept) and not Path(victim.path).exists()


def test_paper_path_in_miniature_latent_mode_from_a_pretrained_folder(toy_market, tmp_path):
    """A diffusers pipeline folder (DiT with learned-sigma channels + VAE) cold-started with only the label
    table trainable, exported, and used for generation: the DiT-XL/2 + sd-vae path at toy size."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    torch.manual_seed(0)
    folder = tmp_path / "pretrained"
    DiTTransformer2DModel(
        in_channels=4,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=4,
        num_layers=1,
        patch_size=2,
        sample_size=8,
        num_embeds_ada_norm=10,
    ).save_pretrained(folder / "transformer")
    AutoencoderKL().save_pretrained(folder / "vae")
    dm = _dm(toy_market)
    model = ColdStartDiT(
        dm.num_identities,
        pretrained=str(folder),
        vae="pretrained",
        image_size=8,
        trainable="label_table",
        lr=1e-2,
        grid={"identities": 0},  # a mapping of the group's fields works too
        sampler={"steps": 3},
    )
    assert model.generator.vae is not None and model.generator.in_channels == 4
    before = {n: p.detach().clone() for n, p in model.generator.transformer.named_parameters()}
    export = tmp_path / "export"
    quiet_trainer(
        tmp_path, max_steps=3, callbacks=[ExportArtifact(str(export))], check_val_every_n_epoch=1000
    ).fit(model, dm)
    changed = {n for n, p in model.generator.transformer.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"}
    assert json.loads((export / "vae.json").read_text())["source"]  # the VAE is named, not copied
    out = tmp_path / "synthetic"
    _generate(export, toy_market, out, 1, tmp_path)
    records = read_manifest(out / "manifest.jsonl")
    from PIL import Image

    assert len(records) == dm.num_identities and Image.open(records[0].path).size == (8, 8)


@pytest.mark.parametrize("rows", ["hashed", "legacy"])
def test_resume_regenerates_a_damaged_image_instead_of_trusting_it(trained, toy_market, tmp_path, rows):
    """Issue 14 case 2: a truncated PNG used to count as done; resume checks what it skips (size + SHA-256
    recorded in the row, or a decode for rows without them) and makes broken images again."""
    out = tmp_path / "synthetic"
    _generate(trained["export"], toy_market, out, 2, tmp_path)
    manifest = out / "manifest.jsonl"
    before = {r.path: _digest(Path(r.path)) for r in read_manifest(manifest)}
    first = read_manifest(manifest)[0]
    assert first.extra["bytes"] == Path(first.path).stat().st_size
    assert first.extra["sha256"] == _digest(Path(first.path))
    if rows == "legacy":  # a set written before rows carried hashes: the images must decode
        lines = [json.loads(line) for line in manifest.read_text().splitlines()]
        manifest.write_text(
            "".join(
                json.dumps({k: v for k, v in r.items() if k not in ("bytes", "sha256")}) + "\n" for r in lines
            )
        )
    victims = [Path(r.path) for r in read_manifest(manifest)[1:3]]
    data = victims[0].read_bytes()
    victims[0].write_bytes(data[: len(data) // 2])  # truncated (a crash mid-write)
    victims[1].unlink()  # missing
    _generate(trained["export"], toy_market, out, 2, tmp_path)
    after = read_manifest(manifest)
    assert {r.path: _digest(Path(r.path)) for r in after} == before  # regenerated identically, none lost
    card = json.loads((out / "card.json").read_text())
    assert card["num_images"] == len(after) == len(before) and card["audit"]["num_images"] == len(after)


class _FailingAudit(SyntheticSetWriter):
    def run_audit(self, real_records):
        raise RuntimeError("audit failed (test)")


def test_a_failed_audit_leaves_manifest_and_card_agreeing(trained, toy_market, tmp_path):
    """Issue 14 case 2: the audit used to fail after the manifest was rewritten, leaving the previous run's
    "audit" block in card.json. Now the set says "not audited" until an audit succeeds."""
    out = tmp_path / "synthetic"
    _generate(trained["export"], toy_market, out, 2, tmp_path)
    assert "audit" in json.loads((out / "card.json").read_text())
    with pytest.raises(RuntimeError, match="audit failed"):
        _generate(trained["export"], toy_market, out, 3, tmp_path, writer_cls=_FailingAudit)  # more work
    records = read_manifest(out / "manifest.jsonl")
    card = json.loads((out / "card.json").read_text())
    assert len(records) == card["num_images"] == 3 * 6
    assert "audit" not in card and not any("sim_pixel" in r.extra for r in records)
    _generate(trained["export"], toy_market, out, 3, tmp_path)  # a successful audit brings both back
    card = json.loads((out / "card.json").read_text())
    assert card["audit"]["num_images"] == 3 * 6
    assert all("sim_pixel" in r.extra for r in read_manifest(out / "manifest.jsonl"))
