"""Tiny dense-prediction data folders in the real COCO / VOC / ADE20K layouts, built from real photos.

Each image is a crop of one of scikit-image's bundled photos with a few Fashion-MNIST garments pasted on it
(``chanzoo.data.make_fashion_paste.compose_image``), so boxes and masks are exact. Every builder returns what it
wrote, per split and image, so tests can compare loaders against it::

    from dense_fixtures import make_coco, make_voc, make_ade20k
    info = make_coco(tmp_path / "coco")           # data=coco data.root=<tmp>/coco
    info = make_voc(tmp_path / "voc", sbd=True)   # data=voc_seg / voc_det data.root=<tmp>/voc
    info = make_ade20k(tmp_path / "ade")          # data=ade20k data.root=<tmp>/ade/ADEChallengeData2016
"""
from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from chanzoo.data.make_fashion_paste import compose_image, mask_annotation, voc_palette
from chanzoo.data.voc import VOC_CLASSES

# COCO 2017's 80 categories with their sparse ids, as instances_*2017.json lists them.
COCO_CATEGORIES = dict(zip(
    (*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91)),
    ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
     "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
     "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
     "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
     "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
     "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
     "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
     "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"),
    strict=True,
))
# The COCO id each garment class (0..9) is annotated as: sparse, so the mapping to contiguous labels is exercised.
COCO_CATEGORY_IDS = (1, 3, 7, 8, 13, 22, 35, 46, 70, 90)
GARMENTS = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
SIZES = ((120, 160), (144, 128), (128, 128), (160, 136))  # (height, width), portrait and landscape


@functools.lru_cache(maxsize=1)
def _garments() -> tuple[np.ndarray, np.ndarray]:
    from chanzoo.data.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist(split="test")
    return images[:2000, 0].numpy(), labels[:2000].numpy()


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    from skimage import data

    return data.astronaut(), data.coffee(), data.chelsea(), data.rocket()


