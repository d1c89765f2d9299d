"""Object detection and instance segmentation as a LightningModule: torchvision's detectors on any chanzoo/timm
backbone, COCO mAP from torchmetrics (faster_coco_eval backend, COCO's own areas and crowd flags)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torchmetrics.detection import MeanAveragePrecision

from chanzoo.dense import PyramidBackbone, build_detector, dense_param_groups
from chanzoo.dense.detection import DETECTION_HEADS
from chanzoo.dense.visualize import detection_figure
from chanzoo.tasks.guard import NonFiniteGuardMixin, check_on_nonfinite
from chanzoo.tasks.optim import TimmOptimMixin, scaled_lr

_logger = logging.getLogger(__name__)

Batch = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]
# torchmetrics' result keys that are one number each, logged as <stage>/<key>
_SCALAR_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100",
                "mar_small", "mar_medium", "mar_large")
_ONE_STAGE_STRIDES = (8, 16, 32)  # RetinaNet/FCOS: P3-P5 from the backbone, P6/P7 from the FPN
_TWO_STAGE_STRIDES = (4, 8, 16, 32)
FIGURE_FILE = "test_predictions.png"  # written to the run folder after testing
FIGURE_IMAGES = 4


def drop_crowd(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The target without its crowd annotations (``iscrowd == 1``), which take no part in the losses."""
    iscrowd = target.get("iscrowd")
    if iscrowd is None or not bool(iscrowd.any()):
        return target
    keep = iscrowd == 0
    return {k: v[keep] if torch.is_tensor(v) and v.ndim and len(v) == len(keep) else v for k, v in target.items()}


