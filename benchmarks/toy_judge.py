"""Generator quality on the procedural toy persons, in a judge's feature space (for ``prior_recipe``).

* data: toy_market identities rendered once (cached on disk), squared to the generator's 32x32 view and kept
  in memory;
* judge: a 4-block convnet classifier (0.4 M parameters, ``notes/cpu_feasibility.md`` §4) trained on many
  real images of the identities it scores (40 per identity by default); its L2-normalised penultimate
  features are the judge space;
* scores: :class:`rgsd_lightning.evaluation.quality.Judge` (identity fidelity, intra-identity spread of the
  samples over that of the real images, FID/KID in judge space) and the near-copy share of the privacy audit
  (pixel descriptor + judge features, library defaults) against the training images.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rgsd_lightning.backbones import FeatureExtractor
from rgsd_lightning.data.records import IdentityRecord, write_manifest
from rgsd_lightning.data.sources import read_market1501
from rgsd_lightning.data.toy import make_toy_market
from rgsd_lightning.evaluation.privacy import audit_synthetic_set
from rgsd_lightning.evaluation.quality import Judge, load_images
from rgsd_lightning.io import save_png, to_uint8


@dataclass(frozen=True)
class ToySpec:
    """A toy_market identity set: ``ids`` training identities of dataset ``seed``, ``per_id`` images each."""

    seed: int
    ids: int
    per_id: int

    def folder(self, work: Path) -> Path:
        return work / "data" / f"toy_s{self.seed}_{self.ids}x{self.per_id}"


@dataclass
class ToyImages:
    """Rendered identities as the generator sees them: (N, 3, S, S) in [-1, 1], labels 0..ids-1, records."""

    images: torch.Tensor
    labels: torch.Tensor
    names: list[str]
    records: list[IdentityRecord]

    def subset(self, keep: torch.Tensor) -> ToyImages:
        """The images (and records) where the boolean mask or index tensor ``keep`` selects."""
        index = torch.arange(len(self.images))[keep].tolist()
        return ToyImages(self.images[index], self.labels[index], self.names, [self.records[i] for i in index])


def toy_images(spec: ToySpec, work: Path, size: int = 32) -> ToyImages:
    """Render (once, cached on disk) and load a toy_market identity set."""
    root = make_toy_market(
        spec.folder(work),
        num_train_ids=spec.ids,
        num_test_ids=1,
        images_per_id=spec.per_id,
        num_distractors=0,
        seed=spec.seed,
    )
    records = read_market1501(root)["train"]
    names = sorted({r.identity for r in records})
    index = {n: i for i, n in enumerate(names)}
    labels = torch.tensor([index[r.identity] for r in records])
    return ToyImages(load_images(records, size, 3), labels, names, records)


# ------------------------------------------------------------------------------------------- judge
class Conv4(nn.Module):
    """conv3x3-BN-ReLU-maxpool x 4 (32/64/128/256), global average pool, linear classifier."""

    def __init__(self, num_classes: int, channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for width in (32, 64, 128, 256):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            c = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class JudgeFeatures(nn.Module):
    """The judge's L2-normalised penultimate features of images in [-1, 1] (frozen, eval mode)."""

    def __init__(self, net: Conv4) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> JudgeFeatures:
        super().train(mode)
        self.net.eval()
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net.body(x.float()), dim=1)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    i, j = torch.randint(0, 7, (2,), generator=g).tolist()
    return F.pad(x, (3, 3, 3, 3), mode="reflect")[:, :, i : i + x.shape[2], j : j + x.shape[3]]


def train_judge(data: ToyImages, steps: int = 1500, seed: int = 0) -> JudgeFeatures:
    """Train the judge classifier (AdamW + OneCycle 2e-3, label smoothing 0.1, flip + pad-crop)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = Conv4(len(data.names), data.images.shape[1])
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    for _ in range(steps):
        i = torch.randint(0, len(data.images), (64,), generator=g)
        loss = F.cross_entropy(net(_augment(data.images[i], g)), data.labels[i], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return JudgeFeatures(net)


def load_or_train_judge(data: ToyImages, path: Path, steps: int = 1500) -> JudgeFeatures:
    """The judge of ``data``, cached as a state dict at ``path``."""
    if path.is_file():
        net = Conv4(len(data.names), data.images.shape[1])
        net.load_state_dict(torch.load(path, weights_only=True))
        return JudgeFeatures(net)
    judge = train_judge(data, steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(judge.net.state_dict(), tmp)
    os.replace(tmp, path)  # atomic: runs side by side may both train it
    return judge


# ------------------------------------------------------------------------------------------ scoring
def quality(
    judge: JudgeFeatures, real: ToyImages, fake: torch.Tensor, fake_labels: torch.Tensor
) -> dict[str, float]:
    """Fidelity, spread ratio, FID and KID of samples of identities ``fake_labels`` (indices into
    ``real.names``), against the real images of those identities only (prototypes of those identities)."""
    wanted = sorted(set(fake_labels.tolist()))
    records = [r for r, y in zip(real.records, real.labels.tolist(), strict=True) if y in wanted]
    scorer = Judge(judge, records, fake.shape[-1], fake.shape[1], kid_subset_size=100)
    scores = scorer.score_images(fake, [real.names[y] for y in fake_labels.tolist()])
    ratio = scores["diversity_ratio"]
    return {
        "fidelity": scores["fidelity"],
        "spread_ratio": float("nan") if ratio is None else ratio,
        "fid": scores["fid"],
        "kid": scores["kid"],
    }


def near_copies(
    judge: JudgeFeatures, train: ToyImages, fake: torch.Tensor, fake_labels: torch.Tensor
) -> dict[str, Any]:
    """Privacy audit (library defaults) of the samples against the training images: share flagged."""
    extractor = FeatureExtractor(judge, (fake.shape[2], fake.shape[3]), (0.5,) * 3, (0.5,) * 3, 3)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "images").mkdir()
        rows = []
        for i, (img, label) in enumerate(zip(to_uint8(fake), fake_labels.tolist(), strict=True)):
            path = save_png(img, folder / "images" / f"{i:05d}.png")
            rows.append(IdentityRecord(str(path), train.names[label], -1, "synthetic", "train"))
        write_manifest(folder / "manifest.jsonl", rows)
        result = audit_synthetic_set(
            folder, train.records, extractor=extractor, write_card=False, grid_path=None, num_threads=1
        )
    flagged = [a for a in result.images if a.near_copy]
    return {
        "near_copy_fraction": len(flagged) / len(result.images),
        "pixel_nn_median": float(np.median([a.sim_pixel for a in result.images])),
    }
