"""The generator of every stage: a diffusers DiT with ONE shared identity-label table, plus an optional VAE.

diffusers' ``DiTTransformer2DModel`` keeps a label table (and a timestep MLP) per block and draws its own
label dropout per block. We tie all blocks to one ``nn.Embedding(N + 1, hidden)`` (row N = null/CFG label),
switch the built-in dropout off (labels are dropped once per sample with :func:`drop_labels`), apply the
DiT paper initialisation to models built from scratch and write/read self-describing export folders.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import inspect
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from torch import nn

from rgsd_lightning.diffusion.schedule import alphas_cumprod as _alphas_cumprod
from rgsd_lightning.diffusion.schedule import clean_scheduler_config

EXPORT_FORMAT = 1
PRESETS: dict[str, dict[str, Any]] = {
    # diffusers' own unit-test size, pixel space.
    "tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, patch_size=2, sample_size=8),
    # notes/cpu_feasibility.md: 32x32, patch 4, hidden 128 = 4 x 32, depth 4, ~10 it/s on 2 CPU cores.
    "small": dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, patch_size=4, sample_size=32),
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
_ARCH_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "sample_size")
_ARCH_KEYS += ("in_channels", "out_channels", "num_embeds_ada_norm")
INIT_ROWS = ("zero", "null", "mean")


# ----------------------------------------------------------------------------------------------- helpers
def _class_embedder(block: nn.Module) -> nn.Module:
    return block.norm1.emb.class_embedder


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not a complete rgsd generator export?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err


def _is_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not name.startswith((".", "/", "~"))


def _is_export(source: str | os.PathLike) -> bool:
    return (Path(source).expanduser() / "labels.json").is_file()


def share_label_table(transformer: DiTTransformer2DModel, table: nn.Embedding) -> None:
    """Make every block use ``table`` (N + 1 rows, row N = null), with diffusers' own dropout off."""
    num_identities = table.num_embeddings - 1
    for block in transformer.transformer_blocks:
        embedder = _class_embedder(block)
        embedder.embedding_table = table
        embedder.num_classes = num_identities
        embedder.dropout_prob = 0.0
    transformer.register_to_config(num_embeds_ada_norm=num_identities)


def tie_timestep_embedders(transformer: DiTTransformer2DModel) -> None:
    """Let every block use block 0's timestep MLP (official DiT has a single ``t_embedder``)."""
    shared = transformer.transformer_blocks[0].norm1.emb.timestep_embedder
    for block in transformer.transformer_blocks[1:]:
        block.norm1.emb.timestep_embedder = shared


def _retie(transformer: DiTTransformer2DModel, attr: str, what: str, source: str) -> None:
    """Tie a per-block module (loaded as independent copies) back to block 0's, warning if copies differ."""

    def owner(block: nn.Module) -> nn.Module:
        return block.norm1.emb if attr == "timestep_embedder" else _class_embedder(block)

    blocks = transformer.transformer_blocks
    first = getattr(owner(blocks[0]), attr)
    ref = first.state_dict()
    for block in blocks[1:]:
        other = getattr(owner(block), attr).state_dict()
        if any(not torch.equal(ref[k], other[k]) for k in ref):
            warnings.warn(f"{source}: the per-block {what} copies differ; using block 0's", stacklevel=3)
            break
    for block in blocks[1:]:
        setattr(owner(block), attr, first)


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
            _class_embedder(block).embedding_table.weight,
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
    old = _class_embedder(transformer.transformer_blocks[0]).embedding_table
    if old.num_embeddings < old_n + 1:
        raise ValueError(f"{source or 'pretrained model'}: label table has no null row (index {old_n})")
    tables = [_class_embedder(b).embedding_table.weight for b in transformer.transformer_blocks]
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


