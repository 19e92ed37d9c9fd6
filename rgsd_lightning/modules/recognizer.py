"""Shared shell of the downstream recognizers (LookaheadReID, CosFaceRecognizer).

A recognizer is an :class:`~rgsd_lightning.backbones.EmbeddingNet` (timm backbone -> optional projection ->
neck) plus an identity head given by the subclass (a classifier for ReID, CosFace weights for faces). This
base owns what both share:

* the training forward, split as backbone -> head so the per-sample identity losses of that one forward
  serve both lookahead selection and the real update (``identity_forward``);
* lookahead selection (``selection:`` block, :class:`~rgsd_lightning.selection.SelectionConfig`) on batches
  that hold synthetic samples, with ``scope="full"`` (virtual step on every trainable parameter) or
  ``scope="head"`` (projection + neck + identity head only, on detached backbone features);
* evaluation embeddings (post-neck, optionally fused with the mirrored image's) and the export of the
  backbone for the reward / audit stages;
* the optimizer and learning-rate schedule (``optimizer`` / ``lr_scheduler`` callables, chosen in YAML;
  default: the subclass's optimizer with BoT's linear warm-up then step decay, ``WarmupMultiStepLR``);
* the validation / test hooks, which call the subclass's ``_eval_step`` / ``_eval_end`` with the stage.

The real update backpropagates the losses of the *kept* samples of the same forward. With
``synthetic_norm="batch"`` (the default) BatchNorm in that forward normalises with the statistics of the whole
batch, dropped synthetic samples included, and its running statistics take them in too; with
``synthetic_norm="real"`` the real samples are normalised with their own batch statistics (the running ones
follow the real data only) and the synthetic samples, forwarded apart, with the running statistics
(:func:`split_norm_forward`), in the training forward and in selection's virtual step alike. Either way
l(w) / l(w') are computed under the same statistics. With ``synthetic_norm="kept"`` selection runs first, as
under "real" and leaving every BatchNorm buffer as it found it (:func:`frozen_running_statistics`), then the
training forward takes the real samples and the *kept* synthetic ones together: the dropped samples neither
shift the batch's normalisation nor the running statistics, the kept ones share the batch like real samples.
It costs one more backbone forward per batch (the selection pass, without gradient in ``scope="head"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from rgsd_lightning.backbones import EmbeddingNet, save_embedding_net
from rgsd_lightning.modules.config import EmbeddingNetConfig, as_config, plain
from rgsd_lightning.modules.optim import resolve, with_lr
from rgsd_lightning.selection import SelectionConfig, SelectionResult, lookahead_select, selection_stats

GROUPS = ("net", "selection")
"""The constructor arguments of every recognizer that are config groups (saved as plain dicts)."""


SYNTHETIC_NORMS = ("batch", "real", "kept")


@contextmanager
def running_statistics(module: nn.Module) -> Iterator[None]:
    """Within the block, the BatchNorm layers of ``module`` that are training normalise with their running
    statistics and leave them unchanged (eval mode); gradients still reach their weights and biases."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for layer in layers:
        layer.eval()
    try:
        yield
    finally:
        for layer in layers:
            layer.train()


