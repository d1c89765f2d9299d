"""ImageNet-layout folders (``root/train/<class>/*``, ``root/val/<class>/*``) and WebDataset shards via timm."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from PIL import Image
from timm.data import ImageDataset, create_dataset, create_transform, resolve_data_config
from timm.data.readers.reader_image_folder import find_images_and_targets
from torch import nn

from chanzoo.data.base import ClassificationDataModule, verify_images

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class StrictImageDataset(ImageDataset):
    """timm's ``ImageDataset`` that raises on an unreadable image, naming the file, instead of skipping it."""

    def __getitem__(self, index: int) -> tuple[Any, int]:
        source, target = self.reader[index][:2]
        try:
            img = Image.open(source)
            img = img.convert(self.input_img_mode) if self.input_img_mode else img
        except (OSError, ValueError) as err:
            name = self.reader.filename(index, absolute=True)
            raise ValueError(f"corrupt or unreadable image file {name}: {err}") from None
        if self.transform is not None:
            img = self.transform(img)
        return img, (-1 if target is None else target)


def check_image_folder(split_dir: Path) -> list[str]:
    """Validate ``split_dir/<class>/*`` and return the class names; every failure names the folder at fault."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"data folder {split_dir} does not exist (expected the layout <root>/<split>/<class>/*)")
    class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not class_dirs:
        raise ValueError(f"data folder {split_dir} is empty: expected one sub-folder of images per class")
    for class_dir in class_dirs:
        if not any(f.suffix.lower() in IMG_EXTENSIONS for f in class_dir.rglob("*") if f.is_file()):
            raise ValueError(
                f"class folder {class_dir} holds no images (allowed extensions: {', '.join(IMG_EXTENSIONS)})"
            )
    return [p.name for p in class_dirs]


class ImageFolderDataModule(ClassificationDataModule):
    """Image classification from folders or WebDataset shards, with timm's training and evaluation transforms.

    ``mean``/``std``/``crop_pct``/``interpolation`` left at ``None`` come from the model's pretrained cfg
    (``timm.data.resolve_data_config``), which chanzoo's ``run`` hands over through ``set_model``; without a model,
    timm's ImageNet defaults.

    Args:
        root: data root. Folders: ``root/<train_split>/<class>/*``. WebDataset: ``root`` holds the shards and
            ``dataset='wds/<name>'`` (timm's reader) with ``train_split='train'`` naming the ``_info`` split.
        dataset: timm dataset name, '' for folders, 'wds/...' for WebDataset shards.
        auto_augment: timm RandAugment/AutoAugment string, e.g. 'rand-m9-mstd0.5-inc1'; None for none.
        re_prob: random-erasing probability.
        scale/ratio: RandomResizedCrop ranges.
        num_classes: ``None`` counts the class folders of ``train_split``; a number that differs from that count is
            a ``ValueError``.
        verify: decode every image of each split at setup (progress bar), so a corrupt file is named before
            training instead of when the loader reaches it.
    """

    def __init__(
        self,
        root: str,
        dataset: str = "",
        train_split: str = "train",
        val_split: str = "val",
        test_split: Optional[str] = None,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 4,
        img_size: int = 224,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        crop_pct: Optional[float] = None,
        interpolation: Optional[str] = None,
        auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        re_mode: str = "pixel",
        hflip: float = 0.5,
        color_jitter: Optional[float] = 0.4,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        seed: int = 0,
        num_classes: Optional[int] = None,
        in_chans: int = 3,
        verify: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, num_classes or 0, in_chans, img_size)
        self.verify = verify
        if root is None or str(root) in ("", "???"):
            raise ValueError("data.root must name the data folder (e.g. data.root=/data/imagenet)")
        self.root, self.dataset = Path(root), dataset
        self.splits = {"fit": train_split, "validate": val_split, "test": test_split or val_split}
        self.aug = dict(
            auto_augment=auto_augment, re_prob=re_prob, re_mode=re_mode, hflip=hflip, color_jitter=color_jitter,
            scale=tuple(scale), ratio=tuple(ratio),
        )
        self.data_cfg = dict(mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation)
        self.model_data_cfg: dict[str, Any] = {}
        self.classes: list[str] = []
        if not dataset:
            found = len(check_image_folder(self.root / train_split))
            if num_classes is not None and num_classes != found:
                raise ValueError(
                    f"data.num_classes={num_classes} but {self.root / train_split} has {found} class folders; "
                    "leave data.num_classes unset (null) to count them"
                )
            self.num_classes = found

    def set_model(self, model: nn.Module) -> None:
        """Take mean/std/crop/interpolation from the model's pretrained cfg where the config leaves them open."""
        self.model_data_cfg = resolve_data_config(model=model)

    def _resolved_cfg(self) -> dict[str, Any]:
        # timm's ImageNet defaults, then the model's pretrained cfg, then what the data config sets
        cfg = {**resolve_data_config(args={"img_size": self.img_size}), **self.model_data_cfg}
        cfg.update({k: v for k, v in self.data_cfg.items() if v is not None})
        cfg["input_size"] = (self.in_chans, self.img_size, self.img_size)
        return cfg

    def _make(self, split: str, training: bool):
        cfg = self._resolved_cfg()
        transform = create_transform(
            cfg["input_size"], is_training=training, mean=cfg["mean"], std=cfg["std"],
            crop_pct=cfg.get("crop_pct"), interpolation=cfg.get("interpolation", "bicubic"),
            **(self.aug if training else {}),
        )
        if self.dataset:
            return create_dataset(
                self.dataset, root=str(self.root), split=split, is_training=training, batch_size=self.batch_size,
                seed=self.seed, transform=transform,
            )
        self.classes = check_image_folder(self.root / split)
        _, class_to_idx = find_images_and_targets(str(self.root / self.splits["fit"]), types=IMG_EXTENSIONS)
        dataset = StrictImageDataset(str(self.root / split), class_map=class_to_idx, transform=transform)
        if self.verify:
            verify_images((dataset.filename(i, absolute=True) for i in range(len(dataset))), f"verifying {split}")
        return dataset

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._make(self.splits["fit"], training=True)
            _logger.info("training set: %d images from %s", len(self.train_set), self.root / self.splits["fit"])
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._make(self.splits["validate"], training=False)
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self._make(self.splits["test"], training=False)