def gather_map_states(metric: MeanAveragePrecision) -> None:
    """Under torch.distributed, replace ``metric``'s per-image states by those of every rank (in rank order), so
    that ``compute()`` scores the whole evaluation set on each rank. Works with any number of images per rank;
    the states travel through ``all_gather_object`` (tensors moved to the CPU)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    names = list(metric._defaults)
    # box, score and label states are tensors; mask states are tuples of RLE encodings
    local = {name: [t.cpu() if torch.is_tensor(t) else t for t in getattr(metric, name)] for name in names}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    device = metric.device
    for name in names:
        states = [t for rank_states in gathered for t in rank_states[name]]
        setattr(metric, name, [t.to(device) if torch.is_tensor(t) else t for t in states])


class DetectionTask(NonFiniteGuardMixin, TimmOptimMixin, L.LightningModule):
    """Train and evaluate a torchvision detector (Faster R-CNN, Mask R-CNN, RetinaNet, FCOS) on a chanzoo backbone.

    Args:
        model: the backbone, as ``chanzoo.create_model`` builds it (a classifier: its head is pruned).
        optim, sched: the ``optim`` and ``sched`` config groups (``optim.layer_decay`` decays the backbone's blocks).
        num_classes: foreground classes (labels 1..num_classes; 0 is background).
        head: 'faster_rcnn', 'mask_rcnn', 'retinanet' or 'fcos'.
        backbone: ``PyramidBackbone`` options (out_indices, frozen_stages, frozen_bn, pyramid_channels).
        backbone_lr_mult: the backbone's learning rate relative to the heads'.
        fpn_channels, min_size, max_size: FPN width and torchvision's resize (shorter side, longer-side cap).
        head_kwargs: other keywords of the torchvision detector (e.g. ``box_detections_per_img``).
        on_nonfinite: 'stop' (raise at the first non-finite loss or gradient) or 'skip' (drop that step).
    """

    monitor = "val/map_50"  # the metric the checkpoint callback keeps the best of
    monitor_mode = "max"

    def __init__(
        self,
        model: nn.Module,
        optim: Mapping[str, Any],
        sched: Mapping[str, Any],
        num_classes: int,
        head: str = "faster_rcnn",
        backbone: Optional[Mapping[str, Any]] = None,
        backbone_lr_mult: float = 1.0,
        fpn_channels: int = 256,
        min_size: int = 800,
        max_size: int = 1333,
        head_kwargs: Optional[Mapping[str, Any]] = None,
        on_nonfinite: str = "stop",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        if head not in DETECTION_HEADS:
            raise ValueError(f"task.head={head!r} is not a detection head; choose one of {DETECTION_HEADS}")
        self.optim_cfg, self.sched_cfg = dict(optim), dict(sched)
        self.backbone_lr_mult = backbone_lr_mult
        pretrained_cfg = getattr(model, "pretrained_cfg", {}) or {}
        backbone_opts = {"strides": _TWO_STAGE_STRIDES if head in ("faster_rcnn", "mask_rcnn") else _ONE_STAGE_STRIDES}
        pyramid = PyramidBackbone(model, **{**backbone_opts, **dict(backbone or {})})
        self.model = build_detector(
            pyramid,
            head,
            num_classes,
            fpn_channels=fpn_channels,
            min_size=min_size,
            max_size=max_size,
            image_mean=pretrained_cfg.get("mean"),
            image_std=pretrained_cfg.get("std"),
            head_kwargs=dict(head_kwargs or {}),
        )
        self.num_classes = num_classes
        self.with_masks = head == "mask_rcnn"
        self._shown: Optional[tuple] = None  # the first test images, predictions and targets, for the figure
        iou_type = ("bbox", "segm") if self.with_masks else "bbox"
        for stage in ("val", "test"):
            # synced by gather_map_states: torchmetrics' own sync gathers one tensor per image and deadlocks (or
            # aborts) when the ranks hold different numbers of images, as they do when each image counts once
            metric = MeanAveragePrecision(iou_type=iou_type, backend="faster_coco_eval", sync_on_compute=False)
            self.add_module(f"{stage}_map", metric)

    @property
    def backbone(self) -> nn.Module:
        """The backbone network inside the dense model."""
        return self.model.backbone.backbone.inner

    def monitorable_metrics(self) -> list[str]:
        """The validation metrics this task logs (what a checkpoint callback may monitor)."""
        prefixes = ("", "mask_") if self.with_masks else ("",)
        return [f"val/{prefix}{key}" for prefix in prefixes for key in _SCALAR_KEYS]

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.model(images)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.model(images, [drop_crowd(t) for t in targets])
        loss = sum(losses.values())
        batch_size = len(images)
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=batch_size)
        return loss

    def _metric_inputs(
        self, predictions: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]
    ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
        preds, gts = [], []
        for pred, target in zip(predictions, targets):
            p = {"boxes": pred["boxes"], "scores": pred["scores"], "labels": pred["labels"]}
            g = {"boxes": target["boxes"], "labels": target["labels"]}
            for key in ("iscrowd", "area"):  # COCO's own crowd flags and areas, as COCOeval reads them
                if key in target:
                    g[key] = target[key]
            if self.with_masks:
                p["masks"] = pred["masks"][:, 0] > 0.5
                g["masks"] = target["masks"].bool()
            preds.append(p)
            gts.append(g)
        return preds, gts

    def _evaluate(self, batch: Batch, stage: str, batch_idx: int = -1) -> None:
        images, targets = batch
        predictions = self.model(images)
        if stage == "test" and batch_idx == 0 and self.trainer.is_global_zero:
            self._shown = (images[:FIGURE_IMAGES], predictions[:FIGURE_IMAGES], targets[:FIGURE_IMAGES])
        preds, gts = self._metric_inputs(predictions, targets)
        getattr(self, f"{stage}_map").update(preds, gts)

    def compute_map(self, stage: str) -> dict[str, torch.Tensor]:
        """COCO metrics of everything ``stage`` ('val' or 'test') scored so far, on every rank's images; resets."""
        metric = getattr(self, f"{stage}_map")
        gather_map_states(metric)
        results = metric.compute()
        metric.reset()
        return results

    def _log_map(self, stage: str) -> None:
        results = self.compute_map(stage)
        prefixes = {"bbox_": "", "segm_": "mask_"} if self.with_masks else {"": ""}
        for source, target in prefixes.items():
            for key in _SCALAR_KEYS:
                show = key == "map_50" and not target
                self.log(f"{stage}/{target}{key}", results[source + key].float(), prog_bar=show)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_map("val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_map("test")
        shown = self._shown
        if shown is not None:
            path = Path(self.trainer.default_root_dir) / FIGURE_FILE
            names = getattr(self.trainer.datamodule, "class_names", None)
            names = names or [str(i + 1) for i in range(self.num_classes)]
            detection_figure(*shown, class_names=names, path=path)
            _logger.info("test images with ground truth (left) and predictions (right): %s", path)
            self._shown = None

    def configure_optimizers(self) -> Any:
        return configure_dense_optim(self, self.model, self.backbone, self.backbone_lr_mult)


def configure_dense_optim(task: Any, model: nn.Module, backbone: nn.Module, backbone_lr_mult: float) -> Any:
    """The ``TimmOptimMixin`` optimizer and scheduler over ``dense_param_groups`` (backbone lr multiplier, and
    ``optim.layer_decay`` as layer-wise decay of the backbone alone)."""
    optim_cfg = dict(task.optim_cfg)
    layer_decay = optim_cfg.pop("layer_decay", None)
    trainer = task.trainer
    batch = getattr(trainer.datamodule, "batch_size", 1) if trainer.datamodule is not None else 1
    lr = scaled_lr(optim_cfg, batch * trainer.world_size * trainer.accumulate_grad_batches)
    groups = dense_param_groups(
        model, backbone, lr, float(optim_cfg.get("weight_decay", 0.0)), backbone_lr_mult, layer_decay
    )
    return task._configure_timm_optim(groups, optim_cfg, task.sched_cfg)
