"""LookaheadReID: the person re-identification recognizer of the paper (§5.1), with lookahead selection.

BoT recipe: timm backbone (ResNet-50, ViT-B/16, ...) -> BNNeck. Batch-hard triplet loss on the pre-neck
feature (pytorch-metric-learning ``TripletMarginLoss`` + ``BatchHardMiner`` with the distance set explicitly
to plain Euclidean, ``LpDistance(normalize_embeddings=False)``, and ``MeanReducer``: the mean over every
anchor's hardest triplet, as BoT's ``MarginRankingLoss``), cross-entropy with label smoothing on a bias-free
classifier over the post-neck embedding; Adam with weight decay; warm-up then step decay.

Training data is whatever the datamodule serves: real only (baseline), real + synthetic, and with
``selection.enabled`` the synthetic samples of each batch are filtered by lookahead selection (the identity
loss of selection is the label-smoothed CE). Evaluation: Market-1501 mAP / CMC with the post-neck embedding
(flip-averaged with ``flip_test``), logged as ``val/mAP``, ``val/rank1|5|10`` (``test/...`` in test).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.miners import BatchHardMiner
from pytorch_metric_learning.reducers import MeanReducer
from torch import Tensor, nn

from rgsd_lightning.evaluation import ReIDMetric
from rgsd_lightning.modules.config import EmbeddingNetConfig
from rgsd_lightning.modules.optim import spec, warmup_multistep
from rgsd_lightning.modules.recognizer import GROUPS, Recognizer
from rgsd_lightning.selection import SelectionConfig

ADAM = spec("torch.optim.Adam", lr=3.5e-4, weight_decay=5e-4)
BOT_SCHEDULE = warmup_multistep(10, 0.01, [40, 70])
"""The defaults: BoT's Adam and schedule."""