# ------------------------------------------------------------------------------------------- the module
class DiTGenerator(nn.Module):
    """DiT transformer (one shared label table) + optional VAE + schedule and label facts of a stage.

    Args:
        transformer: diffusers ``DiTTransformer2DModel`` whose blocks all share one label table of N + 1 rows.
        vae: ``AutoencoderKL`` for latent mode, or None for pixel mode (transformer works on images).
        identities: identity names; index i is label i, label N = len(identities) is the null label.
        image_size: pixel side of the (square) images.
        channels: pixel channels of the images.
        scheduler_config: diffusers ``DDPMScheduler`` config (default: 1000 steps, linear 1e-4..0.02).
        preset: name of the preset the transformer was built from (recorded in exports), or None.
        vae_source: {"source": path or hub id, "subfolder": str | None} the VAE was loaded from, or None.
        tied_timestep_embedder: whether all blocks share block 0's timestep MLP (models built from scratch).
    """

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        vae: AutoencoderKL | None,
        identities: list[str],
        *,
        image_size: int,
        channels: int = 3,
        scheduler_config: dict[str, Any] | None = None,
        preset: str | None = None,
        vae_source: dict[str, Any] | None = None,
        tied_timestep_embedder: bool = False,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.vae = vae
        self.identities = [str(i) for i in identities]
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.scheduler_config = clean_scheduler_config(scheduler_config)
        self.preset = preset
        self.vae_source = vae_source
        self.tied_timestep_embedder = tied_timestep_embedder
        self._alphas_cumprod: torch.Tensor | None = None
        self._validate()
        for block in transformer.transformer_blocks:
            _class_embedder(block).dropout_prob = 0.0
        if vae is not None:
            vae.requires_grad_(False).eval()

    def _validate(self) -> None:
        n = self.num_identities
        table = self.label_table
        if any(_class_embedder(b).embedding_table is not table for b in self.transformer.transformer_blocks):
            raise ValueError("every transformer block must share one label table (use share_label_table)")
        if table.num_embeddings != n + 1 or int(self.transformer.config.num_embeds_ada_norm) != n:
            raise ValueError(
                f"label table has {table.num_embeddings} rows and num_embeds_ada_norm="
                f"{self.transformer.config.num_embeds_ada_norm}; {n} identities need {n + 1} rows and {n}"
            )
        in_ch = int(self.transformer.config.in_channels)
        if self.vae is None:
            if in_ch != self.channels:
                raise ValueError(
                    f"latent mode needs a VAE: the transformer takes {in_ch} channels but images have "
                    f"{self.channels}; pass vae='pretrained', a VAE folder / hub id or 'tiny'"
                )
        else:
            if int(self.vae.config.latent_channels) != in_ch:
                raise ValueError(
                    f"VAE latent_channels={self.vae.config.latent_channels} != DiT in_channels={in_ch}"
                )
            if int(self.vae.config.in_channels) != self.channels:
                raise ValueError(f"VAE in_channels={self.vae.config.in_channels} != channels={self.channels}")
        step = self.vae_scale_factor * int(self.transformer.config.patch_size)
        if self.image_size <= 0 or self.image_size % step:
            raise ValueError(f"image_size={self.image_size} must be a positive multiple of {step}")

    # ------------------------------------------------------------------------------------ properties
    @property
    def label_table(self) -> nn.Embedding:
        """The ONE label table (N + 1 rows) every block uses."""
        return _class_embedder(self.transformer.transformer_blocks[0]).embedding_table

    @property
    def num_identities(self) -> int:
        """N, the number of identity labels."""
        return len(self.identities)

    @property
    def null_label(self) -> int:
        """The null (unconditional) label, = N."""
        return len(self.identities)

    @property
    def in_channels(self) -> int:
        """Channels the transformer sees (and whose ε it predicts)."""
        return int(self.transformer.config.in_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Spatial down-sampling of the VAE (1 in pixel mode)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of what the transformer sees."""
        side = self.image_size // self.vae_scale_factor
        return (self.in_channels, side, side)

    @property
    def num_train_timesteps(self) -> int:
        """T of the training schedule."""
        return int(self.scheduler_config["num_train_timesteps"])

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t (fp32, CPU; never cast with the module's dtype)."""
        if self._alphas_cumprod is None:
            self._alphas_cumprod = _alphas_cumprod(self.scheduler_config)
        return self._alphas_cumprod

    @property
    def device(self) -> torch.device:
        """Device of the transformer."""
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the transformer."""
        return next(self.transformer.parameters()).dtype

    def train(self, mode: bool = True) -> DiTGenerator:
        """Set the transformer's mode; the VAE always stays in eval mode."""
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        return self

    # ---------------------------------------------------------------------------------------- compute
    def check_labels(self, labels: torch.Tensor, allow_null: bool = True) -> None:
        """Raise ValueError naming the first label outside [0, N] ([0, N) when ``allow_null`` is False)."""
        high = self.null_label if allow_null else self.null_label - 1
        bad = labels[(labels < 0) | (labels > high)]
        if bad.numel():
            raise ValueError(
                f"label {int(bad[0])} out of range: labels must lie in [0, {high}] "
                f"(N = {self.num_identities} identities, null label {self.null_label})"
            )

    @contextlib.contextmanager
    def trusted_labels(self) -> Iterator[None]:
        """Skip the per-forward label check inside the block (the caller checked the labels once).

        The check reads the labels' min/max, a device synchronisation on GPUs; sampling loops check once
        up front and run their steps inside this block.
        """
        previous = getattr(self, "_labels_trusted", False)
        self._labels_trusted = True
        try:
            yield
        finally:
            self._labels_trusted = previous

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor | int, labels: torch.Tensor) -> torch.Tensor:
        """Predicted ε (the first ``in_channels`` output channels; learned-variance channels are dropped)."""
        labels = torch.as_tensor(labels, device=x_t.device, dtype=torch.long)
        if not getattr(self, "_labels_trusted", False):
            self.check_labels(labels)
        timesteps = torch.as_tensor(timesteps, device=x_t.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x_t.shape[0])
        out = self.transformer(
            x_t.to(self.dtype), timestep=timesteps, class_labels=labels, return_dict=False
        )[0]
        return out[:, : self.in_channels]

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """Images in [-1, 1] -> what the transformer sees (latents × ``vae.config.scaling_factor``).

        Uses the posterior mean by default (deterministic, so latents can be pre-encoded once);
        ``sample=True`` draws from the posterior as official DiT training does. Identity in pixel mode.
        """
        if self.vae is None:
            return images
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode`, clamped to [-1, 1] (pixel mode: just the clamp)."""
        if self.vae is None:
            return latents.clamp(-1.0, 1.0)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
        return self.vae.decode(z, return_dict=False)[0].clamp(-1.0, 1.0)

    # ------------------------------------------------------------------------------------------ export
    def _generator_facts(self) -> dict[str, Any]:
        import diffusers

        import rgsd_lightning

        cfg = self.transformer.config
        return {
            "format": EXPORT_FORMAT,
            "image_size": self.image_size,
            "channels": self.channels,
            "latent": self.vae is not None,
            "latent_shape": list(self.latent_shape),
            "vae_scale_factor": self.vae_scale_factor,
            "preset": self.preset,
            "tied_timestep_embedder": self.tied_timestep_embedder,
            "architecture": {k: cfg[k] for k in _ARCH_KEYS},
            "rgsd_lightning_version": rgsd_lightning.__version__,
            "diffusers_version": diffusers.__version__,
            "torch_version": torch.__version__,
        }

    def _save_transformer(self, directory: Path) -> None:
        """diffusers save with every block holding its own clone of the shared modules (safetensors)."""
        blocks = self.transformer.transformer_blocks
        table = self.label_table
        time_mlp = blocks[0].norm1.emb.timestep_embedder
        tied_time = [b.norm1.emb.timestep_embedder is time_mlp for b in blocks]
        try:
            for block, tied in zip(blocks[1:], tied_time[1:], strict=True):
                clone = nn.Embedding(table.num_embeddings, table.embedding_dim, device=table.weight.device)
                clone.weight = nn.Parameter(table.weight.detach().clone())
                _class_embedder(block).embedding_table = clone
                if tied:
                    block.norm1.emb.timestep_embedder = copy.deepcopy(time_mlp)
            self.transformer.save_pretrained(directory, safe_serialization=True)
        finally:
            for block, tied in zip(blocks, tied_time, strict=True):
                _class_embedder(block).embedding_table = table
                if tied:
                    block.norm1.emb.timestep_embedder = time_mlp

    def save_pretrained(self, directory: str | os.PathLike, provenance: dict[str, Any] | None = None) -> Path:
        """Write an export folder atomically (temp sibling + rename); returns its path.

        Contents: ``transformer/`` (diffusers, safetensors), ``vae/`` (VAE built from a config) or
        ``vae.json`` (the source it was loaded from), ``scheduler/``, ``labels.json``, ``generator.json``
        and ``provenance.json`` when given.
        """
        target = Path(directory).expanduser().absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            self._save_transformer(tmp / "transformer")
            if self.vae is not None and self.vae_source is not None:
                _write_json(tmp / "vae.json", dict(self.vae_source))
            elif self.vae is not None:
                self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            DDPMScheduler(**self.scheduler_config).save_pretrained(tmp / "scheduler")
            labels = {"identities": self.identities, "num_identities": self.num_identities}
            _write_json(tmp / "labels.json", {**labels, "null_index": self.null_label})
            _write_json(tmp / "generator.json", self._generator_facts())
            if provenance is not None:
                _write_json(tmp / "provenance.json", provenance)
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
                target.rename(old)
            tmp.rename(target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        identities: list[str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> DiTGenerator:
        """Load an export written by :meth:`save_pretrained` (shared modules are tied again).

        ``identities`` (when given) must equal the export's labels, else ValueError: an export is never
        silently re-initialised for another label space.
        """
        root = Path(directory).expanduser()
        labels = _read_json(root / "labels.json")
        facts = _read_json(root / "generator.json")
        names = [str(n) for n in labels["identities"]]
        if identities is not None:
            check_identities_match(names, list(identities), str(root))
        transformer = DiTTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=dtype)
        _retie(transformer, "embedding_table", "label table", str(root))
        share_label_table(transformer, _class_embedder(transformer.transformer_blocks[0]).embedding_table)
        if facts.get("tied_timestep_embedder"):
            _retie(transformer, "timestep_embedder", "timestep MLP", str(root))
        vae, vae_source = None, None
        if (root / "vae.json").is_file():
            vae_source = _read_json(root / "vae.json")
            vae = load_vae(vae_source["source"], subfolder=vae_source.get("subfolder"), dtype=dtype)
        elif (root / "vae").is_dir():
            vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype)
        scheduler = DDPMScheduler.load_config(root / "scheduler")
        generator = cls(
            transformer,
            vae,
            names,
            image_size=facts["image_size"],
            channels=facts["channels"],
            scheduler_config=scheduler,
            preset=facts.get("preset"),
            vae_source=vae_source,
            tied_timestep_embedder=bool(facts.get("tied_timestep_embedder")),
        )
        if device is not None:
            generator.to(device)
        return generator.eval()


def check_identities_match(export_names: list[str], data_names: list[str], where: str) -> None:
    """ValueError unless an export's identities equal the data's (count first, then names and order)."""
    if len(export_names) != len(data_names):
        raise ValueError(
            f"{where}: export has {len(export_names)} identities, the data has {len(data_names)}; "
            "use label_space='swap' to start a new label space"
        )
    if export_names != data_names:
        diff = next(i for i, (a, b) in enumerate(zip(export_names, data_names, strict=True)) if a != b)
        raise ValueError(
            f"{where}: identity {diff} is {export_names[diff]!r} in the export but {data_names[diff]!r} "
            "in the data (names and order must match)"
        )


# ------------------------------------------------------------------------------------------- loading
def load_vae(
    source: str | os.PathLike,
    *,
    subfolder: str | None = None,
    dtype: torch.dtype | None = None,
    local_files_only: bool | None = None,
) -> AutoencoderKL:
    """``AutoencoderKL.from_pretrained`` from a local folder or a hub id (FileNotFoundError otherwise)."""
    path = Path(source).expanduser()
    if path.exists():
        folder = path / subfolder if subfolder else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: no VAE config.json")
        return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype)
    if not _is_hub_id(str(source)):
        raise FileNotFoundError(f"VAE source {str(source)!r} is neither a local folder nor a hub id")
    kwargs = {"local_files_only": local_files_only} if local_files_only is not None else {}
    return AutoencoderKL.from_pretrained(str(source), subfolder=subfolder, torch_dtype=dtype, **kwargs)


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
    if not _is_hub_id(source):
        raise FileNotFoundError(f"pretrained={source!r} is neither a local folder nor a hub id")
    kwargs = {"local_files_only": local_files_only} if local_files_only is not None else {}
    try:
        transformer = DiTTransformer2DModel.from_pretrained(source, subfolder="transformer", **kwargs)
    except OSError:
        transformer = DiTTransformer2DModel.from_pretrained(source, **kwargs)
    try:
        config = dict(DDPMScheduler.load_config(source, subfolder="scheduler", **kwargs))
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
    model = load_vae(source, subfolder=subfolder, local_files_only=local_files_only)
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
) -> DiTGenerator:
    """Build the generator of a stage (returned in eval mode, frozen except ``trainable``).

    Args:
        num_identities: N, number of identity labels (null label = N).
        identities: identity names (default "0".."N-1"); their count must be N.
        pretrained: local folder or hub id of a diffusers DiT (pipeline layout with ``transformer/`` or a
            bare transformer folder) or one of our exports; None builds from ``preset``.
        vae: None (pixel mode; an export brings its own VAE), "pretrained" (the ``vae/`` of ``pretrained``),
            a local folder / hub id, "tiny" (random ``AutoencoderKL()`` with ``channels`` in/out) or an
            ``AutoencoderKL`` instance.
        preset: "tiny", "small" or "xl2" when ``pretrained`` is None (DiT paper initialisation applied, the
            timestep MLPs tied into one).
        preset_overrides: DiT config keys replacing the preset's.
        label_space: "swap" (new shared table of N + 1 rows) or "keep" (an export whose labels equal ours).
        init_rows: identity rows of a swapped table: "null" (copies of the null row), "zero" or "mean".
        trainable: see :func:`set_trainable`.
        image_size: pixel side (default: the transformer's sample size times the VAE factor).
        channels: pixel channels (default 3; an export's own value when loading one of our exports).
        local_files_only: passed to diffusers for hub ids (None = diffusers' default).
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

    if channels is None and not (pretrained is not None and _is_export(pretrained)):
        channels = 3
    if pretrained is None:
        if label_space == "keep":
            raise ValueError("label_space='keep' needs `pretrained` to be one of our exports")
        vae_model, vae_source = _resolve_vae(vae, None, local_files_only, channels)
        transformer, size = _transformer_from_preset(
            preset, preset_overrides, channels, vae_model, image_size, num_identities
        )
        table = _class_embedder(transformer.transformer_blocks[0]).embedding_table
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
