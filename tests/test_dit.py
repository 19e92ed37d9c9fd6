"""DiT loading, label-space swap, freezing, DiT init and export round trips (tiny models, CPU, no network)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from safetensors.torch import load_file, save_file

from rgsd_lightning.diffusion import DiTGenerator, build_dit, drop_labels, sample, set_trainable

K = 5  # classes of the fake "pretrained" model
HIDDEN = 8  # 2 heads x 4


def _blocks(gen: DiTGenerator):
    return gen.transformer.transformer_blocks


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A pipeline-layout folder: transformer/ (K classes, one random table copied into every block) + vae/."""
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        in_channels=4,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=4,
        num_layers=2,
        patch_size=2,
        sample_size=8,
        num_embeds_ada_norm=K,
    )
    table = torch.randn(K + 1, HIDDEN)
    with torch.no_grad():
        for block in dit.transformer_blocks:
            block.norm1.emb.class_embedder.embedding_table.weight.copy_(table)
        for p in dit.parameters():  # make the output depend on everything (diffusers leaves some zeros)
            p.add_(0.05 * torch.randn_like(p))
        for block in dit.transformer_blocks:
            block.norm1.emb.class_embedder.embedding_table.weight.copy_(table)
    dit.save_pretrained(root / "transformer")
    AutoencoderKL().save_pretrained(root / "vae")
    return root, table


@pytest.mark.parametrize("init_rows", ["zero", "null"])
def test_swap_shares_one_table_with_null_row_copied(pretrained_dir, init_rows):
    root, table = pretrained_dir
    gen = build_dit(num_identities=3, pretrained=str(root), vae="pretrained", init_rows=init_rows)
    shared = gen.label_table
    assert all(b.norm1.emb.class_embedder.embedding_table is shared for b in _blocks(gen))
    assert shared.weight.shape == (4, HIDDEN)
    assert torch.equal(shared.weight[3], table[K])  # null row = pretrained null row (row K)
    expected = torch.zeros(3, HIDDEN) if init_rows == "zero" else table[K].expand(3, -1)
    assert torch.equal(shared.weight[:3], expected)
    assert gen.transformer.config.num_embeds_ada_norm == 3 and gen.null_label == 3
    for block in _blocks(gen):
        assert block.norm1.emb.class_embedder.dropout_prob == 0
        assert block.norm1.emb.class_embedder.num_classes == 3
    assert gen.latent_shape == (4, 8, 8) and gen.image_size == 8
    assert json.loads(json.dumps(gen.vae_source))["subfolder"] == "vae"


def test_per_block_tables_that_differ_warn(tmp_path):
    dit = DiTTransformer2DModel(
        in_channels=3, num_attention_heads=2, attention_head_dim=4, num_layers=2, sample_size=8
    )
    dit.save_pretrained(tmp_path / "dit")  # diffusers' default init: different random table per block
    with pytest.warns(UserWarning, match="per-block label tables differ"):
        gen = build_dit(num_identities=2, pretrained=str(tmp_path / "dit"))
    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path / "dit")
    null0 = reloaded.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight[1000]
    assert torch.equal(gen.label_table.weight[2], null0)


def test_trainable_names_label_table_adaln_all_patterns(pretrained_dir):
    root, _ = pretrained_dir
    gen = build_dit(num_identities=3, pretrained=str(root), vae="pretrained")
    table_name = "transformer.transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"

    def grads():
        return sorted(n for n, p in gen.named_parameters() if p.requires_grad)

    assert grads() == [table_name]  # default of build_dit
    names = set_trainable(gen, "adaln")
    expected = {table_name, "transformer.proj_out_1.weight", "transformer.proj_out_1.bias"}
    for i in range(2):
        expected |= {f"transformer.transformer_blocks.{i}.norm1.linear.{k}" for k in ("weight", "bias")}
    assert set(names) == expected and grads() == sorted(expected)
    names = set_trainable(gen, "all")
    assert all(n.startswith("transformer.") for n in names)
    assert len(names) == sum(1 for n, _ in gen.named_parameters() if n.startswith("transformer."))
    assert not any(p.requires_grad for p in gen.vae.parameters())
    assert set_trainable(gen, ["*.proj_out_2.*"]) == [
        "transformer.proj_out_2.weight",
        "transformer.proj_out_2.bias",
    ]
    with pytest.raises(ValueError, match="matches no generator parameter"):
        set_trainable(gen, ["*.nothing_like_this"])
    with pytest.raises(ValueError, match="trainable="):
        set_trainable(gen, "everything")
    gen.train()
    assert gen.transformer.training and not gen.vae.training


