"""Recognizer backbones: a timm network plus an embedding neck, its export format, and a frozen
feature extractor that scores generated images.

The same ``EmbeddingNet`` is the body of the downstream recognizers (LookaheadReID, CosFaceRecognizer)
and, once exported, the reward feature extractor of the RL stage and the feature space of the privacy
audit. An export is a folder holding ``config.json`` (architecture, neck, input geometry and
normalisation) and ``model.safetensors``; :func:`load_embedding_net` rebuilds it without downloading.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from rgsd_lightning.data.transforms import to_recognizer_input
from rgsd_lightning.io import atomic_file, atomic_write_json

EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"


class EmbeddingNet(nn.Module):
    """timm backbone -> optional linear projection -> optional BNNeck.

    Args:
        architecture: any timm model name (``resnet50``, ``vit_base_patch16_224``, ``test_resnet``...).
        pretrained_path: local weights file (.safetensors/.pth/.bin) for the timm backbone; None = random
            init. Nothing is ever downloaded.
        in_chans: input channels.
        neck: "bnneck" (BoT: BatchNorm1d with a frozen zero bias after pooling) or "none".
        embedding_dim: project pooled features to this size first (None keeps the backbone's width).
        timm_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``img_size`` for ViTs).
    """

    def __init__(
        self,
        architecture: str = "resnet50",
        pretrained_path: str | None = None,
        in_chans: int = 3,
        neck: Literal["bnneck", "none"] = "bnneck",
        embedding_dim: int | None = None,
        timm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        kwargs = dict(timm_kwargs or {})
        if pretrained_path is not None:
            if not Path(pretrained_path).is_file():
                raise FileNotFoundError(f"pretrained backbone weights not found: {pretrained_path}")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_path)})
        else:
            kwargs["pretrained"] = False
        self.config = {
            "architecture": architecture,
            "in_chans": in_chans,
            "neck": neck,
            "embedding_dim": embedding_dim,
            "timm_kwargs": dict(timm_kwargs or {}),
        }
        self.backbone = timm.create_model(architecture, num_classes=0, in_chans=in_chans, **kwargs)
        width = int(self.backbone.num_features)
        self.proj = nn.Linear(width, embedding_dim) if embedding_dim else nn.Identity()
        self.feature_dim = embedding_dim or width
        if neck == "bnneck":
            self.neck = nn.BatchNorm1d(self.feature_dim)
            self.neck.bias.requires_grad_(False)  # BoT: no shift, so the BN feature stays centred
        elif neck == "none":
            self.neck = nn.Identity()
        else:
            raise ValueError(f"neck must be 'bnneck' or 'none', got {neck!r}")

    def forward(self, images: torch.Tensor, return_pre_neck: bool = False):
        """Embeddings (B, D) after the neck; with ``return_pre_neck`` also the features before it."""
        feats = self.proj(self.backbone(images))
        emb = self.neck(feats)
        return (feats, emb) if return_pre_neck else emb


def save_embedding_net(
    net: EmbeddingNet,
    directory: str | os.PathLike,
    *,
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Export an EmbeddingNet: ``config.json`` (architecture + preprocessing) and ``model.safetensors``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_file(directory / EXPORT_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    config = dict(net.config)
    config.update(
        feature_dim=net.feature_dim,
        input_size=[int(s) for s in input_size],
        mean=[float(m) for m in mean],
        std=[float(s) for s in std],
        **(extra or {}),
    )
    atomic_write_json(directory / EXPORT_CONFIG, config)
    return directory


def load_embedding_net(directory: str | os.PathLike) -> tuple[EmbeddingNet, dict[str, Any]]:
    """Rebuild an exported EmbeddingNet; returns the network (eval mode) and its config dict."""
    directory = Path(directory)
    cfg_path, weights = directory / EXPORT_CONFIG, directory / EXPORT_WEIGHTS
    for path in (cfg_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"not a recognizer export ({path.name} missing): {directory}")
    config = json.loads(cfg_path.read_text())
    net = EmbeddingNet(
        architecture=config["architecture"],
        in_chans=config.get("in_chans", 3),
        neck=config.get("neck", "bnneck"),
        embedding_dim=config.get("embedding_dim"),
        timm_kwargs=config.get("timm_kwargs"),
    )
    state = load_file(str(weights))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"recognizer export {directory} does not match its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return net.eval(), config


class FeatureExtractor(nn.Module):
    """A frozen recognizer that maps generator images in [-1, 1] to L2-normalised embeddings.

    Images are resized and normalised exactly as the recognizer's test transform does (see
    ``to_recognizer_input``). The network is frozen and always in eval mode, also when a parent module
    is put in train mode.

    Args:
        net: the embedding network (any module mapping (B, C, H, W) -> (B, D)).
        input_size: (height, width) the network expects.
        mean: normalisation mean on [0, 1] pixels.
        std: normalisation std.
        in_chans: channels the network expects.
    """

    def __init__(
        self,
        net: nn.Module,
        input_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.input_size = tuple(int(s) for s in input_size)
        self.mean, self.std, self.in_chans = tuple(mean), tuple(std), in_chans

    @classmethod
    def from_export(cls, directory: str | os.PathLike) -> FeatureExtractor:
        """Load a recognizer export written by :func:`save_embedding_net`."""
        net, cfg = load_embedding_net(directory)
        return cls(net, cfg["input_size"], cfg["mean"], cfg["std"], cfg.get("in_chans", 3))

    def train(self, mode: bool = True) -> FeatureExtractor:
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_recognizer_input(images, self.input_size, self.mean, self.std, self.in_chans)
        param = next(self.net.parameters(), None)
        feats = self.net(x if param is None else x.to(param.dtype))
        if not torch.isfinite(feats).all():
            raise ValueError("the feature extractor produced NaN/inf features")
        return F.normalize(feats.float(), dim=1)
