"""PASCAL VOC (Everingham et al., 2010): semantic segmentation (VOC2012, optional SBD augmentation) and detection.

Layout as the devkit unpacks: ``root/VOCdevkit/VOC2012/{JPEGImages, Annotations, SegmentationClass,
ImageSets/Segmentation, ImageSets/Main}``; ``root`` may also point at ``VOCdevkit`` itself. The augmented
segmentation set (10,582 images, Hariharan et al.'s SBD converted to index PNGs) is read from
``VOC2012/SegmentationClassAug`` with the list ``ImageSets/Segmentation/train_aug.txt``, as DeepLab's and mmseg's
conversions lay it out.
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chanzoo.data.dense import (
    DenseDataModule,
    DetectionDataset,
    SegmentationDataModule,
    check_root,
    detection_collate,
    detection_transform,
    read_split_file,
)

_logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def devkit_dir(root: Path) -> Path:
    """``root/VOCdevkit`` or ``root`` itself when it is the devkit folder."""
    return root / "VOCdevkit" if (root / "VOCdevkit").is_dir() else root


class VOCSegmentationDataModule(SegmentationDataModule):
    """VOC2012 semantic segmentation: 21 classes (background + 20), 255 on object borders (ignored).

    Args:
        root: folder holding ``VOCdevkit`` (or the devkit itself).
        year: devkit year folder, ``VOC<year>``.
        sbd: train on the SBD-augmented ``train_aug`` list with ``SegmentationClassAug`` labels.
        train_split/val_split/test_split: ``ImageSets/Segmentation`` list names (test null: val).
        Other arguments as in ``SegmentationDataModule``.
    """

    def __init__(self, root: str, year: str = "2012", sbd: bool = False, train_split: str | None = None,
                 val_split: str = "val", test_split: str | None = None, num_classes: int = 21,
                 **kwargs: Any) -> None:
        base = check_root(root, "/data/VOC (holding VOCdevkit/VOC2012)")
        voc = devkit_dir(base) / f"VOC{year}"
        if not voc.is_dir():
            raise FileNotFoundError(f"VOC folder {voc} does not exist (expected <root>/VOCdevkit/VOC{year})")
        if num_classes != len(VOC_CLASSES) + 1:
            raise ValueError(f"num_classes must be {len(VOC_CLASSES) + 1} for VOC, got {num_classes}")
        train_split = train_split or ("train_aug" if sbd else "train")

        def split(name: str, ann_dir: str) -> dict[str, str]:
            return {"img_dir": "JPEGImages", "ann_dir": ann_dir, "split_file": f"ImageSets/Segmentation/{name}.txt"}

        super().__init__(
            str(voc), train=split(train_split, "SegmentationClassAug" if sbd else "SegmentationClass"),
            val=split(val_split, "SegmentationClass"),
            test=split(test_split, "SegmentationClass") if test_split else None,
            num_classes=num_classes, class_names=("background", *VOC_CLASSES), reduce_zero_label=False,
            img_suffix=".jpg", ann_suffix=".png", **kwargs,
        )


def parse_voc_xml(path: Path, class_to_label: dict[str, int]) -> dict[str, Any]:
    """One VOC annotation file: size and objects, validated; errors name the file and the object's index."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"annotation file {path} is not valid XML: {err}") from err
    size = root.find("size")
    if size is None:
        raise ValueError(f"annotation file {path} has no <size>")
    width, height = int(size.findtext("width", "0")), int(size.findtext("height", "0"))
    if width <= 0 or height <= 0:
        raise ValueError(f"annotation file {path}: image size {width}x{height} is not positive")
    boxes, labels, difficult = [], [], []
    for i, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        where = f"annotation file {path}, object {i} ({name!r})"
        if name not in class_to_label:
            raise ValueError(f"{where}: class {name!r} is not one of the {len(class_to_label)} VOC classes")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise ValueError(f"{where}: no <bndbox>")
        # VOC boxes are 1-based inclusive pixel indices: x1 - 1, y1 - 1, x2, y2 in continuous 0-based coordinates
        x1, y1, x2, y2 = (float(bnd.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax"))
        x1, y1 = x1 - 1, y1 - 1
        if not x2 >= x1 or not y2 >= y1:
            raise ValueError(f"{where}: box ({x1 + 1}, {y1 + 1}, {x2}, {y2}) has a negative size")
        if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
            raise ValueError(f"{where}: box ({x1 + 1}, {y1 + 1}, {x2}, {y2}) lies outside the {width}x{height} image")
        boxes.append([max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)])
        labels.append(class_to_label[name])
        difficult.append(int(obj.findtext("difficult", "0") or 0))
    return {"width": width, "height": height, "boxes": np.array(boxes, np.float32).reshape(-1, 4),
            "labels": np.array(labels, np.int64), "difficult": np.array(difficult, np.int64)}


class VOCDetectionDataModule(DenseDataModule):
    """VOC detection from the devkit's XML annotations, 20 classes as labels 1..20.

    ``train_sets``/``val_sets``/``test_sets`` are ``VOC<year>/<ImageSets/Main list>`` entries whose images are
    concatenated; the common protocol trains on ``VOC2007/trainval + VOC2012/trainval`` and tests on
    ``VOC2007/test``. Objects marked difficult are left out of training and kept for evaluation with
    ``iscrowd=1``, so COCO-style evaluation ignores them as VOC's does. ``area`` is the box area.
    """

    task_type = "detection"
    collate_fn = staticmethod(detection_collate)

    def __init__(
        self,
        root: str,
        train_sets: Sequence[str] = ("VOC2007/trainval", "VOC2012/trainval"),
        val_sets: Sequence[str] = ("VOC2007/test",),
        test_sets: Sequence[str] | None = None,
        num_classes: int = 20,
        hflip: float = 0.5,
        train_scales: Sequence[int] | None = None,
        max_size: int | None = 1000,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        subset: int | None = None,
        seed: int = 0,
        in_chans: int = 3,
        with_masks: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, subset, in_chans)
        self.devkit = devkit_dir(check_root(root, "/data/VOC (holding VOCdevkit/VOC2007, VOCdevkit/VOC2012)"))
        if num_classes != len(VOC_CLASSES):
            raise ValueError(f"num_classes must be {len(VOC_CLASSES)} for VOC detection, got {num_classes}")
        if with_masks:
            raise ValueError("with_masks=true is not available for VOC detection: its XML annotations hold boxes only")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
        self.sets = {"fit": list(train_sets), "validate": list(val_sets), "test": list(test_sets or val_sets)}
        for stage, entries in self.sets.items():
            for entry in entries:
                if len(entry.split("/")) != 2:
                    raise ValueError(f"{stage} sets entries must read VOC<year>/<list>, got {entry!r}")
        self.num_classes, self.class_names, self.with_masks = num_classes, list(VOC_CLASSES), False
        self.hflip, self.train_scales, self.max_size = hflip, list(train_scales) if train_scales else None, max_size

    def make_dataset(self, stage: str, train: bool) -> DetectionDataset:
        class_to_label = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}
        records = []
        for entry in self.sets[stage]:
            year_dir, list_name = entry.split("/")
            voc = self.devkit / year_dir
            for name in read_split_file(voc / "ImageSets" / "Main" / f"{list_name}.txt"):
                ann = parse_voc_xml(voc / "Annotations" / f"{name}.xml", class_to_label)
                boxes = ann["boxes"]
                keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # degenerate boxes dropped
                if train:
                    keep &= ann["difficult"] == 0
                if train and not keep.any():
                    continue  # as for COCO: training skips images with nothing to learn from
                boxes = boxes[keep]
                file = voc / "JPEGImages" / f"{name}.jpg"
                if not file.is_file():
                    raise FileNotFoundError(f"image file {file} does not exist (listed in {voc}/ImageSets/Main/"
                                            f"{list_name}.txt)")
                records.append({
                    "file": file, "image_id": len(records), "height": ann["height"], "width": ann["width"],
                    "boxes": boxes, "labels": ann["labels"][keep],
                    "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                    "iscrowd": ann["difficult"][keep],
                })
        if not records:
            raise ValueError(f"the {stage} sets {self.sets[stage]} hold no usable images in {self.devkit}")
        transform = detection_transform(train, self.hflip, self.train_scales, self.max_size)
        return DetectionDataset(self.take_subset(records), transform)
