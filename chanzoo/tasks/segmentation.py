"""Semantic segmentation as a LightningModule: smp's decoders (UPerNet, DeepLabV3+, semantic FPN) on any
chanzoo/timm backbone; mIoU over the whole set (the VOC / mmseg definition) and pixel accuracy."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import lightning as L
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from chanzoo.dense import PyramidBackbone, build_segmenter
from chanzoo.dense.segmentation import SEGMENTATION_DECODERS
from chanzoo.dense.visualize import segmentation_figure
from chanzoo.tasks.detection import FIGURE_FILE, FIGURE_IMAGES, configure_dense_optim
from chanzoo.tasks.guard import NonFiniteGuardMixin, check_on_nonfinite
from chanzoo.tasks.optim import TimmOptimMixin

Batch = tuple[torch.Tensor, torch.Tensor]


class SegmentationLoss(nn.Module):
    """Cross-entropy over the labelled pixels, plus ``dice_weight`` x smp's multi-class Dice loss when positive."""

    def __init__(self, ignore_index: int = 255, dice_weight: float = 0.0) -> None:
        super().__init__()
        self.cross_entropy = nn.CrossEntropyLoss(ignore_index=ignore_index)
        self.dice_weight = float(dice_weight)
        self.dice = DiceLoss("multiclass", ignore_index=ignore_index) if self.dice_weight else None

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.cross_entropy(logits, labels)
        if self.dice is not None:
            loss = loss + self.dice_weight * self.dice(logits, labels)
        return loss


class SegmentationTask(NonFiniteGuardMixin, TimmOptimMixin, L.LightningModule):
    """Train and evaluate a semantic segmenter built from a chanzoo backbone and an smp decoder.

    Args:
        model: the backbone, as ``chanzoo.create_model`` builds it (a classifier: its head is pruned).
        optim, sched: the ``optim`` and ``sched`` config groups (``optim.layer_decay`` decays the backbone's blocks).
        num_classes: classes including background where the dataset has one.
        decoder: 'upernet', 'deeplabv3plus' or 'fpn'; ``decoder_channels`` its width, ``decoder_kwargs`` other
            keywords of smp's decoder.
        backbone: ``PyramidBackbone`` options (out_indices, frozen_stages, frozen_bn, pyramid_channels).
        backbone_lr_mult: the backbone's learning rate relative to the decoder's.
        ignore_index: the label of pixels that count in neither loss nor metrics.
        dice_weight: > 0 adds this times smp's multi-class Dice loss to the cross-entropy (the Dice term weighs every
            class present in a batch equally, which lifts small classes' IoU when background dominates the pixels).
        on_nonfinite: 'stop' (raise at the first non-finite loss or gradient) or 'skip' (drop that step).
    """

    monitor = "val/miou"  # the metric the checkpoint callback keeps the best of
    monitor_mode = "max"

    def __init__(
        self,
        model: nn.Module,
        optim: Mapping[str, Any],
        sched: Mapping[str, Any],
        num_classes: int,
        decoder: str = "upernet",
        decoder_channels: int = 256,
        decoder_kwargs: Optional[Mapping[str, Any]] = None,
        backbone: Optional[Mapping[str, Any]] = None,
        backbone_lr_mult: float = 1.0,
        ignore_index: int = 255,
        dice_weight: float = 0.0,
        on_nonfinite: str = "stop",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        if decoder not in SEGMENTATION_DECODERS:
            raise ValueError(f"task.decoder={decoder!r} is not a segmentation decoder; choose one of "
                             f"{SEGMENTATION_DECODERS}")
        self.optim_cfg, self.sched_cfg = dict(optim), dict(sched)
        self.backbone_lr_mult = backbone_lr_mult
        pyramid = PyramidBackbone(model, **dict(backbone or {}))
        self.model = build_segmenter(pyramid, decoder, num_classes, decoder_channels, dict(decoder_kwargs or {}))
        self.num_classes = num_classes
        if dice_weight < 0:
            raise ValueError(f"task.dice_weight must be >= 0, got {dice_weight}")
        self.loss = SegmentationLoss(ignore_index, dice_weight)
        self._shown: Optional[tuple] = None  # the first test images, predictions and labels, for the figure
        for stage in ("val", "test"):
            self.add_module(f"{stage}_metrics", nn.ModuleDict({
                "miou": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index),
                "pixel_acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index),
            }))

    @property
    def backbone(self) -> nn.Module:
        """The backbone network inside the dense model."""
        return self.model.backbone.inner

    def monitorable_metrics(self) -> list[str]:
        """The validation metrics this task logs (what a checkpoint callback may monitor)."""
        return ["val/loss", *(f"val/{name}" for name in self.val_metrics)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, masks = batch
        loss = self.loss(self.model(images), masks)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(images))
        return loss

    def _evaluate(self, batch: Batch, stage: str, batch_idx: int = -1) -> None:
        images, masks = batch
        logits = self.model(images)
        if logits.shape[-2:] != masks.shape[-2:]:  # evaluated on resized images: score at the labels' own size
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        self.log(f"{stage}/loss", self.loss(logits, masks), sync_dist=True, batch_size=len(images))
        predictions = logits.argmax(dim=1)
        if stage == "test" and batch_idx == 0 and self.trainer.is_global_zero:
            self._shown = (images[:FIGURE_IMAGES], predictions[:FIGURE_IMAGES], masks[:FIGURE_IMAGES])
        for name, metric in getattr(self, f"{stage}_metrics").items():
            metric.update(predictions, masks)
            # the metric object is logged: Lightning computes it once per epoch over every image (and every device)
            self.log(f"{stage}/{name}", metric, prog_bar=name == "miou", batch_size=len(images))

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    def on_test_epoch_end(self) -> None:
        shown = self._shown
        datamodule = self.trainer.datamodule
        if shown is not None and hasattr(datamodule, "mean") and hasattr(datamodule, "std"):
            images, predictions, masks = shown
            if images.shape[-2:] != masks.shape[-2:]:  # resized for evaluation: show the labels' size
                images = F.interpolate(images, size=masks.shape[-2:], mode="bilinear", align_corners=False)
            path = Path(self.trainer.default_root_dir) / FIGURE_FILE
            segmentation_figure(images, predictions, masks, datamodule.mean, datamodule.std, self.num_classes, path,
                                self.hparams.ignore_index)
        self._shown = None

    def configure_optimizers(self) -> Any:
        return configure_dense_optim(self, self.model, self.backbone, self.backbone_lr_mult)
