"""The Lightning tasks on the coins photo: training lowers the loss, validation logs COCO mAP / mIoU under the
names the checkpoint monitors, and the optimizer honours the backbone lr multiplier."""
from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch

import chanzoo
from chanzoo.tasks.detection import DetectionTask, drop_crowd
from chanzoo.tasks.segmentation import SegmentationTask

OPTIM = {"name": "adamw", "lr": 2e-3, "weight_decay": 1e-4}
SCHED = {"name": "none"}


class LossHistory(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(task: L.LightningModule, datamodule: L.LightningDataModule, steps: int) -> tuple[L.Trainer, LossHistory]:
    history = LossHistory()
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[history],
                        check_val_every_n_epoch=max(1, steps // 2))
    trainer.fit(task, datamodule=datamodule)
    return trainer, history


def test_drop_crowd_removes_crowd_annotations(coins: tuple) -> None:
    _, target, _ = coins
    crowded = {**target, "iscrowd": torch.tensor([1] + [0] * (len(target["boxes"]) - 1))}
    kept = drop_crowd(crowded)
    assert len(kept["boxes"]) == len(kept["labels"]) == len(kept["masks"]) == len(target["boxes"]) - 1
    torch.testing.assert_close(kept["boxes"], target["boxes"][1:])
    assert kept["image_id"] == target["image_id"]


@pytest.mark.slow
def test_detection_task_learns_and_logs_map(detection_data: type) -> None:
    torch.manual_seed(0)
    task = DetectionTask(chanzoo.create_model("resnet18", num_classes=0), OPTIM, SCHED, num_classes=2, head="fcos",
                         fpn_channels=64, min_size=96, max_size=128)
    assert (DetectionTask.monitor, DetectionTask.monitor_mode) == ("val/map_50", "max")
    trainer, history = _fit(task, detection_data(), steps=16)
    first, last = sum(history.losses[:3]) / 3, sum(history.losses[-3:]) / 3
    assert last < 0.8 * first, history.losses
    for name in ("val/map", "val/map_50", "val/map_75", "val/map_small", "val/mar_100"):
        assert name in trainer.callback_metrics, sorted(trainer.callback_metrics)
    assert 0.0 <= float(trainer.callback_metrics["val/map_50"]) <= 1.0


@pytest.mark.slow
def test_mask_rcnn_task_logs_box_and_mask_map(detection_data: type) -> None:
    task = DetectionTask(chanzoo.create_model("resnet18", num_classes=0), OPTIM, SCHED, num_classes=2,
                         head="mask_rcnn", fpn_channels=32, min_size=96, max_size=128,
                         head_kwargs={"rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 32})
    trainer, _ = _fit(task, detection_data(with_masks=True), steps=2)
    assert {"val/map_50", "val/mask_map", "val/mask_map_50"} <= set(trainer.callback_metrics)


@pytest.mark.slow
def test_segmentation_task_learns_and_logs_miou(segmentation_data: type) -> None:
    torch.manual_seed(0)
    task = SegmentationTask(chanzoo.create_model("resnet18", num_classes=0), OPTIM, SCHED, num_classes=3,
                            decoder="fpn", decoder_channels=32)
    assert (SegmentationTask.monitor, SegmentationTask.monitor_mode) == ("val/miou", "max")
    trainer, history = _fit(task, segmentation_data(), steps=16)
    assert sum(history.losses[-3:]) < 0.8 * sum(history.losses[:3]), history.losses
    assert {"val/miou", "val/pixel_acc", "val/loss"} <= set(trainer.callback_metrics)
    assert float(trainer.callback_metrics["val/pixel_acc"]) > 0.5  # background alone covers most pixels


def test_optimizer_applies_the_backbone_lr_multiplier(segmentation_data: type) -> None:
    task = SegmentationTask(chanzoo.create_model("resnet18", num_classes=0), OPTIM, SCHED, num_classes=3,
                            decoder="upernet", decoder_channels=32, backbone_lr_mult=0.1)
    trainer, _ = _fit(task, segmentation_data(), steps=1)
    optimizer = trainer.optimizers[0]
    backbone_ids = {id(p) for p in task.backbone.parameters()}
    lrs = {("backbone" if id(g["params"][0]) in backbone_ids else "head"): g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"backbone": 2e-4, "head": 2e-3})


def test_unknown_head_and_decoder_in_task_config() -> None:
    with pytest.raises(ValueError, match="task.head='detr'"):
        DetectionTask(chanzoo.create_model("resnet18", num_classes=0), OPTIM, SCHED, num_classes=2, head="detr")
    with pytest.raises(ValueError, match="task.decoder='unet'"):
        SegmentationTask(chanzoo.create_model("resnet18", num_classes=0), OPTIM, SCHED, num_classes=3, decoder="unet")