@contextmanager
def frozen_running_statistics(module: nn.Module) -> Iterator[None]:
    """Within the block the BatchNorm layers of ``module`` behave as they are set to (batch statistics in
    training), and on leaving it their running statistics and ``num_batches_tracked`` are put back."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{n: b.detach().clone() for n, b in layer.named_buffers(recurse=False)} for layer in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, buffers in zip(layers, saved, strict=True):
                for name, value in buffers.items():
                    getattr(layer, name).copy_(value)


def split_norm_forward(
    fn: Callable[[Tensor], tuple[Tensor, ...]], x: Tensor, synthetic: Tensor | None, module: nn.Module
) -> tuple[Tensor, ...]:
    """``fn(x)`` with the real rows of ``x`` forwarded together (BatchNorm on their batch statistics) and the
    synthetic rows after them, apart, under :func:`running_statistics` of ``module`` (the running statistics
    with this batch's real rows taken in); outputs in the rows' order.

    ``synthetic`` None or all False: ``fn(x)``; all True: every row on the running statistics.
    """
    if synthetic is None or not bool(synthetic.any()):
        return fn(x)
    if bool(synthetic.all()):
        with running_statistics(module):
            return fn(x)
    real_rows = (~synthetic).nonzero(as_tuple=True)[0]
    syn_rows = synthetic.nonzero(as_tuple=True)[0]
    real_out = fn(x[real_rows])
    with running_statistics(module):
        syn_out = fn(x[syn_rows])
    inverse = torch.argsort(torch.cat([real_rows, syn_rows]))
    return tuple(torch.cat([r, y])[inverse] for r, y in zip(real_out, syn_out, strict=True))


def _mask(module: Recognizer, inputs: dict[str, Tensor]) -> Tensor | None:
    return inputs.get("is_synthetic") if module.synthetic_norm in ("real", "kept") else None


def _full_scope_losses(module: Recognizer, inputs: dict[str, Tensor]) -> Tensor:
    """Identity losses from images (every trainable parameter in play)."""
    net = module.net
    (embeddings,) = split_norm_forward(lambda x: (net(x),), inputs["image"], _mask(module, inputs), net)
    return module.identity_losses(embeddings, inputs["label"], inputs.get("is_synthetic"))


def _head_scope_losses(module: Recognizer, inputs: dict[str, Tensor]) -> Tensor:
    """Identity losses from (detached) backbone features: projection, neck and identity head only."""
    net = module.net
    head = lambda f: (net.neck(net.proj(f)),)  # noqa: E731
    (embeddings,) = split_norm_forward(head, inputs["features"], _mask(module, inputs), net)
    return module.identity_losses(embeddings, inputs["label"], inputs.get("is_synthetic"))


class Recognizer(L.LightningModule):
    """Base class: EmbeddingNet + identity head + lookahead selection + export (see the module docstring).

    A subclass declares every argument in its own ``__init__`` (its signature is the config), passes the
    shared ones here, then saves its hyper-parameters itself (the groups as plain dicts, from
    :meth:`group_hparams`):

    Args:
        num_identities: number of training identities (linked from the datamodule by the CLI).
        net: the embedding network (a :class:`EmbeddingNetConfig` or a mapping of its fields).
        selection: lookahead selection options (a :class:`SelectionConfig`, a mapping of its fields, or
            None: disabled).
        flip_test: fuse the embeddings of each evaluation image and its mirror image.
        optimizer: parameters -> optimizer (a callable or a class_path mapping).
        lr_scheduler: optimizer -> learning-rate scheduler (None: constant learning rate).
        synthetic_norm: the BatchNorm statistics of synthetic training samples: "batch" (one forward of
            the mixed batch), "real" (real samples on their own batch statistics, synthetic ones on the
            running statistics of the real data) or "kept" (selection as under "real", then one forward of
            the real and the kept synthetic samples; see the module docstring).
    """

    export_name = "backbone"
    task = "recognizer"

    def __init__(
        self,
        num_identities: int,
        net: EmbeddingNetConfig | dict[str, Any],
        selection: SelectionConfig | dict[str, Any] | None,
        flip_test: bool,
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None,
        synthetic_norm: Literal["batch", "real", "kept"] = "batch",
    ) -> None:
        super().__init__()
        if synthetic_norm not in SYNTHETIC_NORMS:
            raise ValueError(f"synthetic_norm must be one of {SYNTHETIC_NORMS}, got {synthetic_norm!r}")
        self.synthetic_norm = synthetic_norm
        if isinstance(num_identities, bool) or not isinstance(num_identities, int) or num_identities < 2:
            raise ValueError(f"num_identities must be an integer >= 2, got {num_identities!r}")
        self.num_identities = num_identities
        self.net_config = as_config(EmbeddingNetConfig, net, "net")
        self.selection = SelectionConfig.coerce(selection)
        self.flip_test = flip_test
        self.net = EmbeddingNet(**self.net_config.kwargs())
        self.optimizer_factory = resolve(optimizer, "optimizer")
        self.scheduler_factory = None if lr_scheduler is None else resolve(lr_scheduler, "lr_scheduler")

    def group_hparams(self) -> dict[str, Any]:
        """The config groups as plain dicts, for ``save_hyperparameters`` (see :mod:`..config`)."""
        return plain({"net": self.net_config, "selection": self.selection})

    # ------------------------------------------------------------------ to be provided by subclasses
    def identity_losses(self, embeddings: Tensor, labels: Tensor, synthetic: Tensor | None = None) -> Tensor:
        """Per-sample identity losses (B,) of post-neck embeddings; the l_id of selection. ``synthetic``:
        the (B,) bool mask of synthetic rows (None: every row real), for heads that label them apart."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training forward + selection
    def head_parameter_names(self) -> list[str]:
        """Trainable parameters outside the backbone: the ``scope="head"`` virtual step."""
        return [
            n for n, p in self.named_parameters() if p.requires_grad and not n.startswith("net.backbone.")
        ]

    def identity_forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One training forward: pre-neck features, embeddings, per-sample identity losses, and the keep mask.

        Returns a dict with ``features`` (B, D) pre-neck, ``embeddings`` (B, D) post-neck, ``losses`` (B,)
        identity losses at w (with graph), ``keep`` (B,) bool and ``selection`` (a
        :class:`SelectionResult` or None when selection did not run). With ``synthetic_norm="kept"`` the
        rows of dropped samples are zeros outside the graph (only the kept rows were forwarded).
        """
        images, labels = batch["image"], batch["label"]
        syn = batch.get("is_synthetic")
        syn = None if syn is None else torch.as_tensor(syn, device=images.device).bool()
        selects = self.selection.enabled and syn is not None and bool(syn.any())
        if selects and self.synthetic_norm == "kept":
            with frozen_running_statistics(self.net):
                result = self._select(images, labels, syn, None)
            out = self._forward_rows(images, labels, syn, result.keep)
        else:
            split = syn if self.synthetic_norm == "real" else None
            out = self._forward_rows(images, labels, syn, None, split)
            result = self._select(images, labels, syn, out) if selects else None
        if result is not None:
            out["keep"] = result.keep
            self._count_selection(batch, result)
        return {**out, "selection": result}

    def _forward_rows(
        self,
        images: Tensor,
        labels: Tensor,
        syn: Tensor | None,
        rows: Tensor | None,
        split: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The training forward of the ``rows`` (bool mask; None: every row), its outputs scattered into
        full-batch tensors; ``syn``: the synthetic rows (for :meth:`identity_losses`), ``split`` as
        :func:`split_norm_forward`'s mask."""
        net = self.net

        def chain(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            backbone = net.backbone(x)
            features = net.proj(backbone)
            return backbone, features, net.neck(features)

        if rows is None or bool(rows.all()):
            parts = split_norm_forward(chain, images, split, net)
            parts = (*parts, self.identity_losses(parts[2], labels, syn))
            keep = torch.ones_like(parts[-1], dtype=torch.bool)
        else:  # only these rows through BatchNorm; the others are zero rows outside the graph
            sub = chain(images[rows])
            sub = (*sub, self.identity_losses(sub[2], labels[rows], None if syn is None else syn[rows]))
            parts = tuple(
                part.new_zeros((rows.shape[0], *part.shape[1:])).index_put((rows,), part) for part in sub
            )
            keep = rows
        names = ("backbone", "features", "embeddings", "losses")
        return {**dict(zip(names, parts, strict=True)), "keep": keep}

    def _select(
        self, images: Tensor, labels: Tensor, syn: Tensor, out: dict[str, Tensor] | None
    ) -> SelectionResult:
        """Lookahead selection on the batch; ``out``: the training forward to reuse (its l(w) and backbone
        features), None: a selection pass of its own (real samples on their batch statistics, synthetic
        ones on the running statistics; the caller keeps the buffers)."""
        cfg = self.selection
        options = dict(lr=cfg.lr, k=cfg.k, keep_ratio=None if cfg.k is not None else cfg.keep_ratio)
        options.update(losses=None if out is None else out["losses"], step_on=cfg.step_on, rule=cfg.rule)
        if cfg.scope == "head":
            if out is None:
                with torch.no_grad():
                    (backbone,) = split_norm_forward(lambda x: (self.net.backbone(x),), images, syn, self.net)
            else:
                backbone = out["backbone"]
            inputs = {"features": backbone.detach(), "label": labels, "is_synthetic": syn}
            params = self.head_parameter_names()
            return lookahead_select(self, _head_scope_losses, inputs, syn, params=params, **options)
        inputs = {"image": images, "label": labels, "is_synthetic": syn}
        return lookahead_select(self, _full_scope_losses, inputs, syn, **options)

    # ------------------------------------------------------------------ selection log (per synthetic image)
    def _count_selection(self, batch: dict[str, Any], result: SelectionResult) -> None:
        """Count, per training record, how often a synthetic image was in a batch and how often kept."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if "index" not in batch or dm is None or not hasattr(dm, "training_records"):
            return
        if getattr(self, "_selection_counts", None) is None:
            self._selection_counts = torch.zeros(2, len(dm.training_records()), dtype=torch.long)
        index = torch.as_tensor(batch["index"]).cpu()
        syn = result.is_synthetic.cpu()
        counts = self._selection_counts
        counts[0].index_add_(0, index[syn], torch.ones(int(syn.sum()), dtype=torch.long))
        kept = syn & result.keep.cpu()
        counts[1].index_add_(0, index[kept], torch.ones(int(kept.sum()), dtype=torch.long))

    def on_train_end(self) -> None:
        """Write ``selection.json`` (per synthetic image: times in a batch, times kept) into the run folder.

        Counts cover the training since this process started (a resumed run counts from the resume) and
        are summed over the ranks; the report's ``selection`` section turns them into selection precision.
        """
        counts = getattr(self, "_selection_counts", None)
        if counts is None:
            return
        from rgsd_lightning.io import atomic_write_json, run_dir

        counts = self.trainer.strategy.reduce(counts.to(self.device), reduce_op="sum").cpu()
        directory = run_dir(self.trainer)  # every rank: a collective under DDP
        if not self.trainer.is_global_zero:
            return
        records = self.trainer.datamodule.training_records()
        images = [
            {"path": r.path, "identity": r.identity, "seen": int(seen), "kept": int(kept)}
            for r, seen, kept in zip(records, counts[0].tolist(), counts[1].tolist(), strict=True)
            if r.source == "synthetic" and seen > 0
        ]
        atomic_write_json(directory / "selection.json", {"rule": plain(self.selection), "images": images})

    def log_selection(self, result: SelectionResult | None, batch_size: int) -> None:
        """Log ``train/kept_fraction`` and ``train/delta_mean|min|max`` of a selection result."""
        if not self.selection.enabled:
            return
        stats = {"kept_fraction": 1.0} if result is None else selection_stats(result)
        stats.pop("num_synthetic", None)
        self.log_dict({f"train/{k}": float(v) for k, v in stats.items()}, batch_size=batch_size)

    # ------------------------------------------------------------------ evaluation hooks
    def _eval_step(self, stage: str, batch: dict[str, Any], dataloader_idx: int) -> None:
        """Update the ``stage`` ("val" or "test") metrics with one evaluation batch (subclasses)."""
        raise NotImplementedError

    def _eval_end(self, stage: str) -> None:
        """Compute, log under ``stage/...`` and reset the ``stage`` metrics (subclasses)."""
        raise NotImplementedError

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # ------------------------------------------------------------------ evaluation + export
    def fuse_flip(self, embeddings: Tensor, flipped: Tensor) -> Tensor:
        """Combine the embeddings of an image and its mirror (subclasses pick the rule)."""
        return (embeddings + flipped) / 2

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Evaluation embeddings (post-neck, float32), flip-fused when ``flip_test``."""
        emb = self.net(images).float()
        if self.flip_test:
            emb = self.fuse_flip(emb, self.net(torch.flip(images, dims=[-1])).float())
        return emb

    def export(self, directory: str | Path, preprocessing: dict[str, Any] | None = None) -> Path:
        """Write the EmbeddingNet (safetensors + config with the input geometry and normalisation).

        Args:
            directory: target folder.
            preprocessing: ``input_size`` / ``mean`` / ``std``; default the attached datamodule's
                ``recognizer_preprocessing()``.
        """
        if preprocessing is None:
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            if datamodule is None or not hasattr(datamodule, "recognizer_preprocessing"):
                raise ValueError(
                    "export needs the preprocessing (input_size, mean, std): pass it or attach an "
                    "IdentityDataModule through the trainer"
                )
            preprocessing = datamodule.recognizer_preprocessing()
        extra = {"task": self.task, "num_identities": self.num_identities, "source": type(self).__name__}
        return save_embedding_net(self.net, directory, **preprocessing, extra=extra)

    def configure_optimizers(self) -> Any:
        """The optimizer over every trainable parameter (``lr`` replacing the optimizer's when set) and the
        scheduler, stepped every ``schedule_interval``."""
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(with_lr([{"params": params}], hp.lr))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": hp.schedule_interval},
        }
