"""The generator of every stage: a diffusers DiT with ONE shared identity-label table, plus an optional VAE.

diffusers' ``DiTTransformer2DModel`` keeps a label table (and a timestep MLP) per block and draws its own
label dropout per block. We tie all blocks to one ``nn.Embedding(N + 1, hidden)`` (row N = null/CFG label),
switch the built-in dropout off (labels are dropped once per sample with :func:`drop_labels`), apply the
DiT paper initialisation to models built from scratch and build the :class:`DiTGenerator` of a stage. The
generator module itself, with its self-describing export folders, is in
:mod:`rgsd_lightning.diffusion.generator`.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from torch import nn

from rgsd_lightning.assets import resolve_builtin
from rgsd_lightning.diffusion.generator import (
    DiTGenerator,
    check_identities_match,
    class_embedder,
    is_hub_id,
    load_from_hub,
    load_vae,
    share_label_table,
)

__all__ = [
    "INIT_ROWS",
    "LABEL_SPACES",
    "PRESETS",
    "build_dit",
    "dit_initialize_",
    "drop_labels",
    "set_trainable",
    "swap_label_space",
    "tie_timestep_embedders",
]

PRESETS: dict[str, dict[str, Any]] = {
    # diffusers' own unit-test size, pixel space.
    "tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, patch_size=2, sample_size=8),
    # notes/cpu_feasibility.md: 32x32, patch 4, hidden 128 = 4 x 32, depth 4, ~10 it/s on 2 CPU cores.
    "small": dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, patch_size=4, sample_size=32),
    # DiT-S/2 (the DiT paper's smallest model: 12 layers, hidden 384 = 6 x 64, patch 2) at 32x32 pixels,
    # 256 tokens: a GPU-sized prior (benchmarks/configs/utility_reid_gpu.yaml); about 33 M parameters.
    "s2": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, patch_size=2, sample_size=32),
    # DiT-XL/2 at 256 px: latent 32x32x4, learned-sigma head (8 out channels); random init.
    "xl2": dict(
        num_layers=28,
        num_attention_heads=16,
        attention_head_dim=72,
        patch_size=2,
        sample_size=32,
        in_channels=4,
        out_channels=8,
    ),
}
LABEL_SPACES = ("swap", "keep")
INIT_ROWS = ("zero", "null", "mean")


# ----------------------------------------------------------------------------------------------- helpers
def _is_export(source: str | os.PathLike) -> bool:
    return (Path(source).expanduser() / "labels.json").is_file()


def tie_timestep_embedders(transformer: DiTTransformer2DModel) -> None:
    """Let every block use block 0's timestep MLP (official DiT has a single ``t_embedder``)."""
    shared = transformer.transformer_blocks[0].norm1.emb.timestep_embedder
    for block in transformer.transformer_blocks[1:]:
        block.norm1.emb.timestep_embedder = shared