class LookaheadReID(Recognizer):
    """Person ReID recognizer: BNNeck, ID cross-entropy + batch-hard triplet, optional lookahead selection.

    Args:
        num_identities: number of training identities (linked from the datamodule by the CLI).
        net: the embedding network (``architecture``, ``pretrained_path``, ``in_chans``, ``neck``,
            ``embedding_dim``, ``timm_kwargs``).
        label_smoothing: label smoothing of the ID cross-entropy.
        triplet_margin: margin of the batch-hard triplet loss.
        id_loss_weight: weight of the ID loss in the total loss.
        triplet_loss_weight: weight of the triplet loss in the total loss.
        optimizer: the optimizer (class_path / init_args; default Adam, lr 3.5e-4, weight decay 5e-4).
        lr: learning rate replacing the optimizer's (None: the optimizer's ``lr``).
        lr_scheduler: the schedule (default ``WarmupMultiStepLR``: 10 epochs from 0.01, x0.1 at 40 and 70;
            None: constant).
        schedule_interval: "epoch" or "step" (the unit of the scheduler's steps, milestones included).
        selection: lookahead selection options (``enabled``, ``keep_ratio`` or ``k``, ``lr``, ``scope``).
        flip_test: average each evaluation embedding with the mirror image's.
        metric: evaluation distance, "euclidean" (squared Euclidean) or "cosine".
        test_sources: test metrics per source too (``test/<name>/mAP``): name -> camera numbers (1-based, as
            in the file names), for datasets that combine several sources in one layout.
        triplet_on: the samples of the batch-hard triplet loss: "kept" (every real sample and the synthetic
            ones selection kept, or all of them without selection) or "real" (the real samples only: synthetic
            samples train through the identity loss, the one selection judges). Batch-hard mining picks each
            anchor's farthest positive, which for an identity with an unfaithful synthetic sample is that
            sample, so with "kept" one bad sample steers the triplet term of all its identity's anchors.
            "real" is the default (benchmarks/results/utility_reid_diagnostics.md: 12.9 vs 7.8 mAP without
            selection, 12.5 vs 10.5 with it); "kept" is the paper's and BoT's setting. Without synthetic
            samples in the batch the two are the same.
        synthetic_norm: BatchNorm statistics of the synthetic training samples: "batch" (one forward of the
            mixed batch, the paper's) or "real" (the real samples on their own batch statistics, the synthetic
            ones forwarded apart on the running statistics of the real data, so that they neither shift
            the real samples' normalisation nor the statistics used at test time) or "kept" (selection as
            under "real", then one forward of the real samples and the kept synthetic ones: the dropped
            samples leave BatchNorm alone, the kept ones share the batch's statistics).
        synthetic_labels: the identity-loss target of a synthetic sample: "identity" (its requested identity,
            label-smoothed as a real sample's; the paper's) or "uniform" (LSRO, Zheng et al., ICCV 2017: the
            uniform distribution over the training identities, for generated images that do not reliably
            show the identity they were drawn for; the loss is the mean of -log p over the identities, which
            pulls the classifier towards no identity on them while the backbone still sees the images).
            Selection judges the same losses. "uniform" needs ``triplet_on="real"`` (the triplet needs an
            identity) and a selection rule other than "identity" (which compares a sample's labels).
    """

    task = "reid"

    def __init__(
        self,
        num_identities: int,
        net: EmbeddingNetConfig = EmbeddingNetConfig(),
        label_smoothing: float = 0.1,
        triplet_margin: float = 0.3,
        id_loss_weight: float = 1.0,
        triplet_loss_weight: float = 1.0,
        optimizer: OptimizerCallable = ADAM,
        lr: float | None = None,
        lr_scheduler: LRSchedulerCallable | None = BOT_SCHEDULE,
        schedule_interval: Literal["epoch", "step"] = "epoch",
        selection: SelectionConfig | None = None,
        flip_test: bool = False,
        metric: Literal["euclidean", "cosine"] = "euclidean",
        test_sources: dict[str, list[int]] | None = None,
        triplet_on: Literal["kept", "real"] = "real",
        synthetic_norm: Literal["batch", "real", "kept"] = "batch",
        synthetic_labels: Literal["identity", "uniform"] = "identity",
    ) -> None:
        super().__init__(num_identities, net, selection, flip_test, optimizer, lr_scheduler, synthetic_norm)
        self.save_hyperparameters(ignore=list(GROUPS))  # this __init__'s other arguments
        self.save_hyperparameters(self.group_hparams())
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if triplet_on not in ("kept", "real"):
            raise ValueError(f"triplet_on must be 'kept' or 'real', got {triplet_on!r}")
        if synthetic_labels not in ("identity", "uniform"):
            raise ValueError(f"synthetic_labels must be 'identity' or 'uniform', got {synthetic_labels!r}")
        if synthetic_labels == "uniform" and triplet_on != "real":
            raise ValueError(
                "synthetic_labels='uniform' gives synthetic samples no identity, which the triplet loss "
                f"needs: set triplet_on='real' (got {triplet_on!r})"
            )
        if synthetic_labels == "uniform" and self.selection.rule == "identity":
            raise ValueError(
                "selection.rule='identity' compares a synthetic sample's loss under other identities' "
                "labels, which synthetic_labels='uniform' does not use: choose rule 'smallest' or 'negative'"
            )
        self.classifier = nn.Linear(self.net.feature_dim, num_identities, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)  # BoT classifier init
        distance = LpDistance(normalize_embeddings=False, p=2, power=1)
        self.triplet = TripletMarginLoss(margin=triplet_margin, distance=distance, reducer=MeanReducer())
        self.miner = BatchHardMiner(distance=LpDistance(normalize_embeddings=False, p=2, power=1))
        self.val_metric = ReIDMetric(metric=metric)
        self.test_metric = ReIDMetric(metric=metric, sources=test_sources)

    def identity_losses(self, embeddings: Tensor, labels: Tensor, synthetic: Tensor | None = None) -> Tensor:
        """Per-sample label-smoothed cross-entropy of the classifier over post-neck embeddings (float32); with
        ``synthetic_labels="uniform"`` the ``synthetic`` rows' target is the uniform distribution instead."""
        logits = self.classifier(embeddings).float()
        smoothing = self.hparams.label_smoothing
        losses = F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="none")
        if self.hparams.synthetic_labels == "uniform" and synthetic is not None:
            uniform = -torch.log_softmax(logits, dim=1).mean(dim=1)
            losses = torch.where(torch.as_tensor(synthetic, device=losses.device).bool(), uniform, losses)
        return losses

    def triplet_loss(self, features: Tensor, labels: Tensor) -> Tensor:
        """Batch-hard triplet loss on pre-neck features (float32, plain Euclidean distance)."""
        features = features.float()
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.triplet(features, labels, self.miner(features, labels))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self.identity_forward(batch)
        keep, labels = out["keep"], batch["label"]
        id_loss = out["losses"][keep].mean()
        mine = keep
        if self.hparams.triplet_on == "real" and batch.get("is_synthetic") is not None:
            mine = keep & ~torch.as_tensor(batch["is_synthetic"], device=keep.device).bool()
        triplet = self.triplet_loss(out["features"][mine], labels[mine])
        hp = self.hparams
        loss = hp.id_loss_weight * id_loss + hp.triplet_loss_weight * triplet
        n = int(labels.shape[0])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict(
            {"train/id_loss": id_loss.detach(), "train/triplet_loss": triplet.detach()}, batch_size=n
        )
        self.log_selection(out["selection"], n)
        return loss

    # ------------------------------------------------------------------ evaluation
    def _metric(self, stage: str) -> ReIDMetric:
        return self.val_metric if stage == "val" else self.test_metric

    def _eval_step(self, stage: str, batch: dict[str, Any], dataloader_idx: int) -> None:
        self._metric(stage).update(
            self.embed(batch["image"]), batch["pid"], batch["camera"], batch["is_query"]
        )

    def _eval_end(self, stage: str) -> None:
        metric = self._metric(stage)
        if self.trainer.sanity_checking:  # a couple of batches hold no complete query/gallery split
            metric.reset()
            return
        result = metric.compute()
        metric.reset()
        self.log_dict({f"{stage}/{k}": v for k, v in result.items()}, prog_bar=False)
