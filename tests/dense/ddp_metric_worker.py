"""A rank of the two-process gloo group in ``test_ddp_dense.py``: it scores its own shard of a fixed prediction set
with the dense tasks' own metric objects and writes what ``compute()`` returns after torchmetrics' sync."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from chanzoo.tasks.detection import _SCALAR_KEYS


def shard(items: list, rank: int, world_size: int) -> list:
    """Rank ``rank``'s items, strided as Lightning's distributed samplers deal them (uneven lengths allowed)."""
    return items[rank::world_size]


def score(det_task: Any, seg_task: Any, predictions: dict[str, Any]) -> dict[str, float]:
    """Box and mask mAP of the (Mask R-CNN) detection task's ``test_map`` and the segmentation task's
    ``test_metrics`` over the given predictions, as the tasks' test steps feed them (``_metric_inputs``)."""
    preds, gts = det_task._metric_inputs(predictions["det_preds"], predictions["det_targets"])
    det_task.test_map.update(preds, gts)
    results = det_task.compute_map("test")
    scores = {f"det/{iou}_{key}": float(results[f"{iou}_{key}"]) for iou in ("bbox", "segm") for key in _SCALAR_KEYS}
    for logits_argmax, masks in zip(predictions["seg_preds"], predictions["seg_masks"]):
        for metric in seg_task.test_metrics.values():
            metric.update(logits_argmax[None], masks[None])
    scores.update({f"seg/{name}": float(metric.compute()) for name, metric in seg_task.test_metrics.items()})
    return scores


def build_tasks() -> tuple[Any, Any]:
    """Small Mask R-CNN and semantic-FPN tasks on ResNet-18 for fashion-paste (10 garment classes; 11 with
    background)."""
    from chanzoo import create_model
    from chanzoo.tasks.detection import DetectionTask
    from chanzoo.tasks.segmentation import SegmentationTask

    det = DetectionTask(create_model("resnet18", num_classes=10), {}, {}, num_classes=10, head="mask_rcnn",
                        fpn_channels=32, min_size=128, max_size=128)
    seg = SegmentationTask(create_model("resnet18", num_classes=11), {}, {}, num_classes=11, decoder="fpn",
                           decoder_channels=32)
    return det, seg


def run_rank(rank: int, world_size: int, init_file: str, inputs: str, out_dir: str) -> None:
    """Entry point of one spawned process."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        everything = torch.load(inputs, weights_only=False)
        mine = {key: shard(values, rank, world_size) for key, values in everything.items()}
        det_task, seg_task = build_tasks()
        result = score(det_task, seg_task, mine)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