def test_train_mode_every_block_sees_the_same_label(pretrained_dir):
    root, _ = pretrained_dir
    gen = build_dit(num_identities=3, pretrained=str(root), vae="pretrained").train()
    seen: list[torch.Tensor] = []
    hooks = [
        b.norm1.emb.class_embedder.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
        for b in _blocks(gen)
    ]
    rng = torch.Generator().manual_seed(0)
    labels = drop_labels(torch.randint(0, 3, (256,), generator=rng), 0.1, gen.null_label, generator=rng)
    with torch.no_grad():
        gen(torch.randn(256, 4, 8, 8), torch.full((256,), 10), labels)
    for h in hooks:
        h.remove()
    # embedding seen by each block (and the final layer) equals the table row of the sample's label
    assert len(seen) == 3
    for emb in seen:
        assert torch.equal(emb, gen.label_table.weight[labels])


def test_drop_labels_one_draw_per_sample():
    labels = torch.arange(4000) % 7
    out = drop_labels(labels, 0.25, 7, generator=torch.Generator().manual_seed(1))
    dropped = out == 7
    assert torch.equal(out[~dropped], labels[~dropped])
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    assert torch.equal(drop_labels(labels, 0.0, 7), labels)
    assert bool((drop_labels(labels, 1.0, 7) == 7).all())
    with pytest.raises(ValueError, match="label dropout"):
        drop_labels(labels, 1.5, 7)


def test_from_scratch_applies_dit_init_and_ties_timestep_mlp():
    torch.manual_seed(0)
    gen = build_dit(num_identities=40, preset="small", channels=1)
    tr = gen.transformer
    assert tr.config.patch_size == 4 and tr.inner_dim == 128 and len(tr.transformer_blocks) == 4
    assert gen.latent_shape == (1, 32, 32) and tr.config.out_channels == 2
    for block in tr.transformer_blocks:
        assert block.norm1.emb.timestep_embedder is tr.transformer_blocks[0].norm1.emb.timestep_embedder
        assert not block.norm1.linear.weight.any() and not block.norm1.linear.bias.any()
    for layer in (tr.proj_out_1, tr.proj_out_2):
        assert not layer.weight.any() and not layer.bias.any()
    assert abs(gen.label_table.weight.std().item() - 0.02) < 0.003
    mlp = tr.transformer_blocks[0].norm1.emb.timestep_embedder
    assert abs(mlp.linear_1.weight.std().item() - 0.02) < 0.002 and not mlp.linear_1.bias.any()
    q = tr.transformer_blocks[1].attn1.to_q  # xavier uniform: U(-b, b), b = sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(6.0 / (q.in_features + q.out_features))
    assert q.weight.abs().max() <= bound and q.weight.std() > 0.8 * bound / math.sqrt(3)
    assert not q.bias.any()
    conv = tr.pos_embed.proj.weight
    fan_in, fan_out = conv[0].numel(), conv.shape[0]
    assert conv.abs().max() <= math.sqrt(6.0 / (fan_in + fan_out)) and not tr.pos_embed.proj.bias.any()
    untied = DiTTransformer2DModel(**{k: v for k, v in tr.config.items() if not k.startswith("_")})
    n_untied = sum(p.numel() for p in untied.parameters())  # notes: 1.43 M
    n_shared = sum(p.numel() for p in mlp.parameters()) + gen.label_table.weight.numel()
    assert sum(p.numel() for p in tr.parameters()) == n_untied - 3 * n_shared  # one t-MLP, one table


