"""Build *fashion-paste*: Fashion-MNIST garments pasted onto crops of scikit-image's bundled photos.

An offline detection / instance / semantic segmentation set for tests and CPU demos, not a benchmark. Boxes and
masks are exact by construction: a garment's mask is its pixels above a threshold after resizing, a later garment
hides what it covers of earlier ones (their masks lose those pixels), and each box is the tight box of the visible
mask. A placement that would leave an earlier garment less than ``min_visible`` of its area, or a visible side under
``min_side``, is retried elsewhere (and given up after a few tries), so every garment pixel in an image belongs to
an annotated object. Validation and test images use photos and garments that no training image uses.

Output (``--out``)::

    annotations/instances_{train,val,test}.json   COCO instances, category ids 1..10, RLE masks
    {train,val,test}/<id>.jpg                      images
    masks/{train,val,test}/<id>.png                index PNGs: 0 background, 1..10 garment classes, VOC palette
    params.json                                    the arguments it was built with

    python -m chanzoo.data.make_fashion_paste --out data/fashion_paste [--train N --val N --test N --size 128]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from chanzoo.data.coco import COCODetectionDataModule
from chanzoo.data.dense import SegmentationDataModule
from chanzoo.data.fashion_mnist import CLASSES, DEFAULT_ROOT, load_fashion_mnist

_logger = logging.getLogger(__name__)


def _motorcycle() -> np.ndarray:
    from skimage import data

    return data.stereo_motorcycle()[0]


def _photo(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        return getattr(data, name)()
    return load


# Photos shipped inside scikit-image (no download). Each split has its own photos.
PHOTOS: dict[str, dict[str, Callable[[], np.ndarray]]] = {
    "train": {
        **{n: _photo(n) for n in ("astronaut", "camera", "coffee", "rocket", "hubble_deep_field",
                                  "immunohistochemistry", "retina", "brick", "grass", "coins", "page")},
        "motorcycle": _motorcycle,
    },
    "val": {n: _photo(n) for n in ("chelsea", "moon")},
    "test": {n: _photo(n) for n in ("gravel", "cell", "text", "clock")},
}
PARAMS_FILE = "params.json"  # the generator arguments a set was built with
MASK_THRESHOLD = 40  # garment pixel if its (resized) Fashion-MNIST intensity exceeds this (of 255)


def voc_palette(num: int = 256) -> list[int]:
    """PASCAL VOC's colour map (bit-interleaved), flat [r, g, b, ...] for ``num`` indices."""
    palette = []
    for index in range(num):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def load_photos(split: str) -> list[np.ndarray]:
    """The split's photos as uint8 HxWx3 (grey ones stacked, alpha dropped)."""
    photos = []
    for load in PHOTOS[split].values():
        img = load()
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        photos.append(np.ascontiguousarray(img.astype(np.uint8)))
    return photos


def garment_crop(img: np.ndarray) -> np.ndarray:
    """A 28x28 garment cut to the tight box of its pixels above ``MASK_THRESHOLD``."""
    rows, cols = np.any(img > MASK_THRESHOLD, axis=1), np.any(img > MASK_THRESHOLD, axis=0)
    if not rows.any():
        return img
    r, c = np.flatnonzero(rows), np.flatnonzero(cols)
    return img[r[0]: r[-1] + 1, c[0]: c[-1] + 1]


