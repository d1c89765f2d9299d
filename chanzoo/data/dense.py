"""Shared pieces of the dense-prediction datamodules: loaders, collate, joint transforms, index-PNG segmentation.

Detection batches are ``(images, targets)``: a list of float ``3xHxW`` tensors in [0, 1] (neither normalised nor
resized: torchvision's detection models do both in their ``GeneralizedRCNNTransform``) and a list of dicts with
``boxes`` (float32 ``[N, 4]`` xyxy in pixels), ``labels`` (int64 ``[N]`` in ``1..num_classes``, 0 is background),
``image_id``, ``area``, ``iscrowd`` and, when masks are asked for, ``masks`` (uint8 ``[N, H, W]``).

Segmentation batches are ``(images, masks)``: float ``[B, 3, H, W]`` normalised with ``mean``/``std`` and int64
``[B, H, W]`` class indices with ``ignore_index`` (255) where no label applies.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from chanzoo.data.base import loader_sampler

_logger = logging.getLogger(__name__)

IGNORE_INDEX = 255


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[list, list]:
    """Keep images and targets as lists: detection images differ in size and targets in object count."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def check_root(root: str | None, example: str) -> Path:
    """``root`` as a Path; a missing value or folder raises naming what was given and the expected layout."""
    if root is None or str(root) in ("", "???"):
        raise ValueError(f"data.root must name the data folder (e.g. data.root={example})")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data.root={root} is not a folder (expected e.g. {example})")
    return path


def open_rgb(path: Path) -> Image.Image:
    """Open ``path`` as RGB; a missing or unreadable file raises naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"corrupt or unreadable image file {path}: {err}") from err


def detection_transform(train: bool, hflip: float = 0.5, train_scales: Sequence[int] | None = None,
                        max_size: int | None = None) -> v2.Compose:
    """Joint image/box/mask transform: training flips (and, with ``train_scales``, resizes the shorter side to a
    random one of them, the longer capped at ``max_size``); evaluation keeps the image as it is."""
    steps: list[Callable] = []
    if train:
        if train_scales:
            steps.append(v2.RandomShortestSize(min_size=list(train_scales), max_size=max_size))
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(p=hflip))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


class DetectionDataset(Dataset):
    """Images and validated box/mask annotations, from any source that lists them as records.

    Each record holds ``file`` (Path), ``image_id`` (int), ``height``/``width``, ``boxes`` (float32 ``[N, 4]`` xyxy),
    ``labels`` (int64), ``area`` (float32) and ``iscrowd`` (int64). With ``mask_decoder`` (a module-level function,
    so that the dataset pickles for spawned loader workers), ``mask_decoder(record)`` gives the uint8 ``[N, H, W]``
    instance masks, decoded when the image is loaded.
    """

    def __init__(self, records: list[dict[str, Any]], transform: Callable,
                 mask_decoder: Callable[[dict[str, Any]], np.ndarray] | None = None) -> None:
        self.records, self.transform, self.mask_decoder = records, transform, mask_decoder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rec = self.records[index]
        img = open_rgb(rec["file"])
        if (img.height, img.width) != (rec["height"], rec["width"]):
            raise ValueError(
                f"image file {rec['file']} is {img.width}x{img.height} but its annotation says "
                f"{rec['width']}x{rec['height']} (image_id {rec['image_id']})"
            )
        size = (rec["height"], rec["width"])
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(torch.as_tensor(rec["boxes"], dtype=torch.float32).reshape(-1, 4),
                                              format="XYXY", canvas_size=size),
            "labels": torch.as_tensor(rec["labels"], dtype=torch.int64),
            "image_id": torch.tensor(rec["image_id"], dtype=torch.int64),
            "area": torch.as_tensor(rec["area"], dtype=torch.float32),
            "iscrowd": torch.as_tensor(rec["iscrowd"], dtype=torch.int64),
        }
        if self.mask_decoder is not None:
            target["masks"] = tv_tensors.Mask(torch.from_numpy(self.mask_decoder(rec)))
        image, target = self.transform(tv_tensors.Image(F.pil_to_tensor(img)), target)
        target = {k: v.as_subclass(torch.Tensor) for k, v in target.items()}
        return image.as_subclass(torch.Tensor), target


class RandomRescale(v2.Transform):
    """mmseg's ``Resize(scale, ratio_range, keep_ratio=True)``: draw a ratio r from ``ratio_range`` and rescale so
    that the image fits in ``scale * r`` (longer side <= ``scale[0] * r``, shorter side <= ``scale[1] * r``),
    keeping its aspect ratio. Masks are resized with nearest-neighbour (torchvision does this for ``Mask``)."""

    def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float]) -> None:
        super().__init__()
        self.scale, self.ratio_range = scale, ratio_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        ratio = float(torch.empty(()).uniform_(*self.ratio_range))
        factor = min(self.scale[0] * ratio / max(height, width), self.scale[1] * ratio / min(height, width))
        return {"size": (max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5)))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


def segmentation_transform(train: bool, crop_size: int, ratio_range: Sequence[float], hflip: float,
                           mean: Sequence[float], std: Sequence[float], eval_resize: bool) -> v2.Compose:
    """Training: random rescale (base scale ``(4 * crop_size, crop_size)``, the mmseg 2048x512 for 512 crops),
    random ``crop_size`` crop padded with 0 (image) / 255 (mask), flip. Evaluation: the whole image, rescaled to fit
    in ``(4 * crop_size, crop_size)`` when ``eval_resize`` (the mask is never resized: metrics use original labels)."""
    steps: list[Callable] = []
    if train:
        steps += [
            RandomRescale((4 * crop_size, crop_size), (float(ratio_range[0]), float(ratio_range[1]))),
            v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        ]
        if hflip > 0:
            steps.append(v2.RandomHorizontalFlip(p=hflip))
    elif eval_resize:
        steps.append(RandomRescale((4 * crop_size, crop_size), (1.0, 1.0)))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def read_index_png(path: Path) -> np.ndarray:
    """A single-channel (palette or grey) label PNG as a uint8 array; anything else raises naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"label file {path} does not exist")
    with Image.open(path) as lbl:
        if lbl.mode not in ("P", "L"):
            raise ValueError(f"label file {path} has mode {lbl.mode}: expected a single-channel index PNG (P or L)")
        return np.array(lbl)