def test_s2_preset_is_dit_s2():
    """DiT-S/2 (DiT paper, Table 1): 12 layers, hidden 384, 6 heads, patch 2, 33 M parameters."""
    gen = build_dit(num_identities=1, preset="s2", channels=3)
    tr = gen.transformer
    assert tr.config.patch_size == 2 and tr.inner_dim == 384 and len(tr.transformer_blocks) == 12
    assert tr.transformer_blocks[0].attn1.heads == 6
    assert (gen.image_size // tr.config.patch_size) ** 2 == 256  # tokens at 32 px
    n = sum(p.numel() for p in gen.parameters())
    assert 31.5e6 < n < 34e6, n  # paper: 33 M (4 latent channels, one timestep MLP per block)


def _perturb_table(gen: DiTGenerator) -> None:
    with torch.no_grad():
        gen.label_table.weight.add_(torch.randn_like(gen.label_table.weight))


@pytest.mark.parametrize("vae", ["pretrained", "tiny"])
def test_export_roundtrip_is_bit_exact(pretrained_dir, tmp_path, vae):
    root, _ = pretrained_dir
    gen = build_dit(num_identities=3, identities=["a", "b", "c"], pretrained=str(root), vae=vae)
    _perturb_table(gen)
    out = gen.save_pretrained(tmp_path / "export", provenance={"parent": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp folder left behind
    assert (out / "vae.json").is_file() == (vae == "pretrained")
    assert (out / "vae").is_dir() == (vae == "tiny")
    labels = json.loads((out / "labels.json").read_text())
    assert labels == {"identities": ["a", "b", "c"], "num_identities": 3, "null_index": 3}
    assert json.loads((out / "transformer" / "config.json").read_text())["num_embeds_ada_norm"] == 3
    assert json.loads((out / "provenance.json").read_text()) == {"parent": "test"}

    back = DiTGenerator.from_pretrained(out, identities=["a", "b", "c"])
    assert all(b.norm1.emb.class_embedder.embedding_table is back.label_table for b in _blocks(back))
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        assert torch.equal(gen(x, t, y), back(x, t, y))
    a = sample(gen, [0, 2], seeds=[3, 4], num_steps=4, guidance_scale=2.0, eta=1.0)
    b = sample(back, [0, 2], seeds=[3, 4], num_steps=4, guidance_scale=2.0, eta=1.0)
    assert torch.equal(a.images, b.images) and torch.equal(a.latents, b.latents)
    # saving again over an existing export replaces it
    gen.save_pretrained(out)
    assert not (out / "provenance.json").exists()


def test_export_tied_timestep_mlp_and_keep(tmp_path):
    gen = build_dit(num_identities=2, preset="tiny", identities=["x", "y"], trainable="all")
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gen.save_pretrained(tmp_path / "e")
    kept = build_dit(
        num_identities=2, identities=["x", "y"], pretrained=str(tmp_path / "e"), label_space="keep"
    )
    blocks = _blocks(kept)
    assert blocks[1].norm1.emb.timestep_embedder is blocks[0].norm1.emb.timestep_embedder
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(gen(x, 7, torch.tensor([0, 2])), kept(x, 7, torch.tensor([0, 2])))
    with pytest.raises(ValueError, match="export has 2 identities, the data has 3"):
        build_dit(num_identities=3, pretrained=str(tmp_path / "e"), label_space="keep")
    with pytest.raises(ValueError, match="'y' in the export but 'z'"):
        DiTGenerator.from_pretrained(tmp_path / "e", identities=["x", "z"])
    # an export can also start a new label space
    swapped = build_dit(num_identities=5, pretrained=str(tmp_path / "e"), init_rows="zero")
    assert swapped.label_table.weight.shape[0] == 6 and swapped.channels == 3
    assert torch.equal(swapped.label_table.weight[5], gen.label_table.weight[2])


def test_an_export_draws_no_random_numbers(tmp_path):
    """Exporting in the middle of training (benchmarks cold_trajectory exports at chosen steps) must leave the
    global RNG as it found it, else every batch and noise draw after the export changes: the per-block copies
    of the shared label table are built from its weights, not initialised and overwritten."""
    gen = build_dit(num_identities=2, preset="tiny", identities=["x", "y"], trainable="all")
    torch.manual_seed(3)
    state = torch.get_rng_state()
    gen.save_pretrained(tmp_path / "e")
    assert torch.equal(torch.get_rng_state(), state)
    back = DiTGenerator.from_pretrained(tmp_path / "e")
    assert torch.equal(back.label_table.weight, gen.label_table.weight)


def test_export_with_differing_block_tables_warns_and_takes_block0(tmp_path):
    gen = build_dit(num_identities=2, preset="tiny")
    out = gen.save_pretrained(tmp_path / "e")
    path = out / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    key = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    state[key] = state[key] + 1.0
    save_file(state, path)
    with pytest.warns(UserWarning, match="label table copies differ"):
        back = DiTGenerator.from_pretrained(out)
    assert torch.equal(back.label_table.weight, gen.label_table.weight)


def test_bad_inputs_give_clear_errors(pretrained_dir, tmp_path):
    root, _ = pretrained_dir
    with pytest.raises(ValueError, match="latent mode needs a VAE"):
        build_dit(num_identities=3, pretrained=str(root))
    with pytest.raises(ValueError, match="latent mode needs a VAE"):
        build_dit(num_identities=3, preset="tiny", preset_overrides={"in_channels": 4})
    with pytest.raises(ValueError, match="needs one of our exports"):
        build_dit(num_identities=3, pretrained=str(root), vae="pretrained", label_space="keep")
    with pytest.raises(ValueError, match="unknown DiT config keys"):
        build_dit(num_identities=3, preset="tiny", preset_overrides={"depth": 3})
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a hub id"):
        build_dit(num_identities=3, pretrained=str(tmp_path / "missing" / "x" / "y"))
    with pytest.raises(FileNotFoundError, match="labels.json"):
        DiTGenerator.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="3 identity names"):
        build_dit(num_identities=2, identities=["a", "b", "c"], preset="tiny")
    gen = build_dit(num_identities=3, preset="tiny")
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"label 7 out of range.*\[0, 3\]"):
        gen(x, 5, torch.tensor([1, 7]))
    with pytest.raises(ValueError, match="label -1 out of range"):
        gen(x, 5, torch.tensor([-1, 0]))


def test_encode_decode_use_scaling_factor():
    gen = build_dit(num_identities=2, preset="tiny", vae="tiny")
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    latents = gen.encode(images)
    raw = gen.vae.encode(images).latent_dist.mean
    assert torch.allclose(latents, raw * gen.vae.config.scaling_factor)
    decoded = gen.decode(latents)
    assert torch.allclose(decoded, gen.vae.decode(raw).sample.clamp(-1, 1), atol=1e-5)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1
    pixel = build_dit(num_identities=2, preset="tiny")
    assert torch.equal(pixel.encode(images), images)
    assert torch.equal(pixel.decode(images * 3), (images * 3).clamp(-1, 1))


@pytest.mark.slow  # multi-process: a fresh interpreter with an empty network
def test_hub_id_loads_from_the_huggingface_cache_offline(pretrained_dir, tmp_path):
    """A hub id (org/name) resolves through the HF cache layout offline: transformer/, vae/, scheduler/."""
    import shutil
    import subprocess
    import sys

    root, table = pretrained_dir
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--fake-org--DiT-tiny"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(root, snapshot)
    (snapshot / "scheduler").mkdir()
    sched = {"_class_name": "DDPMScheduler", "num_train_timesteps": 40, "beta_schedule": "linear"}
    (snapshot / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    script = (
        "import json, torch\n"
        "from rgsd_lightning.diffusion import build_dit\n"
        "gen = build_dit(num_identities=3, pretrained='fake-org/DiT-tiny', vae='pretrained',"
        " local_files_only=True)\n"
        "print(json.dumps({'rows': gen.label_table.weight.shape[0], 'latent': gen.vae is not None,"
        " 'T': gen.num_train_timesteps, 'null': gen.label_table.weight[-1].tolist()}))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["rows"] == 4 and out["latent"] and out["T"] == 40  # scheduler/ of the hub snapshot was read
    assert torch.allclose(torch.tensor(out["null"]), table[K], atol=1e-6)  # null row = pretrained null row
    missing = subprocess.run(
        [sys.executable, "-c", script.replace("fake-org/DiT-tiny", "fake-org/not-cached")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode != 0 and "not-cached" in missing.stderr


def test_float_class_labels_are_refused_not_truncated():
    """Issue 14 case 4: label 1.7 used to become identity 1 silently."""
    gen = build_dit(num_identities=3, preset="tiny")
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="must be integer identity indices, got dtype torch.float"):
        gen(x, 5, torch.tensor([0.0, 1.7]))
    with pytest.raises(ValueError, match="class labels must be integer"):
        sample(gen, [0.0, 1.7], seeds=[1, 2], num_steps=2)
    with pytest.raises(ValueError, match="class labels must be integer"):
        sample(gen, torch.tensor([1.0]), seeds=[1], num_steps=2, guidance_scale=2.0)
    assert sample(gen, [0, 2], seeds=[1, 2], num_steps=2).images.shape == (2, 3, 8, 8)


def _latent_export(tmp_path, pretrained_dir):
    """A latent-mode export (tiny DiT + VAE weights in vae/) and the VAE folder it came from."""
    root, _ = pretrained_dir
    out = build_dit(num_identities=3, pretrained=str(root), vae="tiny").save_pretrained(tmp_path / "export")
    return out


def test_export_without_its_vae_names_the_folder_and_the_fix(pretrained_dir, tmp_path):
    """Issue 14 case 4: the latent-mode error must not suggest a `vae=` argument from_pretrained lacks."""
    import shutil

    export = _latent_export(tmp_path, pretrained_dir)
    shutil.rmtree(export / "vae")
    with pytest.raises(ValueError, match=f"{export}: the transformer works on 4-channel latents") as info:
        DiTGenerator.from_pretrained(export)
    assert "vae=" not in str(info.value) and "vae.json" in str(info.value)


def test_vae_json_naming_an_uncached_hub_id_fails_offline_with_the_id_and_the_fix(pretrained_dir, tmp_path):
    """Issue 14 case 4: diffusers said "no file named config.json"; the error must name the id and the fix."""
    import shutil

    export = _latent_export(tmp_path, pretrained_dir)
    shutil.rmtree(export / "vae")
    (export / "vae.json").write_text(json.dumps({"source": "fake-org/never-cached-vae", "subfolder": None}))
    with pytest.raises(FileNotFoundError) as info:  # tests run with HF_HUB_OFFLINE=1 (conftest)
        DiTGenerator.from_pretrained(export)
    message = str(info.value)
    assert "fake-org/never-cached-vae" in message and "vae.json" in message
    assert "not in the local Hugging Face cache" in message and "local folder" in message


@pytest.mark.slow  # multi-process: a fresh interpreter with an empty network
def test_cached_hub_vae_loads_without_touching_the_network(pretrained_dir, tmp_path):
    """A vae.json hub id in the local cache loads from the cache even with downloads allowed (no retries when
    the network is down); an uncached one fails with the id and the fix, not a 30 s retry loop."""
    import shutil
    import subprocess
    import sys

    export = _latent_export(tmp_path, pretrained_dir)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--fake-org--vae-tiny"
    shutil.copytree(export / "vae", repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.rmtree(export / "vae")
    (export / "vae.json").write_text(json.dumps({"source": "fake-org/vae-tiny", "subfolder": None}))
    missing = tmp_path / "missing"
    shutil.copytree(export, missing)
    (missing / "vae.json").write_text(json.dumps({"source": "fake-org/not-cached", "subfolder": None}))
    script = (
        "import json, socket\n"
        "attempts = []\n"
        "def refuse(self, *args, **kwargs):\n"
        "    attempts.append(args)\n"
        "    raise OSError('network is down (test)')\n"
        "socket.socket.connect = refuse\n"
        "from rgsd_lightning.diffusion import DiTGenerator\n"
        f"gen = DiTGenerator.from_pretrained({str(export)!r})\n"
        "cached = {'ok': gen.vae is not None, 'attempts': len(attempts)}\n"
        "try:\n"
        f"    DiTGenerator.from_pretrained({str(missing)!r})\n"
        "    error = ''\n"
        "except FileNotFoundError as err:\n"
        "    error = str(err)\n"
        "print(json.dumps({'cached': cached, 'error': error}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_ETAG_TIMEOUT="1", HF_HUB_DOWNLOAD_TIMEOUT="1")
    run = [sys.executable, "-c", script]
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["cached"] == {"ok": True, "attempts": 0}  # the cached VAE never reached for the network
    assert "fake-org/not-cached" in out["error"] and "local folder" in out["error"]