def _garment_size(shape: tuple[int, int], rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    """(height, width) with the longer side drawn in [min_side, max_side] and the shorter kept >= min_side."""
    h, w = shape
    long_side = int(rng.integers(min_side, max_side + 1))
    scale = long_side / max(h, w)
    return max(min_side, min(max_side, round(h * scale))), max(min_side, min(max_side, round(w * scale)))


def _background(photo: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of ``photo`` with the output's aspect ratio, at most 3x down-scaled, resized to it."""
    h, w = photo.shape[:2]
    largest = min(h / height, w / width, 3.0)
    scale = float(rng.uniform(min(1.0, largest), largest))
    ch, cw = max(1, min(h, round(height * scale))), max(1, min(w, round(width * scale)))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(photo[y: y + ch, x: x + cw])
    return np.asarray(crop.resize((width, height), Image.BILINEAR) if (ch, cw) != (height, width) else crop).copy()


def compose_image(photo: np.ndarray, garments: np.ndarray, labels: np.ndarray, size: int | tuple[int, int],
                  rng: np.random.Generator, num_objects: int, min_side: int, max_side: int, min_visible: float,
                  tries: int = 8) -> tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image (``size`` = side or (height, width)): a photo crop plus up to ``num_objects`` garments.

    Returns the uint8 image, its class map (0 background, 1 + class) and [(class 0..9, visible mask)].
    """
    height, width = (size, size) if isinstance(size, int) else size
    image = _background(photo, height, width, rng).astype(np.float32)
    index_map = np.zeros((height, width), np.uint8)  # 0 background, else 1 + object number
    objects: list[tuple[int, int]] = []  # (class 0..9, full pasted area)
    for _ in range(num_objects):
        pick = int(rng.integers(len(garments)))
        garment, cls = garment_crop(garments[pick]), int(labels[pick])
        gh, gw = _garment_size(garment.shape, rng, min_side, max_side)
        patch = np.asarray(Image.fromarray(garment).resize((gw, gh), Image.BILINEAR), dtype=np.float32)
        alpha = patch > MASK_THRESHOLD
        if not _visible_ok(alpha, int(alpha.sum()), 1.0, min_side):  # thin after thresholding: too small a box
            continue
        tint = rng.uniform(0.45, 1.0, size=3).astype(np.float32)
        for _ in range(tries):
            y, x = int(rng.integers(0, height - gh + 1)), int(rng.integers(0, width - gw + 1))
            trial = index_map.copy()
            trial[y: y + gh, x: x + gw][alpha] = len(objects) + 1
            if all(_visible_ok(trial == k + 1, area, min_visible, min_side) for k, (_, area) in enumerate(objects)):
                break
        else:
            continue
        index_map = trial
        region = image[y: y + gh, x: x + gw]
        region[alpha] = patch[alpha, None] * tint
        objects.append((cls, int(alpha.sum())))
    out = [(cls, index_map == k + 1) for k, (cls, _) in enumerate(objects)]
    class_map = np.zeros((height, width), np.uint8)
    for cls, mask in out:
        class_map[mask] = cls + 1
    return image.clip(0, 255).astype(np.uint8), class_map, out


def _visible_ok(mask: np.ndarray, area: int, min_visible: float, min_side: int) -> bool:
    if mask.sum() < min_visible * area:
        return False
    return _span(np.any(mask, axis=1)) >= min_side and _span(np.any(mask, axis=0)) >= min_side


def _span(line: np.ndarray) -> int:
    idx = np.flatnonzero(line)
    return int(idx[-1] - idx[0] + 1) if idx.size else 0


def mask_annotation(mask: np.ndarray) -> dict[str, Any]:
    """COCO fields of one binary mask: compressed RLE, tight xywh box, pixel area."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
    return {"segmentation": rle, "bbox": bbox, "area": int(mask.sum()), "iscrowd": 0}


def build_split(out: Path, split: str, count: int, size: int, seed: int, garments: np.ndarray,
                labels: np.ndarray, objects_range: Sequence[int], min_side: int, max_side: int,
                min_visible: float) -> dict[str, Any]:
    """Write ``count`` images of ``split`` and return its COCO dict."""
    rng = np.random.default_rng([seed, ("train", "val", "test").index(split)])
    photos, photo_names = load_photos(split), list(PHOTOS[split])
    (out / split).mkdir(parents=True, exist_ok=True)
    (out / "masks" / split).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    images, annotations = [], []
    for image_id in range(1, count + 1):
        photo_idx = int(rng.integers(len(photos)))
        num_objects = int(rng.integers(objects_range[0], objects_range[1] + 1))
        image, class_map, objects = compose_image(photos[photo_idx], garments, labels, size, rng, num_objects,
                                                  min_side, max_side, min_visible)
        name = f"{image_id:06d}"
        Image.fromarray(image).save(out / split / f"{name}.jpg", quality=95)
        index_png = Image.fromarray(class_map)  # "L"; putpalette turns it into "P"
        index_png.putpalette(palette)
        index_png.save(out / "masks" / split / f"{name}.png")
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": size, "height": size,
                       "photo": photo_names[photo_idx]})
        for cls, mask in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1,
                                **mask_annotation(mask)})
    categories = [{"id": i + 1, "name": name, "supercategory": "garment"} for i, name in enumerate(CLASSES)]
    return {"info": {"description": f"fashion-paste {split}", "seed": seed, "photos": photo_names},
            "images": images, "annotations": annotations, "categories": categories}