def scenes(count: int, seed: int, num_objects: int = 3) -> list[dict[str, Any]]:
    """``count`` images with their (class 0..9, visible mask) objects; deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    garments, labels = _garments()
    out = []
    for i in range(count):
        size = SIZES[i % len(SIZES)]
        image, class_map, objects = compose_image(_photos()[i % 4], garments, labels, size, rng, num_objects,
                                                  min_side=20, max_side=48, min_visible=0.6)
        out.append({"image": image, "class_map": class_map, "objects": objects})
    return out


def _save_jpg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def _save_index_png(path: Path, labels: np.ndarray, palette: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(labels.astype(np.uint8))
    if palette:
        img.putpalette(voc_palette())
    img.save(path)


def make_coco(root: Path, num_train: int = 4, num_val: int = 3, seed: int = 0, coco80: bool = True) -> dict[str, Any]:
    """COCO 2017 layout with crowd regions and the reference code's corner cases.

    The categories are COCO's 80 (``coco80``, so ``data=coco`` composes unchanged) or only the 10 used, named after
    the garments; either way garment class c is annotated with the sparse COCO id ``COCO_CATEGORY_IDS[c]``.

    train2017 adds an image with no annotation and one whose only box is 1 px wide (both dropped in training);
    the first image of each split has a crowd region (uncompressed RLE, as COCO stores crowds) and a polygon
    object, and its last object's box reaches 3 px past the right border (clipped on loading).
    """
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    names = COCO_CATEGORIES if coco80 else dict(zip(COCO_CATEGORY_IDS, GARMENTS))
    categories = [{"id": cid, "name": name, "supercategory": "thing"} for cid, name in names.items()]
    info: dict[str, Any] = {"category_ids": list(names), "class_names": list(names.values())}
    ann_id = 100
    for split, count, split_seed in (("train2017", num_train, seed), ("val2017", num_val, seed + 1)):
        images, annotations = [], []
        for i, scene in enumerate(scenes(count + (2 if split == "train2017" else 0), split_seed)):
            image_id = 1000 * (split == "val2017") + 10 * (i + 1)
            height, width = scene["image"].shape[:2]
            file_name = f"{image_id:012d}.jpg"
            _save_jpg(root / split / file_name, scene["image"])
            images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
            if split == "train2017" and i == count:  # no annotation at all
                continue
            if split == "train2017" and i == count + 1:  # only a 1-px-wide box
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[0],
                                    "bbox": [10, 10, 1, 30], "area": 30.0, "iscrowd": 0,
                                    "segmentation": [[10, 10, 11, 10, 11, 40, 10, 40]]})
                continue
            for k, (cls, mask) in enumerate(scene["objects"]):
                ann_id += 1
                ann = {"id": ann_id, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[cls],
                       **mask_annotation(mask)}
                if i == 0 and k == len(scene["objects"]) - 1:
                    ann["bbox"][2] = width - ann["bbox"][0] + 3  # reaches past the border: clipped on loading
                annotations.append(ann)
            if i == 0:
                ann_id += 1
                rect = np.zeros((height, width), np.uint8)
                rect[5:25, 30:70] = 1
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[4],
                                    "bbox": [30, 5, 40, 20], "area": 800.0, "iscrowd": 1,
                                    "segmentation": _uncompressed_rle(rect)})
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[2],
                                    "bbox": [60, 70, 30, 20], "area": 600.0, "iscrowd": 0,
                                    "segmentation": [[60, 70, 90, 70, 90, 90, 60, 90]]})
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        info[split] = coco
    return info


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE (column-major run lengths starting with zeros), as crowd regions are stored."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def voc_class_map(scene: dict[str, Any], border: bool = True) -> np.ndarray:
    """VOC labels of a scene: garment class c -> VOC class 2c+1 (1..19), 255 on a 1-px object border."""
    labels = np.zeros(scene["class_map"].shape, np.uint8)
    for cls, mask in scene["objects"]:
        labels[mask] = 2 * cls + 1
    if border:
        fg = labels > 0
        grown = fg.copy()
        grown[1:] |= fg[:-1]
        grown[:-1] |= fg[1:]
        grown[:, 1:] |= fg[:, :-1]
        grown[:, :-1] |= fg[:, 1:]
        labels[grown & ~fg] = 255
    return labels


def _voc_xml(name: str, height: int, width: int, objects: Sequence[dict[str, Any]]) -> str:
    parts = [f"<annotation><folder>VOC</folder><filename>{name}.jpg</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for obj in objects:
        x1, y1, x2, y2 = obj["box"]
        parts.append(f"<object><name>{obj['name']}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{obj['difficult']}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                     f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def make_voc(root: Path, years: Sequence[str] = ("2012",), num_train: int = 3, num_val: int = 2,
             sbd: bool = False, seed: int = 0) -> dict[str, Any]:
    """``root/VOCdevkit/VOC<year>`` with JPEGImages, Annotations (XML, 1-based boxes), SegmentationClass (palette
    PNGs with 255 borders), ImageSets/Segmentation and ImageSets/Main ({train,val,trainval}, and test for 2007);
    with ``sbd`` also SegmentationClassAug (borderless) and ImageSets/Segmentation/train_aug.txt.

    The first object of each image's XML is marked difficult. Returns, per year and name, the written label map
    and objects (0-based continuous xyxy boxes and labels 1..20).
    """
    info: dict[str, Any] = {}
    for y, year in enumerate(years):
        voc = Path(root) / "VOCdevkit" / f"VOC{year}"
        names = {"train": [f"{year}_{i:06d}" for i in range(num_train)],
                 "val": [f"{year}_{num_train + i:06d}" for i in range(num_val)]}
        all_names = names["train"] + names["val"]
        records = {}
        for name, scene in zip(all_names, scenes(len(all_names), seed + 10 * y)):
            height, width = scene["image"].shape[:2]
            _save_jpg(voc / "JPEGImages" / f"{name}.jpg", scene["image"])
            labels = voc_class_map(scene)
            _save_index_png(voc / "SegmentationClass" / f"{name}.png", labels)
            if sbd:
                _save_index_png(voc / "SegmentationClassAug" / f"{name}.png", voc_class_map(scene, border=False),
                                palette=False)
            objects = []
            for k, (cls, mask) in enumerate(scene["objects"]):
                rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
                objects.append({"name": VOC_CLASSES[2 * cls], "difficult": int(k == 0),
                                "box": (int(cols[0]) + 1, int(rows[0]) + 1, int(cols[-1]) + 1, int(rows[-1]) + 1),
                                "label": 2 * cls + 1,
                                "xyxy": [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]})
            (voc / "Annotations").mkdir(parents=True, exist_ok=True)
            (voc / "Annotations" / f"{name}.xml").write_text(_voc_xml(name, height, width, objects))
            records[name] = {"labels": labels, "objects": objects, "height": height, "width": width}
        lists = {"train": names["train"], "val": names["val"], "trainval": all_names}
        if year == "2007":
            lists["test"] = names["val"]
        for folder in ("Segmentation", "Main"):
            (voc / "ImageSets" / folder).mkdir(parents=True, exist_ok=True)
            for list_name, entries in lists.items():
                (voc / "ImageSets" / folder / f"{list_name}.txt").write_text("\n".join(entries) + "\n")
        if sbd:
            (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(names["train"]) + "\n")
        info[year] = {"names": names, "records": records}
    return info


def make_ade20k(root: Path, num_train: int = 3, num_val: int = 2, seed: int = 0) -> dict[str, Any]:
    """``root/ADEChallengeData2016/{images,annotations}/{training,validation}``: grey label PNGs with 0 ("other")
    as background and garment class c as ADE label 15c + 1 (1..136); one object of the first image is 150."""
    base = Path(root) / "ADEChallengeData2016"
    info: dict[str, Any] = {"root": base}
    for split, prefix, count, split_seed in (("training", "ADE_train", num_train, seed),
                                             ("validation", "ADE_val", num_val, seed + 1)):
        records = {}
        for i, scene in enumerate(scenes(count, split_seed)):
            name = f"{prefix}_{i + 1:08d}"
            labels = np.zeros(scene["class_map"].shape, np.uint8)
            for k, (cls, mask) in enumerate(scene["objects"]):
                labels[mask] = 150 if (i == 0 and k == 0) else 15 * cls + 1
            _save_jpg(base / "images" / split / f"{name}.jpg", scene["image"])
            _save_index_png(base / "annotations" / split / f"{name}.png", labels, palette=False)
            records[name] = labels
        info[split] = records
    return info


def coco_mask(segm: Any, height: int, width: int) -> np.ndarray:
    """Reference decoding of one COCO segmentation with pycocotools (as ``COCO.annToMask`` does)."""
    if isinstance(segm, dict) and isinstance(segm["counts"], str):
        return mask_utils.decode(segm)
    rles = mask_utils.frPyObjects(segm, height, width)
    return mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles)
