"""COCO-format object detection and instance segmentation (Lin et al., 2014).

Layout: ``root/annotations/instances_<split>.json`` and ``root/<split>/<file_name>`` (``train2017``, ``val2017``).
Annotations are read with the reference code's rules (torchvision's ``references/detection/coco_utils.py``):

- training drops images with no annotation or whose boxes all have a side <= 1 px (counting crowd regions), then
  drops crowd annotations; validation and test keep every image and keep crowd regions with ``iscrowd=1`` (COCO's
  evaluation ignores detections matched to them);
- boxes are clipped to the image and a box left with no width or height is dropped.

Errors name the annotation file and annotation id: a box with negative width/height or lying entirely outside its
image, a category id not among the categories, an RLE mask whose size differs from its image's, an annotation of an
unknown image. A missing image file is reported at setup; an image whose size differs from the JSON at load time.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from chanzoo.data.dense import DenseDataModule, DetectionDataset, check_root, detection_collate, detection_transform

_logger = logging.getLogger(__name__)


def load_coco_json(path: Path) -> dict[str, Any]:
    """The parsed annotation file; a missing or malformed file raises naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist (expected COCO's annotations/instances_*.json)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"annotation file {path} is not valid JSON: {err}") from err
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise ValueError(f"annotation file {path} has no {missing} list(s): not a COCO instances file")
    if not data["categories"]:
        raise ValueError(f"annotation file {path} lists no categories")
    return data


def segmentation_to_mask(segm: Any, height: int, width: int) -> np.ndarray:
    """One COCO segmentation (polygons, compressed or uncompressed RLE) as a uint8 ``HxW`` mask."""
    if isinstance(segm, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width)) if segm else None
        return mask_utils.decode(rle) if rle is not None else np.zeros((height, width), np.uint8)
    if isinstance(segm.get("counts"), list):  # uncompressed RLE
        segm = mask_utils.frPyObjects(segm, height, width)
    return mask_utils.decode(segm)


def instance_masks(record: dict[str, Any]) -> np.ndarray:
    """The uint8 ``[N, H, W]`` masks of a record's ``segmentations``."""
    height, width = record["height"], record["width"]
    if not record["segmentations"]:
        return np.zeros((0, height, width), np.uint8)
    return np.stack([segmentation_to_mask(s, height, width) for s in record["segmentations"]]).astype(np.uint8)


def _has_valid_annotation(anns: list[dict[str, Any]]) -> bool:
    # torchvision's reference: an image is kept for training when it has an annotation whose box is over 1 px a side
    return any(a["bbox"][2] > 1 and a["bbox"][3] > 1 for a in anns)