@torch.no_grad()
def dit_initialize_(transformer: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """DiT paper initialisation (diffusers applies none), in place; returns ``transformer``.

    xavier-uniform Linear weights with zero biases, the patch-embedding conv initialised like a Linear,
    timestep MLP and label table N(0, 0.02), adaLN modulation (every ``norm1.linear`` and ``proj_out_1``)
    and the final projection ``proj_out_2`` zero.
    """
    for module in transformer.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    conv = transformer.pos_embed.proj
    nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    seen: set[int] = set()
    for block in transformer.transformer_blocks:
        emb = block.norm1.emb
        for param in (
            class_embedder(block).embedding_table.weight,
            emb.timestep_embedder.linear_1.weight,
            emb.timestep_embedder.linear_2.weight,
        ):
            if id(param) not in seen:
                seen.add(id(param))
                nn.init.normal_(param, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (transformer.proj_out_1, transformer.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return transformer


@torch.no_grad()
def swap_label_space(
    transformer: DiTTransformer2DModel, num_identities: int, init_rows: str = "null", source: str = ""
) -> nn.Embedding:
    """Replace the label table of every block by one shared table of ``num_identities + 1`` rows.

    The null row (index N) is the pretrained null row (row ``num_embeds_ada_norm`` of block 0's table);
    identity rows are ``init_rows``: "zero" (paper), "null" (copies of the null row) or "mean" (mean of
    the old class rows). Returns the new shared table.
    """
    if init_rows not in INIT_ROWS:
        raise ValueError(f"init_rows={init_rows!r}: expected one of {INIT_ROWS}")
    old_n = int(transformer.config.num_embeds_ada_norm)
    old = class_embedder(transformer.transformer_blocks[0]).embedding_table
    if old.num_embeddings < old_n + 1:
        raise ValueError(f"{source or 'pretrained model'}: label table has no null row (index {old_n})")
    tables = [class_embedder(b).embedding_table.weight for b in transformer.transformer_blocks]
    if any(not torch.equal(tables[0], t) for t in tables[1:]):
        warnings.warn(
            f"{source or 'pretrained model'}: the per-block label tables differ; using block 0's null row",
            stacklevel=2,
        )
    null = old.weight[old_n].detach()
    if init_rows == "zero":
        rows = torch.zeros(num_identities, null.numel(), dtype=null.dtype, device=null.device)
    elif init_rows == "null":
        rows = null.expand(num_identities, -1)
    else:
        rows = old.weight[:old_n].detach().mean(0, keepdim=True).expand(num_identities, -1)
    table = nn.Embedding(num_identities + 1, null.numel(), device=null.device, dtype=null.dtype)
    table.weight.copy_(torch.cat([rows, null[None]], 0))
    share_label_table(transformer, table)
    return table


def drop_labels(
    labels: torch.Tensor, p: float, null_label: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by ``null_label`` with probability ``p``: one draw per sample (CFG training)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label dropout p={p} must lie in [0, 1]")
    if p == 0.0:
        return labels
    device = generator.device if generator is not None else labels.device
    drop = torch.rand(labels.shape[0], generator=generator, device=device).to(labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def set_trainable(generator: DiTGenerator, trainable: str | list[str] = "label_table") -> list[str]:
    """Freeze everything except ``trainable``; returns the trainable parameter names.

    ``trainable``: "label_table" (the shared table only; paper), "adaln" (table + every ``norm1.linear``
    + ``proj_out_1``), "all" (the whole transformer) or a list of fnmatch patterns over the names of
    ``generator.named_parameters()``. The VAE is always frozen and in eval mode.
    """
    named = [(n, p) for n, p in generator.named_parameters() if not n.startswith("vae.")]
    table_id = id(generator.label_table.weight)
    if trainable == "label_table":
        keep = {n for n, p in named if id(p) == table_id}
    elif trainable == "adaln":
        pats = ["transformer.transformer_blocks.*.norm1.linear.*", "transformer.proj_out_1.*"]
        keep = {n for n, p in named if id(p) == table_id or any(fnmatch.fnmatchcase(n, q) for q in pats)}
    elif trainable == "all":
        keep = {n for n, _ in named}
    elif isinstance(trainable, (list, tuple)):
        keep = set()
        for pattern in trainable:
            hits = {n for n, _ in named if fnmatch.fnmatchcase(n, pattern)}
            if not hits:
                raise ValueError(f"trainable pattern {pattern!r} matches no generator parameter")
            keep |= hits
    else:
        raise ValueError(f"trainable={trainable!r}: expected 'label_table', 'adaln', 'all' or a pattern list")
    for name, param in named:
        param.requires_grad_(name in keep)
    if generator.vae is not None:
        generator.vae.requires_grad_(False).eval()
    return [n for n, _ in named if n in keep]


# ------------------------------------------------------------------------------------------- loading
def _load_transformer(
    source: str, local_files_only: bool | None
) -> tuple[DiTTransformer2DModel, dict[str, Any] | None]:
    """(transformer, scheduler config or None) from a diffusers folder/pipeline folder or a hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no transformer config (config.json or transformer/config.json)")
        sched = path / "scheduler" / "scheduler_config.json"
        config = json.loads(sched.read_text()) if sched.is_file() else None
        return DiTTransformer2DModel.from_pretrained(folder), config
    if not is_hub_id(source):
        raise FileNotFoundError(f"pretrained={source!r} is neither a local folder nor a hub id")
    kwargs: dict[str, Any] = {"what": "pretrained", "local_files_only": local_files_only}
    try:
        transformer = load_from_hub(
            DiTTransformer2DModel.from_pretrained, source, subfolder="transformer", **kwargs
        )
    except OSError:  # a bare transformer repository (config.json at the top)
        transformer = load_from_hub(DiTTransformer2DModel.from_pretrained, source, **kwargs)
    try:
        config = dict(load_from_hub(DDPMScheduler.load_config, source, subfolder="scheduler", **kwargs))
    except OSError:
        warnings.warn(f"{source}: no scheduler config found; using the DiT default schedule", stacklevel=3)
        config = None
    return transformer, config


def _resolve_vae(
    vae: str | AutoencoderKL | None, pretrained: str | None, local_files_only: bool | None, channels: int
) -> tuple[AutoencoderKL | None, dict[str, Any] | None]:
    """(VAE module, source record or None when it must be saved as weights)."""
    if vae is None:
        return None, None
    if isinstance(vae, AutoencoderKL):
        return vae, None
    if vae == "tiny":
        return AutoencoderKL(in_channels=channels, out_channels=channels), None
    if vae == "pretrained":
        if pretrained is None:
            raise ValueError("vae='pretrained' needs `pretrained` (a folder or hub id with a vae/ subfolder)")
        source, subfolder = pretrained, "vae"
    else:
        source, subfolder = vae, None
    path = Path(source).expanduser()
    record_source = str(path.resolve()) if path.exists() else str(source)
    what = "vae='pretrained' (the vae/ of `pretrained`)" if vae == "pretrained" else "vae"
    model = load_vae(source, subfolder=subfolder, local_files_only=local_files_only, what=what)
    return model, {"source": record_source, "subfolder": subfolder}


def _transformer_from_preset(
    preset: str,
    overrides: dict[str, Any] | None,
    channels: int,
    vae: AutoencoderKL | None,
    image_size: int | None,
    num_identities: int,
) -> tuple[DiTTransformer2DModel, int]:
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {sorted(PRESETS)}")
    factor = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
    in_ch = channels if vae is None else int(vae.config.latent_channels)
    config: dict[str, Any] = {"in_channels": in_ch, "out_channels": 2 * in_ch, **PRESETS[preset]}
    if image_size is not None:
        if image_size % factor:
            raise ValueError(f"image_size={image_size} is not a multiple of the VAE factor {factor}")
        config["sample_size"] = image_size // factor
    config.update(overrides or {})
    valid = set(inspect.signature(DiTTransformer2DModel.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - valid)
    if unknown:
        raise ValueError(f"preset_overrides: unknown DiT config keys {unknown}")
    config["num_embeds_ada_norm"] = num_identities
    transformer = DiTTransformer2DModel(**config)
    return transformer, image_size if image_size is not None else int(config["sample_size"]) * factor


def build_dit(
    *,
    num_identities: int,
    identities: list[str] | None = None,
    pretrained: str | os.PathLike | None = None,
    vae: str | AutoencoderKL | None = None,
    preset: str | None = None,
    preset_overrides: dict[str, Any] | None = None,
    label_space: str = "swap",
    init_rows: str = "null",
    trainable: str | list[str] = "label_table",
    image_size: int | None = None,
    channels: int | None = None,
    local_files_only: bool | None = None,
    scheduler_config: dict[str, Any] | None = None,
) -> DiTGenerator:
    """Build the generator of a stage (returned in eval mode, frozen except ``trainable``).

    Args:
        num_identities: N, number of identity labels (null label = N).
        identities: identity names (default "0".."N-1"); their count must be N.
        pretrained: local folder or hub id of a diffusers DiT (pipeline layout with ``transformer/`` or a
            bare transformer folder), one of our exports, or ``builtin:<name>`` (an export shipped in the
            package, :mod:`rgsd_lightning.assets`); None builds from ``preset``.
        vae: None (pixel mode; an export brings its own VAE), "pretrained" (the ``vae/`` of ``pretrained``),
            a local folder / hub id, "tiny" (random ``AutoencoderKL()`` with ``channels`` in/out) or an
            ``AutoencoderKL`` instance.
        preset: "tiny", "small", "s2" or "xl2" when ``pretrained`` is None (DiT paper initialisation
            applied, the timestep MLPs tied into one).
        preset_overrides: DiT config keys replacing the preset's.
        label_space: "swap" (new shared table of N + 1 rows) or "keep" (an export whose labels equal ours).
        init_rows: identity rows of a swapped table: "null" (copies of the null row), "zero" or "mean".
        trainable: see :func:`set_trainable`.
        image_size: pixel side (default: the transformer's sample size times the VAE factor).
        channels: pixel channels (default 3; an export's own value when loading one of our exports).
        local_files_only: passed to diffusers for hub ids (None = diffusers' default).
        scheduler_config: noise schedule of a model built from ``preset`` (``DDPMScheduler`` keys, e.g.
            ``{"beta_schedule": "squaredcos_cap_v2"}``; default: DiT's linear schedule). A pretrained model
            keeps the schedule it was trained with, so giving one with ``pretrained`` is a ValueError.
    """
    if identities is None:
        identities = [str(i) for i in range(num_identities)]
    identities = [str(i) for i in identities]
    if num_identities < 1 or len(identities) != num_identities:
        raise ValueError(f"num_identities={num_identities} but {len(identities)} identity names were given")
    if label_space not in LABEL_SPACES:
        raise ValueError(f"label_space={label_space!r}: expected one of {LABEL_SPACES}")
    if (pretrained is None) == (preset is None):
        raise ValueError("give exactly one of `pretrained` (folder or hub id) and `preset`")
    if pretrained is not None and scheduler_config is not None:
        raise ValueError(
            f"scheduler_config is only for models built from a preset: pretrained={str(pretrained)!r} keeps "
            "the noise schedule it was trained with"
        )
    if pretrained is not None:
        pretrained = resolve_builtin(pretrained)

    if channels is None and not (pretrained is not None and _is_export(pretrained)):
        channels = 3
    if pretrained is None:
        if label_space == "keep":
            raise ValueError("label_space='keep' needs `pretrained` to be one of our exports")
        vae_model, vae_source = _resolve_vae(vae, None, local_files_only, channels)
        transformer, size = _transformer_from_preset(
            preset, preset_overrides, channels, vae_model, image_size, num_identities
        )
        table = class_embedder(transformer.transformer_blocks[0]).embedding_table
        share_label_table(transformer, table)
        tie_timestep_embedders(transformer)
        dit_initialize_(transformer)
        generator = DiTGenerator(
            transformer,
            vae_model,
            identities,
            image_size=size,
            channels=channels,
            preset=preset,
            vae_source=vae_source,
            tied_timestep_embedder=True,
            scheduler_config=scheduler_config,
        )
    elif _is_export(pretrained):
        base = DiTGenerator.from_pretrained(pretrained)
        if label_space == "keep":
            check_identities_match(base.identities, identities, str(pretrained))
        else:
            swap_label_space(base.transformer, num_identities, init_rows, source=str(pretrained))
        vae_model, vae_source = base.vae, base.vae_source
        if vae is not None and vae != "pretrained":
            vae_model, vae_source = _resolve_vae(vae, str(pretrained), local_files_only, base.channels)
        generator = DiTGenerator(
            base.transformer,
            vae_model,
            identities,
            image_size=image_size or base.image_size,
            channels=base.channels if channels is None else channels,
            scheduler_config=base.scheduler_config,
            preset=base.preset,
            vae_source=vae_source,
            tied_timestep_embedder=base.tied_timestep_embedder,
        )
    else:
        if label_space == "keep":
            raise ValueError(f"label_space='keep' needs one of our exports (with labels.json): {pretrained}")
        transformer, sched = _load_transformer(str(pretrained), local_files_only)
        swap_label_space(transformer, num_identities, init_rows, source=str(pretrained))
        vae_model, vae_source = _resolve_vae(vae, str(pretrained), local_files_only, channels)
        factor = 1 if vae_model is None else 2 ** (len(vae_model.config.block_out_channels) - 1)
        generator = DiTGenerator(
            transformer,
            vae_model,
            identities,
            image_size=image_size or int(transformer.config.sample_size) * factor,
            channels=channels,
            scheduler_config=sched,
            vae_source=vae_source,
        )
    set_trainable(generator, trainable)
    return generator.eval()
