"""The task's metrics equal the reference computations: torchmetrics' mAP (faster_coco_eval backend, with COCO's
areas and crowd flags) equals pycocotools' COCOeval; mIoU is the whole-set confusion-matrix mean (VOC/mmseg)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.detection import MeanAveragePrecision


def _coins_ground_truth(scale: float = 1.0) -> tuple[np.ndarray, list[tuple[np.ndarray, int, int]]]:
    """Coins photo rescaled: (labels image, [(mask, class, iscrowd)]); the merged band at the top is a crowd.

    A coin's mask area (what COCO's annotation ``area`` holds) is ~0.78 of its box area.
    """
    from skimage import data, filters, measure, morphology, transform

    gray = transform.rescale(data.coins(), scale, anti_aliasing=True)
    labels = measure.label(morphology.closing(gray > filters.threshold_otsu(gray), morphology.disk(2)))
    objects = []
    for region in measure.regionprops(labels):
        if region.area < 300 * scale**2:
            continue
        crowd = int(region.area > 10000 * scale**2)
        objects.append((labels == region.label, 2 if region.area > 3000 * scale**2 else 1, crowd))
    return labels, objects


def _box(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask)
    return [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]


@pytest.fixture(scope="module")
def detection_set() -> dict:
    """Ground truth of two images (the photo at 0.6x, and mirrored at 2x: coin masks of 700-1900 and 7500-21000
    pixels, so COCO's small, medium and large ranges (32^2, 96^2) all occur, and some coins change range between
    mask and box area) and fixed predictions: shifted masks and boxes, missed objects, wrong classes and a false
    positive."""
    rng = np.random.default_rng(0)  # a fixed set of perturbations
    images, shapes = [], []
    for flip, scale in ((False, 0.6), (True, 2.0)):
        _, objects = _coins_ground_truth(scale)
        shapes.append(objects[0][0].shape)
        gts, preds = [], []
        for index, (mask, cls, crowd) in enumerate(objects):
            mask = mask[:, ::-1] if flip else mask
            gts.append({"mask": mask, "cls": cls, "crowd": crowd, "area": float(mask.sum())})
            if index % 7 == 3:
                continue  # missed
            shift = int(rng.integers(-6, 7) * scale)
            pred_mask = np.roll(mask, shift, axis=1)
            pred_cls = cls if index % 5 else 3 - cls
            preds.append({"mask": pred_mask, "cls": pred_cls, "score": float(rng.uniform(0.3, 1.0))})
        false_positive = np.zeros_like(objects[0][0])
        false_positive[-40:-5, 5:60] = True
        preds.append({"mask": false_positive, "cls": 1, "score": 0.95})
        images.append((gts, preds))
    return {"images": images, "shapes": shapes}


def _pycocotools(detection_set: dict, iou_type: str) -> np.ndarray:
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "small"}, {"id": 2, "name": "large"}]}
    results = []
    for image_id, (gts, preds) in enumerate(detection_set["images"]):
        height, width = detection_set["shapes"][image_id]
        gt["images"].append({"id": image_id, "height": height, "width": width})
        for g in gts:
            x0, y0, x1, y1 = _box(g["mask"])
            rle = mask_utils.encode(np.asfortranarray(g["mask"].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": g["cls"],
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": g["area"], "iscrowd": g["crowd"], "segmentation": rle,
            })
        for p in preds:
            x0, y0, x1, y1 = _box(p["mask"])
            rle = mask_utils.encode(np.asfortranarray(p["mask"].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            # a segm result carries its mask alone (pycocotools would take a detection's area from its box)
            shape = {"segmentation": rle} if iou_type == "segm" else {"bbox": [x0, y0, x1 - x0, y1 - y0]}
            results.append({"image_id": image_id, "category_id": p["cls"], "score": p["score"], **shape})
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    evaluator = COCOeval(coco, coco.loadRes(results), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


def _torchmetrics(detection_set: dict, iou_type: str, with_area: bool = True) -> dict[str, torch.Tensor]:
    metric = MeanAveragePrecision(iou_type=iou_type, backend="faster_coco_eval")
    for gts, preds in detection_set["images"]:
        key = "masks" if iou_type == "segm" else "boxes"
        pred = {"scores": torch.tensor([p["score"] for p in preds]), "labels": torch.tensor([p["cls"] for p in preds])}
        target = {"labels": torch.tensor([g["cls"] for g in gts]), "iscrowd": torch.tensor([g["crowd"] for g in gts]),
                  **({"area": torch.tensor([g["area"] for g in gts])} if with_area else {})}
        if key == "masks":
            pred["masks"] = torch.from_numpy(np.stack([p["mask"] for p in preds]))
            target["masks"] = torch.from_numpy(np.stack([g["mask"] for g in gts]))
        else:
            pred["boxes"] = torch.tensor([_box(p["mask"]) for p in preds])
            target["boxes"] = torch.tensor([_box(g["mask"]) for g in gts])
        metric.update([pred], [target])
    return metric.compute()


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_map_equals_pycocotools(detection_set: dict, iou_type: str) -> None:
    stats = _pycocotools(detection_set, iou_type)
    ours = _torchmetrics(detection_set, iou_type)
    names = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100"]
    for index, name in enumerate(names):
        assert float(ours[name]) == pytest.approx(float(stats[index]), abs=1e-6), name
    assert 0.2 < float(ours["map_50"]) < 1.0  # the set is neither trivial nor empty
    assert min(float(ours[k]) for k in ("map_small", "map_medium", "map_large")) >= 0  # every range occurs


def test_miou_is_the_whole_set_confusion_matrix_mean() -> None:
    """VOC/mmseg mIoU: one confusion matrix over all images, IoU per class present, then the mean; 255 ignored.
    (The mean of per-image mIoUs differs on this set.)"""
    labels, objects = _coins_ground_truth()
    target = np.zeros(labels.shape, dtype=np.int64)
    for mask, cls, crowd in objects:
        target[mask] = 255 if crowd else cls
    preds = [np.roll(np.where(target == 255, 0, target), shift, axis=1) for shift in (3, -9)]
    preds[1][preds[1] == 2] = 1  # the second image confuses large coins with small ones
    targets = [target, target]
    metric = MulticlassJaccardIndex(3, average="macro", ignore_index=255)
    for p, t in zip(preds, targets):
        metric.update(torch.from_numpy(p), torch.from_numpy(t))
    confusion = np.zeros((3, 3))
    for p, t in zip(preds, targets):
        valid = t != 255
        np.add.at(confusion, (t[valid], p[valid]), 1)
    iou = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
    assert float(metric.compute()) == pytest.approx(float(iou.mean()), abs=1e-6)
    per_image = []
    for p, t in zip(preds, targets):
        single = MulticlassJaccardIndex(3, average="macro", ignore_index=255)
        per_image.append(float(single(torch.from_numpy(p), torch.from_numpy(t))))
    assert abs(float(np.mean(per_image)) - float(iou.mean())) > 1e-3


def test_coco_areas_change_the_size_ranges(detection_set: dict) -> None:
    """Without COCO's (mask) areas the box areas place objects in other size ranges, and small/medium/large AP
    move away from COCOeval's."""
    stats = _pycocotools(detection_set, "bbox")
    box_areas = _torchmetrics(detection_set, "bbox", with_area=False)
    ranges = ((3, "map_small"), (4, "map_medium"), (5, "map_large"))
    moved = [abs(float(box_areas[k]) - float(stats[i])) for i, k in ranges]
    assert max(moved) > 0.01