def coco_records(ann_path: Path, img_dir: Path, category_ids: Sequence[int], train: bool, with_masks: bool,
                 ) -> list[dict[str, Any]]:
    """Validated per-image records of one COCO annotation file (see the module docstring for the rules)."""
    data = load_coco_json(ann_path)
    cat_to_label = {cid: i + 1 for i, cid in enumerate(category_ids)}
    images = {}
    for img in data["images"]:
        images[img["id"]] = img
    present = {p.name for p in img_dir.iterdir()} if img_dir.is_dir() else None
    if present is None:
        raise FileNotFoundError(f"image folder {img_dir} does not exist (annotations: {ann_path})")
    per_image: dict[int, list[dict[str, Any]]] = {img_id: [] for img_id in images}
    for ann in data["annotations"]:
        aid, img_id = ann.get("id"), ann.get("image_id")
        where = f"annotation file {ann_path}, annotation id {aid}"
        if img_id not in images:
            raise ValueError(f"{where}: image_id {img_id} is not among the file's images")
        img = images[img_id]
        if ann.get("category_id") not in cat_to_label:
            raise ValueError(
                f"{where} (image {img['file_name']}): category_id {ann.get('category_id')} is not among the "
                f"categories {sorted(cat_to_label)}"
            )
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise ValueError(f"{where} (image {img['file_name']}): bbox must be [x, y, width, height], got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if w < 0 or h < 0:
            raise ValueError(
                f"{where} (image {img['file_name']}): bbox {bbox} has a negative size (width {w}, height {h})"
            )
        if x >= img["width"] or y >= img["height"] or x + w <= 0 or y + h <= 0:
            raise ValueError(
                f"{where} (image {img['file_name']}): bbox {bbox} lies entirely outside the "
                f"{img['width']}x{img['height']} image"
            )
        segm = ann.get("segmentation")
        if isinstance(segm, dict) and list(segm.get("size", [])) != [img["height"], img["width"]]:
            raise ValueError(
                f"{where} (image {img['file_name']}): mask size {segm.get('size')} (height, width) differs from "
                f"its image's {[img['height'], img['width']]}"
            )
        if with_masks and not segm:
            raise ValueError(f"{where} (image {img['file_name']}): no segmentation, but with_masks=true")
        per_image[img_id].append(ann)
    records = []
    for img_id in sorted(images):
        img, anns = images[img_id], per_image[img_id]
        if img["file_name"] not in present:
            raise FileNotFoundError(f"image file {img_dir / img['file_name']} (image id {img_id}) does not exist; "
                                    f"it is listed in {ann_path}")
        if train:
            if not _has_valid_annotation(anns):
                continue
            anns = [a for a in anns if not a.get("iscrowd", 0)]
        records.append(_record(img, anns, img_dir, cat_to_label, with_masks))
    return records


def _record(img: dict[str, Any], anns: list[dict[str, Any]], img_dir: Path, cat_to_label: dict[int, int],
            with_masks: bool) -> dict[str, Any]:
    height, width = img["height"], img["width"]
    boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    kept = [a for a, k in zip(anns, keep) if k]
    return {
        "file": img_dir / img["file_name"],
        "image_id": int(img["id"]),
        "height": height,
        "width": width,
        "boxes": boxes[keep],
        "labels": np.array([cat_to_label[a["category_id"]] for a in kept], dtype=np.int64),
        "area": np.array([a.get("area", 0.0) for a in kept], dtype=np.float32),
        "iscrowd": np.array([a.get("iscrowd", 0) for a in kept], dtype=np.int64),
        "segmentations": [a["segmentation"] for a in kept] if with_masks else None,
    }


class COCODetectionDataModule(DenseDataModule):
    """COCO-format detection / instance segmentation: ``root/<ann_file>`` and ``root/<img_dir>`` per split.

    Category ids are mapped in increasing order to labels ``1..num_classes`` (0 is background); ``category_ids[i]``
    is the COCO id of label ``i + 1`` and ``class_names[i]`` its name. Categories are read from the validation
    annotation file when the datamodule is built; the other splits must list the same.

    Args:
        root: data folder, e.g. /data/coco.
        train_split/val_split/test_split: split names filled into ``ann_file`` and ``img_dir`` (test null: val).
        ann_file/img_dir: paths relative to ``root`` with ``{split}``.
        num_classes: expected number of categories (checked against the file), null to take the file's.
        with_masks: also return instance masks (Mask R-CNN).
        hflip: horizontal-flip probability for training.
        train_scales: shorter-side sizes drawn at random for training (multi-scale), null for none; the detector's
            own transform still resizes to its ``min_size``/``max_size`` afterwards.
        max_size: longer-side cap of ``train_scales``.
        subset: keep only the first ``subset`` images of each split (by image id).
    """

    task_type = "detection"
    collate_fn = staticmethod(detection_collate)

    def __init__(
        self,
        root: str,
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str | None = None,
        ann_file: str = "annotations/instances_{split}.json",
        img_dir: str = "{split}",
        num_classes: int | None = None,
        with_masks: bool = False,
        hflip: float = 0.5,
        train_scales: Sequence[int] | None = None,
        max_size: int | None = 1333,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        subset: int | None = None,
        seed: int = 0,
        in_chans: int = 3,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, subset, in_chans)
        self.root = check_root(root, "/data/coco")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
        self.splits = {"fit": train_split, "validate": val_split, "test": test_split or val_split}
        self.ann_file, self.img_dir, self.with_masks = ann_file, img_dir, with_masks
        self.hflip, self.train_scales, self.max_size = hflip, list(train_scales) if train_scales else None, max_size
        categories = sorted(load_coco_json(self.split_paths("validate")[0])["categories"], key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in categories]
        self.class_names = [str(c.get("name", c["id"])) for c in categories]
        if num_classes is not None and num_classes != len(categories):
            raise ValueError(
                f"num_classes={num_classes} but {self.split_paths('validate')[0]} lists {len(categories)} categories"
            )
        self.num_classes = len(categories)

    def split_paths(self, stage: str) -> tuple[Path, Path]:
        """(annotation file, image folder) of ``stage``."""
        split = self.splits[stage]
        return self.root / self.ann_file.format(split=split), self.root / self.img_dir.format(split=split)

    def make_dataset(self, stage: str, train: bool) -> DetectionDataset:
        ann_path, img_dir = self.split_paths(stage)
        records = coco_records(ann_path, img_dir, self.category_ids, train, self.with_masks)
        if not records:
            raise ValueError(f"annotation file {ann_path} leaves no usable images for the {stage} stage")
        transform = detection_transform(train, self.hflip, self.train_scales, self.max_size)
        return DetectionDataset(self.take_subset(records), transform, instance_masks if self.with_masks else None)