class SegmentationDataset(Dataset):
    """Image / index-PNG pairs. Labels are checked at load time: values in ``0..num_classes-1`` or 255 only.

    With ``reduce_zero_label`` (ADE20K), label 0 ("other") becomes 255 and the others move down by one, as mmseg
    does. At evaluation with ``resize_mask=False`` the mask keeps the file's size while the image may be rescaled.
    """

    def __init__(self, pairs: list[tuple[Path, Path]], num_classes: int, reduce_zero_label: bool,
                 transform: Callable, resize_mask: bool) -> None:
        self.pairs, self.num_classes, self.reduce_zero_label = pairs, num_classes, reduce_zero_label
        self.transform, self.resize_mask = transform, resize_mask

    def __len__(self) -> int:
        return len(self.pairs)

    def load_mask(self, path: Path) -> np.ndarray:
        """The label map of ``path`` in training classes (after reduce-zero-label), validated."""
        mask = read_index_png(path)
        if self.reduce_zero_label:
            mask = np.where(mask == 0, IGNORE_INDEX, mask - 1).astype(np.uint8)
            mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX
        bad = np.unique(mask[(mask >= self.num_classes) & (mask != IGNORE_INDEX)])
        if bad.size:
            shown = [int(v) + int(self.reduce_zero_label) for v in bad[:10]]
            raise ValueError(
                f"label file {path} holds values {shown} beyond the {self.num_classes} classes "
                f"(allowed: 0..{self.num_classes - 1 + int(self.reduce_zero_label)} and {IGNORE_INDEX} = ignore"
                f"{', with label 0 = ignore (reduce_zero_label)' if self.reduce_zero_label else ''})"
            )
        return mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img_path, mask_path = self.pairs[index]
        img = open_rgb(img_path)
        mask = self.load_mask(mask_path)
        if mask.shape != (img.height, img.width):
            raise ValueError(
                f"label file {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {img_path} is "
                f"{img.width}x{img.height}"
            )
        image = tv_tensors.Image(F.pil_to_tensor(img))
        mask_t = torch.from_numpy(mask)
        if self.resize_mask:
            image, mask_t = self.transform(image, tv_tensors.Mask(mask_t))
        else:
            image = self.transform(image)
        return image.as_subclass(torch.Tensor), mask_t.as_subclass(torch.Tensor).long()