def make_fashion_paste(out: str | Path, train: int = 8000, val: int = 500, test: int = 1000, size: int = 128,
                       seed: int = 0, fashion_root: str | Path = DEFAULT_ROOT, objects: Sequence[int] = (2, 4),
                       min_side: int = 20, max_side: int = 64, min_visible: float = 0.6) -> dict[str, int]:
    """Build the set under ``out``; returns the number of objects per split. Deterministic for a given seed."""
    if size < 128:
        raise ValueError(f"size must be >= 128 pixels, got {size}")
    if not 0 < min_side <= max_side <= size // 2:
        raise ValueError(f"object sides must satisfy 0 < min_side <= max_side <= size / 2, got {min_side}, {max_side}")
    if len(objects) != 2 or not 1 <= objects[0] <= objects[1]:
        raise ValueError(f"objects must be [min, max] garments tried per image with 1 <= min <= max, got {objects}")
    if not 0 < min_visible <= 1:
        raise ValueError(f"min_visible must be in (0, 1], got {min_visible}")
    counts = {"train": train, "val": val, "test": test}
    for split, count in counts.items():
        if count < 0:
            raise ValueError(f"--{split} must be >= 0 images, got {count}")
    out = Path(out)
    train_images, train_labels = load_fashion_mnist(fashion_root, "train")
    test_images, test_labels = load_fashion_mnist(fashion_root, "test")
    half = len(test_images) // 2
    sources = {  # held-out garments for val and test, as their photos are
        "train": (train_images[:, 0].numpy(), train_labels.numpy()),
        "val": (test_images[:half, 0].numpy(), test_labels[:half].numpy()),
        "test": (test_images[half:, 0].numpy(), test_labels[half:].numpy()),
    }
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    totals = {}
    for split, count in counts.items():
        if count == 0:
            continue
        garments, labels = sources[split]
        coco = build_split(out, split, count, size, seed, garments, labels, objects, min_side,
                           max_side, min_visible)
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        totals[split] = len(coco["annotations"])
        _logger.info("%s: %d images, %d objects", split, count, totals[split])
    params = {"train": train, "val": val, "test": test, "size": size, "seed": seed}
    (out / PARAMS_FILE).write_text(json.dumps(params, indent=1))
    return totals


def ensure_fashion_paste(root: str | Path, generate: Mapping[str, int] | None) -> Path:
    """``root`` when it holds a fashion-paste set; otherwise, with ``generate`` (``make_fashion_paste``'s
    train/val/test/size/seed), build it there first. The build goes to a temporary folder renamed into place, so
    concurrent processes (DDP ranks) never see a half-written set; a set built with other ``generate`` values
    raises rather than being used silently."""
    root = Path(root).expanduser()
    if generate is None:
        if not (root / "annotations").is_dir():
            raise FileNotFoundError(
                f"fashion-paste folder {root} does not exist or holds no annotations/; build it with "
                f"`python -m chanzoo.data.make_fashion_paste --out {root}` or set data.generate"
            )
        return root
    wanted = {k: int(v) for k, v in dict(generate).items()}
    unknown = set(wanted) - {"train", "val", "test", "size", "seed"}
    if unknown:
        raise ValueError(f"data.generate has unknown keys {sorted(unknown)}; allowed: train, val, test, size, seed")
    if (root / PARAMS_FILE).is_file():
        built = json.loads((root / PARAMS_FILE).read_text())
        if any(built.get(k) != v for k, v in wanted.items()):
            raise ValueError(
                f"fashion-paste folder {root} was built with {built}, not data.generate={wanted}; delete it, "
                "point data.root elsewhere or set data.generate to match"
            )
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists but holds no fashion-paste set ({PARAMS_FILE} missing); "
                              "point data.root at an empty or new folder")
    _logger.info("building fashion-paste in %s (once): %s", root, wanted)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        make_fashion_paste(tmp, **wanted)
        if root.exists():
            root.rmdir()  # empty (checked above)
        os.rename(tmp, root)
    except OSError:
        if not (root / PARAMS_FILE).is_file():  # not another process that won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


class FashionPasteDetectionDataModule(COCODetectionDataModule):
    """fashion-paste read as COCO detection / instance segmentation (splits train / val / test), built on first
    use when ``generate`` is given (see ``ensure_fashion_paste``). Other arguments as ``COCODetectionDataModule``."""

    def __init__(self, root: str = "data/fashion_paste", generate: Mapping[str, int] | None = None,
                 **kwargs: Any) -> None:
        layout = {"train_split": "train", "val_split": "val", "test_split": "test", "max_size": None}
        super().__init__(str(ensure_fashion_paste(root, generate)), **{**layout, **kwargs})


class FashionPasteSegmentationDataModule(SegmentationDataModule):
    """fashion-paste read as 11-class semantic segmentation (0 background) from its index PNGs, built on first use
    when ``generate`` is given. Other arguments as ``SegmentationDataModule``."""

    def __init__(self, root: str = "data/fashion_paste", generate: Mapping[str, int] | None = None,
                 **kwargs: Any) -> None:
        layout = {split: {"img_dir": split, "ann_dir": f"masks/{split}"} for split in ("train", "val", "test")}
        layout.update(num_classes=11, class_names=["background", *CLASSES], crop_size=128, eval_resize=False)
        super().__init__(str(ensure_fashion_paste(root, generate)), **{**layout, **kwargs})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=8000, help="training images")
    parser.add_argument("--val", type=int, default=500, help="validation images")
    parser.add_argument("--test", type=int, default=1000, help="test images")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (>= 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fashion-root", default=DEFAULT_ROOT, help="folder of the Fashion-MNIST idx files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        totals = make_fashion_paste(args.out, args.train, args.val, args.test, args.size, args.seed,
                                    args.fashion_root)
    except (ValueError, FileNotFoundError) as err:
        _logger.error("make_fashion_paste: %s", err)
        return 2
    _logger.info("wrote %s (%s objects) in %.1f s", args.out, totals, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
