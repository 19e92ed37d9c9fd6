"""Fixtures of ``benchmarks.paper_shapes``: a random DiT-XL/2 diffusers folder, resnet50 weights, toy data.

Nothing is downloaded; the weights are random. The DiT folder has the layout and shapes of
``facebook/DiT-XL-2-256`` (``transformer/``, ``vae/``, ``scheduler/``) with one label table and one timestep
MLP copied into every block, as in the converted DiT checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rgsd_lightning.diffusion.dit import PRESETS

DIT_XL2 = dict(PRESETS["xl2"], num_embeds_ada_norm=1000)  # 8 out channels: eps + learned variance
TOY_MARKET = dict(num_train_ids=2, num_test_ids=2, images_per_id=4, num_cameras=2, num_distractors=0)
TOY_MARKET.update(height=128, width=64)  # Market-1501 crops are 128x64 (resized to 256x128 by the recipe)
TOY_FACES = dict(num_ids=2, images_per_id=4, size=128)


def fixture_paths(root: Path) -> dict[str, Path]:
    """Where :func:`build_fixtures` puts each fixture."""
    names = {"dit": "DiT-XL-2-256", "weights": "resnet50.safetensors", "market": "market", "faces": "faces"}
    return {**{key: root / name for key, name in names.items()}, "bin": root / "faces_lfw.bin"}


def build_fixtures(root: Path) -> dict[str, Path]:
    """The random DiT-XL/2 pipeline folder, the resnet50 weights file and the fixture data under ``root``."""
    import timm
    from diffusers import DDIMScheduler, DiTTransformer2DModel
    from safetensors.torch import save_file

    from benchmarks.speed_models import sd_vae_shaped
    from rgsd_lightning.data.toy import make_toy_faces, make_toy_market

    root.mkdir(parents=True, exist_ok=True)
    dit = fixture_paths(root)["dit"]
    if not (dit / "transformer" / "config.json").is_file():
        torch.manual_seed(0)
        transformer = DiTTransformer2DModel(**DIT_XL2)
        _share_like_the_original(transformer)
        transformer.save_pretrained(dit / "transformer")
        del transformer
        sd_vae_shaped().save_pretrained(dit / "vae")
        schedule = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
        DDIMScheduler(**schedule, clip_sample=False).save_pretrained(dit / "scheduler")
    weights = fixture_paths(root)["weights"]
    if not weights.is_file():
        save_file(timm.create_model("resnet50", pretrained=False).state_dict(), str(weights))
    paths = fixture_paths(root)
    make_toy_market(paths["market"], **TOY_MARKET)
    make_toy_faces(paths["faces"], **TOY_FACES)
    _face_bin(paths["faces"], paths["bin"])
    return paths


def _share_like_the_original(transformer: torch.nn.Module) -> None:
    """Copy block 0's label table and timestep MLP into every block, as in the converted DiT checkpoints
    (the original DiT has one of each; diffusers keeps a copy per block)."""
    blocks = transformer.transformer_blocks
    with torch.no_grad():
        for name in ("class_embedder", "timestep_embedder"):
            first = getattr(blocks[0].norm1.emb, name).state_dict()
            for block in blocks[1:]:
                getattr(block.norm1.emb, name).load_state_dict(first)


def _face_bin(faces: Path, path: Path) -> Path:
    """An insightface .bin of 20 pairs (genuine / impostor alternating) of the toy faces."""
    from rgsd_lightning.data.pairs import write_verification_bin

    if path.is_file():
        return path
    people = sorted(p for p in faces.iterdir() if p.is_dir())
    images = [sorted(p.glob("*.png")) for p in people]
    bins, issame = [], []
    for i in range(20):
        same = i % 2 == 0
        first = images[0][i % 4]
        second = images[0][(i + 1) % 4] if same else images[1][i % 4]
        bins += [first.read_bytes(), second.read_bytes()]
        issame.append(same)
    write_verification_bin(path, bins, issame)
    return path


def count_parameters(folder: Path) -> int:
    """Number of parameters stored in the safetensors files of a diffusers model folder."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                total += int(torch.Size(fh.get_slice(key).get_shape()).numel())
    return total