def read_split_file(path: Path) -> list[str]:
    """Names listed one per line in an ImageSets-style file (missing file raises naming it)."""
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"split file {path} lists no images")
    return names


def image_label_pairs(img_dir: Path, ann_dir: Path, img_suffix: str, ann_suffix: str,
                      split_file: Path | None = None) -> list[tuple[Path, Path]]:
    """Pair ``img_dir/<name><img_suffix>`` with ``ann_dir/<name><ann_suffix>``, names from ``split_file`` or the
    label folder; a missing folder, image or label file raises naming it."""
    for folder in (img_dir, ann_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"data folder {folder} does not exist")
    if split_file is not None:
        names = read_split_file(split_file)
    else:
        names = sorted(p.name[: -len(ann_suffix)] for p in ann_dir.iterdir() if p.name.endswith(ann_suffix))
        if not names:
            raise ValueError(f"label folder {ann_dir} holds no {ann_suffix} files")
    img_names, ann_names = {p.name for p in img_dir.iterdir()}, {p.name for p in ann_dir.iterdir()}
    for name in names:
        if name + img_suffix not in img_names:
            raise FileNotFoundError(f"image file {img_dir / (name + img_suffix)} does not exist (listed for {name})")
        if name + ann_suffix not in ann_names:
            raise FileNotFoundError(f"label file {ann_dir / (name + ann_suffix)} does not exist (listed for {name})")
    return [(img_dir / (n + img_suffix), ann_dir / (n + ann_suffix)) for n in names]


