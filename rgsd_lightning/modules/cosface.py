"""CosFaceRecognizer: the face recognizer of the paper (§5.1), with lookahead selection.

timm backbone (ResNet-50 by default) -> linear projection to the embedding (512-d) -> BatchNorm neck, trained
with CosFace (large-margin cosine loss, s = 64, m = 0.35 as pytorch-metric-learning's ``CosFaceLoss`` and the
CosFace paper; arcface_torch uses m = 0.4). The class weights W live in a pml ``CosFaceLoss`` held as a
submodule, so they are in ``self.parameters()``, in the optimizer and in DDP. The loss has a
``DoNothingReducer``, so it returns the per-sample losses that lookahead selection needs
(:func:`cosface_losses`); they are computed on float32 embeddings (at least) with autocast disabled (pml casts
W to the embeddings' dtype). SGD with momentum 0.9 and weight decay 5e-4; warm-up then step decay.

Evaluation (validation and test), per the datamodule's loaders (``datamodule.val_names``):

* one :class:`~rgsd_lightning.evaluation.VerificationMetric` per verification set (10-fold accuracy):
  ``val/<set>/accuracy``, and ``val/verif_acc``, the mean over the sets without a demographic group (paper
  Table 2; over all sets when every set has a group);
* sets with a ``group`` (RFW): ``val/group/<group>`` accuracy plus the group report ``val/group_mean``,
  ``val/group_std`` and ``val/group_error_ratio`` (max error / min error; paper Table 3);
* the "identification" loader (held-out images of the training identities): ``val/id_acc``, closed-set
  accuracy of the nearest CosFace class weight (largest cosine), i.e. the classifier the loss trains.

The metrics are built once per stage, when its first evaluation epoch starts (the sets come from the
datamodule), in ``val_metrics`` / ``test_metrics`` (``nn.ModuleDict`` keyed by the loader's position, so they
follow the module's device), and reset after every epoch.

Embeddings are flip-fused (sum with the mirror image's embedding, L2-normalised) with ``flip_test``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_metric_learning.losses import CosFaceLoss
from pytorch_metric_learning.reducers import DoNothingReducer
from torch import Tensor, nn
from torchmetrics import MeanMetric

from rgsd_lightning.data.pairs import VerificationPairs
from rgsd_lightning.evaluation import VerificationMetric, flip_fuse, group_report
from rgsd_lightning.modules.config import EmbeddingNetConfig
from rgsd_lightning.modules.optim import spec, warmup_multistep
from rgsd_lightning.modules.recognizer import GROUPS, Recognizer
from rgsd_lightning.selection import SelectionConfig

SGD = spec("torch.optim.SGD", lr=0.1, momentum=0.9, weight_decay=5e-4)
STEP_SCHEDULE = warmup_multistep(1, 0.1, [20, 28])
"""The defaults: SGD with momentum and a warm-up then step decay."""


def cosface_losses(loss: CosFaceLoss, embeddings: Tensor, labels: Tensor) -> Tensor:
    """Per-sample losses (B,) of a pml ``CosFaceLoss`` built with a ``DoNothingReducer``, in float32 at least
    (half-precision inputs are promoted, float64 stays float64; autocast is off inside).

    Args:
        loss: the CosFace loss holding the class weights ``W`` (D, C); its reducer must be a DoNothingReducer.
        embeddings: (B, D) embeddings (any scale; pml normalises them).
        labels: (B,) class indices.
    """
    if not isinstance(loss.reducer, DoNothingReducer):
        raise ValueError("cosface_losses needs a CosFaceLoss built with reducer=DoNothingReducer()")
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        dtype = torch.promote_types(torch.promote_types(embeddings.dtype, loss.W.dtype), torch.float32)
        return loss(embeddings.to(dtype), labels)["loss"]["losses"]


class CosFaceRecognizer(Recognizer):
    """Face recognizer: embedding network + CosFace, verification evaluation, optional lookahead selection.

    Args:
        num_identities: number of training identities (linked from the datamodule by the CLI).
        net: the embedding network (``architecture``, ``pretrained_path``, ``in_chans``, ``neck``,
            ``embedding_dim``, ``timm_kwargs``).
        margin: CosFace additive cosine margin m.
        scale: CosFace logit scale s.
        optimizer: the optimizer (class_path / init_args; default SGD, lr 0.1, momentum 0.9, wd 5e-4).
        lr: learning rate replacing the optimizer's (None: the optimizer's ``lr``).
        lr_scheduler: the schedule (default ``WarmupMultiStepLR``: 1 epoch from 0.1, x0.1 at 20 and 28;
            None: constant).
        schedule_interval: "epoch" or "step" (the unit of the scheduler's steps, milestones included).
        selection: lookahead selection options (``enabled``, ``keep_ratio`` or ``k``, ``lr``, ``scope``).
        flip_test: fuse each evaluation embedding with the mirror image's (sum, then L2-normalise).
        n_folds: folds of the verification protocol.
        synthetic_norm: BatchNorm statistics of the synthetic training samples: "batch" (one forward of the
            mixed batch, the paper's) or "real" (the real samples on their own batch statistics, the synthetic
            ones forwarded apart on the running statistics of the real data, so that they neither shift
            the real samples' normalisation nor the statistics used at test time) or "kept" (selection as
            under "real", then one forward of the real samples and the kept synthetic ones: the dropped
            samples leave BatchNorm alone, the kept ones share the batch's statistics).
    """

    task = "face"

    def __init__(
        self,
        num_identities: int,
        net: EmbeddingNetConfig = EmbeddingNetConfig(embedding_dim=512),
        margin: float = 0.35,
        scale: float = 64.0,
        optimizer: OptimizerCallable = SGD,
        lr: float | None = None,
        lr_scheduler: LRSchedulerCallable | None = STEP_SCHEDULE,
        schedule_interval: Literal["epoch", "step"] = "epoch",
        selection: SelectionConfig | None = None,
        flip_test: bool = False,
        n_folds: int = 10,
        synthetic_norm: Literal["batch", "real", "kept"] = "batch",
    ) -> None:
        super().__init__(num_identities, net, selection, flip_test, optimizer, lr_scheduler, synthetic_norm)
        self.save_hyperparameters(ignore=list(GROUPS))  # this __init__'s other arguments
        self.save_hyperparameters(self.group_hparams())
        self.cosface = CosFaceLoss(
            num_identities, self.net.feature_dim, margin=margin, scale=scale, reducer=DoNothingReducer()
        )
        self.val_metrics = nn.ModuleDict()
        self.test_metrics = nn.ModuleDict()
        self._eval_sets: dict[str, list[VerificationPairs | None]] = {}  # per stage; None: identification

    def identity_losses(self, embeddings: Tensor, labels: Tensor, synthetic: Tensor | None = None) -> Tensor:
        """Per-sample CosFace losses with the submodule's class weights W (every row under its label, the
        synthetic ones included)."""
        return cosface_losses(self.cosface, embeddings, labels)

    def fuse_flip(self, embeddings: Tensor, flipped: Tensor) -> Tensor:
        """insightface flip test: sum of both embeddings, L2-normalised."""
        return flip_fuse(embeddings, flipped)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self.identity_forward(batch)
        loss = out["losses"][out["keep"]].mean()
        n = int(batch["label"].shape[0])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/id_loss", loss.detach(), batch_size=n)
        self.log_selection(out["selection"], n)
        return loss

    # ------------------------------------------------------------------ evaluation
    def setup(self, stage: str) -> None:
        # each fit / validate / test call evaluates the sets of the datamodule it is given
        self.val_metrics.clear()
        self.test_metrics.clear()

    def _metrics(self, stage: str) -> nn.ModuleDict:
        """The stage's metrics, one per evaluation loader keyed by its position; built on first use from the
        datamodule's sets (a VerificationMetric per verification set, a MeanMetric for identification)."""
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        if len(metrics):
            return metrics
        datamodule = getattr(self.trainer, "datamodule", None)
        sets = getattr(datamodule, "verification_sets", None)
        names = getattr(datamodule, "val_names", None)
        if sets is None or names is None:
            raise ValueError(
                "CosFaceRecognizer evaluation needs an IdentityDataModule with task='face' "
                "(verification_sets and val_names)"
            )
        self._eval_sets[stage] = list(sets)
        n_folds = self.hparams.n_folds
        for i, vs in enumerate(sets):
            metrics[str(i)] = VerificationMetric(
                vs.pairs, vs.issame, num_images=len(vs.images), n_folds=n_folds
            )
        if len(names) > len(sets) and names[len(sets)] == "identification":
            metrics[str(len(sets))] = MeanMetric()
            self._eval_sets[stage].append(None)
        return metrics.to(self.device)

    def _eval_step(self, stage: str, batch: dict[str, Any], dataloader_idx: int) -> None:
        metric = self._metrics(stage)[str(dataloader_idx)]
        emb = self.embed(batch["image"])
        if self._eval_sets[stage][dataloader_idx] is None:  # identification: nearest class weight
            cosine = F.normalize(emb, dim=1) @ F.normalize(self.cosface.W.float(), dim=0)
            metric.update((cosine.argmax(dim=1) == batch["label"]).float())
        else:
            metric.update(emb, batch["index"])

    def _eval_end(self, stage: str) -> None:
        metrics = self._metrics(stage)
        if self.trainer.sanity_checking:  # partial sets: nothing meaningful to compute
            for metric in metrics.values():
                metric.reset()
            return
        logs: dict[str, float] = {}
        plain, groups = [], {}
        for vs, metric in zip(self._eval_sets[stage], metrics.values(), strict=True):
            if vs is None:
                logs[f"{stage}/id_acc"] = float(metric.compute())
            else:
                acc = float(metric.compute()["accuracy"])
                logs[f"{stage}/{vs.name}/accuracy"] = acc
                if vs.group is not None:
                    groups[vs.group] = acc
                else:
                    plain.append(acc)
            metric.reset()
        averaged = plain or list(groups.values())
        if averaged:
            logs[f"{stage}/verif_acc"] = sum(averaged) / len(averaged)
        if groups:
            report = group_report(groups)
            logs.update({f"{stage}/group/{g}": acc for g, acc in groups.items()})
            logs[f"{stage}/group_mean"] = report["mean"]
            logs[f"{stage}/group_std"] = report["std"]
            logs[f"{stage}/group_error_ratio"] = report["max_min_error_ratio"]
        self.log_dict(logs)
