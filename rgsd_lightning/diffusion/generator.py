"""DiTGenerator: a diffusers DiT with ONE shared identity-label table, plus an optional VAE, and its export.

diffusers' ``DiTTransformer2DModel`` keeps a label table (and a timestep MLP) per block and draws its own
label dropout per block. All blocks of a :class:`DiTGenerator` share one ``nn.Embedding(N + 1, hidden)``
(row N = null/CFG label) with the built-in dropout off. Exports are self-describing folders
(:meth:`DiTGenerator.save_pretrained` / :meth:`DiTGenerator.from_pretrained`); building, label-space swaps
and freezing are in :mod:`rgsd_lightning.diffusion.dit`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from torch import nn

from rgsd_lightning.assets import resolve_builtin
from rgsd_lightning.diffusion.schedule import alphas_cumprod as _alphas_cumprod
from rgsd_lightning.diffusion.schedule import clean_scheduler_config
from rgsd_lightning.io import atomic_folder

EXPORT_FORMAT = 1
_T = TypeVar("_T")
_ARCH_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "patch_size", "sample_size")
_ARCH_KEYS += ("in_channels", "out_channels", "num_embeds_ada_norm")


# ----------------------------------------------------------------------------------------------- helpers
def class_embedder(block: nn.Module) -> nn.Module:
    """The label embedder of a diffusers DiT block (it holds the block's label table)."""
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


def is_hub_id(name: str) -> bool:
    """Whether ``name`` looks like a Hugging Face hub id (``owner/name``) rather than a local path."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not name.startswith((".", "/", "~"))


def _hub_offline() -> bool:
    """Whether Hugging Face downloads are switched off (``HF_HUB_OFFLINE``), read at call time."""
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        return True
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def load_from_hub(
    load: Callable[..., _T],
    hub_id: str,
    *,
    what: str,
    subfolder: str | None = None,
    local_files_only: bool | None = None,
    **kwargs: Any,
) -> _T:
    """``load(hub_id, subfolder=..., local_files_only=..., **kwargs)`` (a diffusers ``from_pretrained`` or
    ``load_config``) for a hub id: from the local Hugging Face cache first, without touching the network;
    from the hub only when it is not cached and downloads are allowed (``local_files_only`` not True and
    ``HF_HUB_OFFLINE`` unset). Failure is a FileNotFoundError naming ``what``, the id and how to give a
    local folder instead.
    """
    where = f"{hub_id}/{subfolder}" if subfolder else hub_id
    try:
        return load(hub_id, subfolder=subfolder, local_files_only=True, **kwargs)
    except OSError as err:
        cached_error = err
    local_folder = (
        f"download it once (`huggingface-cli download {hub_id}` on a machine with network access) and give "
        "the local folder instead of the hub id"
    )
    if local_files_only or _hub_offline():
        raise FileNotFoundError(
            f"{what}: hub id {where!r} is not in the local Hugging Face cache and downloads are off "
            f"(HF_HUB_OFFLINE=1 or local_files_only); {local_folder}"
        ) from cached_error
    try:
        return load(hub_id, subfolder=subfolder, local_files_only=False, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"{what}: hub id {where!r} is not in the local Hugging Face cache and could not be fetched "
            f"({err}); {local_folder}"
        ) from err


def as_labels(labels: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """Class labels as a long tensor; ValueError for float (or bool) labels, which would be truncated."""
    tensor = torch.as_tensor(labels, device=device)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(
            f"class labels must be integer identity indices, got dtype {tensor.dtype} "
            "(a float label would be silently truncated; convert whole numbers with .long())"
        )
    return tensor.long()


def share_label_table(transformer: DiTTransformer2DModel, table: nn.Embedding) -> None:
    """Make every block use ``table`` (N + 1 rows, row N = null), with diffusers' own dropout off."""
    num_identities = table.num_embeddings - 1
    for block in transformer.transformer_blocks:
        embedder = class_embedder(block)
        embedder.embedding_table = table
        embedder.num_classes = num_identities
        embedder.dropout_prob = 0.0
    transformer.register_to_config(num_embeds_ada_norm=num_identities)


def _retie(transformer: DiTTransformer2DModel, attr: str, what: str, source: str) -> None:
    """Tie a per-block module (loaded as independent copies) back to block 0's, warning if copies differ."""

    def owner(block: nn.Module) -> nn.Module:
        return block.norm1.emb if attr == "timestep_embedder" else class_embedder(block)

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


def load_vae(
    source: str | os.PathLike,
    *,
    subfolder: str | None = None,
    dtype: torch.dtype | None = None,
    local_files_only: bool | None = None,
    what: str = "vae",
) -> AutoencoderKL:
    """``AutoencoderKL.from_pretrained`` from a local folder or a hub id (:func:`load_from_hub`: the cache
    first); FileNotFoundError naming ``what`` (the option or file that named the source) otherwise."""
    path = Path(source).expanduser()
    if path.exists():
        folder = path / subfolder if subfolder else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{what}: {folder}: no VAE config.json")
        return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype)
    if not is_hub_id(str(source)):
        raise FileNotFoundError(f"{what}: VAE source {str(source)!r} is neither a local folder nor a hub id")
    return load_from_hub(
        AutoencoderKL.from_pretrained,
        str(source),
        what=what,
        subfolder=subfolder,
        local_files_only=local_files_only,
        torch_dtype=dtype,
    )


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
            class_embedder(block).dropout_prob = 0.0
        if vae is not None:
            vae.requires_grad_(False).eval()

    def _validate(self) -> None:
        n = self.num_identities
        table = self.label_table
        if any(class_embedder(b).embedding_table is not table for b in self.transformer.transformer_blocks):
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
        return class_embedder(self.transformer.transformer_blocks[0]).embedding_table

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
        labels = as_labels(labels, device=x_t.device)
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
                # built from the weights: a fresh nn.Embedding would draw its initialisation from the global
                # RNG, and an export in the middle of training would change the batches after it
                clone = nn.Embedding.from_pretrained(table.weight.detach().clone(), freeze=False)
                class_embedder(block).embedding_table = clone
                if tied:
                    block.norm1.emb.timestep_embedder = copy.deepcopy(time_mlp)
            self.transformer.save_pretrained(directory, safe_serialization=True)
        finally:
            for block, tied in zip(blocks, tied_time, strict=True):
                class_embedder(block).embedding_table = table
                if tied:
                    block.norm1.emb.timestep_embedder = time_mlp

    def save_pretrained(self, directory: str | os.PathLike, provenance: dict[str, Any] | None = None) -> Path:
        """Write an export folder atomically (temp sibling + rename); returns its path.

        Contents: ``transformer/`` (diffusers, safetensors), ``vae/`` (VAE built from a config) or
        ``vae.json`` (the source it was loaded from), ``scheduler/``, ``labels.json``, ``generator.json``
        and ``provenance.json`` when given.
        """
        target = Path(directory).expanduser().absolute()
        with atomic_folder(target) as tmp:
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
        """Load an export written by :meth:`save_pretrained` (shared modules are tied again);
        ``directory`` may be ``builtin:<name>``, an export shipped in the package.

        ``identities`` (when given) must equal the export's labels, else ValueError: an export is never
        silently re-initialised for another label space.
        """
        root = Path(resolve_builtin(directory)).expanduser()
        labels = _read_json(root / "labels.json")
        facts = _read_json(root / "generator.json")
        names = [str(n) for n in labels["identities"]]
        if identities is not None:
            check_identities_match(names, list(identities), str(root))
        transformer = DiTTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=dtype)
        _retie(transformer, "embedding_table", "label table", str(root))
        share_label_table(transformer, class_embedder(transformer.transformer_blocks[0]).embedding_table)
        if facts.get("tied_timestep_embedder"):
            _retie(transformer, "timestep_embedder", "timestep MLP", str(root))
        vae, vae_source = None, None
        if (root / "vae.json").is_file():
            vae_source = _read_json(root / "vae.json")
            if not isinstance(vae_source, dict) or not isinstance(vae_source.get("source"), str):
                raise ValueError(f"{root / 'vae.json'}: needs a 'source' (a VAE folder or hub id)")
            vae = load_vae(
                vae_source["source"],
                subfolder=vae_source.get("subfolder"),
                dtype=dtype,
                what=f"{root / 'vae.json'} (edit its 'source' to name a local VAE folder)",
            )
        elif (root / "vae").is_dir():
            vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype)
        elif int(transformer.config.in_channels) != int(facts["channels"]):
            raise ValueError(
                f"{root}: the transformer works on {transformer.config.in_channels}-channel latents but the "
                "export has neither vae/ nor vae.json (an incomplete export?): put the VAE's diffusers "
                f"folder at {root / 'vae'} or a vae.json naming it, or export the generator again"
            )
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