class DenseDataModule(L.LightningDataModule):
    """Loader plumbing shared by the detection and segmentation datamodules.

    Subclasses set ``num_classes``/``class_names`` and implement ``make_dataset(stage, train)``. The training loader
    shuffles with chanzoo's ``EpochSampler`` (per-epoch seeds, DDP-aware); evaluation loaders keep the file order
    and, under DDP, count each image once.
    """

    task_type: str = ""

    def __init__(self, batch_size: int, eval_batch_size: int | None, num_workers: int, seed: int,
                 subset: int | None, in_chans: int = 3) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size <= 0:
            raise ValueError(f"eval_batch_size must be positive or null, got {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if subset is not None and subset <= 0:
            raise ValueError(f"subset must be a positive number of images or null, got {subset}")
        if in_chans != 3:
            raise ValueError(f"in_chans must be 3 for RGB dense-prediction data, got {in_chans}")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed, self.subset, self.in_chans = num_workers, seed, subset, in_chans
        self.num_classes = 0
        self.class_names: list[str] = []
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.loader_generator = torch.Generator()

    collate_fn: Callable | None = None  # None: torch's default (stacks equal-size tensors)

    def take_subset(self, items: list) -> list:
        """The first ``subset`` items (all when ``subset`` is null)."""
        return items if self.subset is None else items[: self.subset]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self.make_dataset("fit", train=True)
            _logger.info("%s: %d training images", type(self).__name__, len(self.train_set))
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self.make_dataset("validate", train=False)
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self.make_dataset("test", train=False)

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its loaders are requested")
        sampler = loader_sampler(dataset, train, self.trainer, self.seed, (self.loader_generator,))
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
            generator=self.loader_generator if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


class SegmentationDataModule(DenseDataModule):
    """Semantic segmentation from image / index-PNG folders (mmseg's custom-dataset layout).

    Each split is a mapping with ``img_dir`` and ``ann_dir`` (relative to ``root``) and optionally ``split_file``
    (names one per line). Training: random rescale (ratio ``ratio_range`` of a ``4*crop_size x crop_size`` base),
    random ``crop_size`` crop (image padded with 0, mask with 255), horizontal flip. Evaluation: whole images,
    ``eval_batch_size`` 1 by default; with ``eval_resize`` the image is rescaled to fit ``4*crop_size x crop_size``
    (mmseg's test pipeline) while the mask keeps its original size, so predictions must be resized to the mask.
    Unlike mmseg's recipes, there is no photometric distortion and the crop does not re-draw crops dominated by one
    class (``cat_max_ratio``).

    Args:
        root: data folder.
        train/val/test: split mappings (``test`` null: the val split).
        num_classes: classes including background, e.g. 21 for VOC, 150 for ADE20K (after reduce_zero_label).
        class_names: one name per class.
        reduce_zero_label: label 0 is "other" (ignored) and the rest shift down by one (ADE20K).
        crop_size: training crop side (512 in the VOC/ADE20K protocols).
        mean/std: normalisation (ImageNet by default).
    """

    task_type = "segmentation"

    def __init__(
        self,
        root: str,
        train: dict[str, Any],
        val: dict[str, Any],
        test: dict[str, Any] | None = None,
        num_classes: int = 21,
        class_names: Sequence[str] | None = None,
        reduce_zero_label: bool = False,
        img_suffix: str = ".jpg",
        ann_suffix: str = ".png",
        crop_size: int = 512,
        ratio_range: Sequence[float] = (0.5, 2.0),
        hflip: float = 0.5,
        eval_resize: bool = True,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        batch_size: int = 16,
        eval_batch_size: int | None = 1,
        num_workers: int = 4,
        subset: int | None = None,
        seed: int = 0,
        in_chans: int = 3,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, subset, in_chans)
        self.root = check_root(root, "/data/ADEChallengeData2016")
        if num_classes < 2 or num_classes > IGNORE_INDEX:
            raise ValueError(f"num_classes must be in 2..{IGNORE_INDEX}, got {num_classes}")
        if ignore_index != IGNORE_INDEX:
            raise ValueError(f"ignore_index must be {IGNORE_INDEX} (the value label files use), got {ignore_index}")
        if crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip must be a probability in [0, 1], got {hflip}")
        if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be [low, high] with 0 < low <= high, got {list(ratio_range)}")
        names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"class_names has {len(names)} names but num_classes={num_classes}")
        self.num_classes, self.class_names, self.ignore_index = num_classes, names, ignore_index
        self.splits: dict[str, dict[str, Any]] = {}
        for stage, key, split in (("fit", "train", train), ("validate", "val", val), ("test", "test", test or val)):
            if not isinstance(split, Mapping) or "img_dir" not in split or "ann_dir" not in split:
                raise ValueError(f"the {key} split must be a mapping with img_dir and ann_dir, got {split!r}")
            self.splits[stage] = dict(split)
        self.reduce_zero_label, self.img_suffix, self.ann_suffix = reduce_zero_label, img_suffix, ann_suffix
        self.crop_size, self.ratio_range, self.hflip, self.eval_resize = crop_size, tuple(ratio_range), hflip, eval_resize
        self.mean, self.std = tuple(mean), tuple(std)

    def split_pairs(self, stage: str) -> list[tuple[Path, Path]]:
        """(image, label) file pairs of ``stage``."""
        split = self.splits[stage]
        split_file = split.get("split_file")
        return image_label_pairs(
            self.root / split["img_dir"], self.root / split["ann_dir"], self.img_suffix, self.ann_suffix,
            self.root / split_file if split_file else None,
        )

    def make_dataset(self, stage: str, train: bool) -> SegmentationDataset:
        transform = segmentation_transform(train, self.crop_size, self.ratio_range, self.hflip, self.mean, self.std,
                                           self.eval_resize)
        return SegmentationDataset(self.take_subset(self.split_pairs(stage)), self.num_classes,
                                   self.reduce_zero_label, transform, resize_mask=train)
