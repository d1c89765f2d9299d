"""Fashion-MNIST (Xiao et al., 2017) read directly from Debian's ``dataset-fashion-mnist`` idx files."""
from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import TensorDataset

from chanzoo.data.base import ClassificationDataModule

_logger = logging.getLogger(__name__)

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
NATIVE_SIDE = 28
# Mean / std of the 60k training images scaled to [0, 1].
MEAN, STD = 0.2860, 0.3530


def _read_idx(path: Path) -> np.ndarray:
    """Parse one (gzipped) idx file: big-endian magic, dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte data
        raise ValueError(f"{path} is not a uint8 idx file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def load_fashion_mnist(root: str | Path = DEFAULT_ROOT, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) uint8 and labels (N,) int64 of ``split`` ('train': 60k, 'test': 10k)."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    root = Path(root)
    paths = [root / name for name in _FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {missing}. Install Debian's package with "
            "`sudo apt-get install dataset-fashion-mnist` (it puts them in /usr/share/datasets/fashion-mnist), "
            f"or set data.root to a folder holding {list(_FILES[split])}"
        )
    images, labels = (_read_idx(p) for p in paths)
    if len(images) != len(labels):
        raise ValueError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


class FashionMNISTDataModule(ClassificationDataModule):
    """Fashion-MNIST: 55k train / 5k validation (held out from the training set, fixed seed) / 10k test.

    Images stay uint8 in memory; batches are normalised and augmented (random shift by up to ``pad`` pixels and
    horizontal flip) on the device, after transfer, which keeps a 2-core CPU busy with the model, not the loader.
    The augmentation draws from ``augment_generator``, re-seeded every epoch by the training sampler.

    Args:
        root: folder with the four idx ``.gz`` files.
        val_size: training images held out for validation (model selection).
        subset: use only the first ``subset`` training and ``subset // 5`` test images (quick runs, tests).
        pad: maximal random shift in pixels for training batches (0 disables augmentation).
        hflip: random horizontal flips for training batches.
    """

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        val_size: int = 5000,
        subset: Optional[int] = None,
        pad: int = 2,
        hflip: bool = True,
        seed: int = 0,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int | str = "auto",
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, num_classes, in_chans, img_size)
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        if img_size != "auto" and not (isinstance(img_size, int) and img_size >= 1):
            raise ValueError(f"img_size must be 'auto' or a side in pixels >= 1, got {img_size!r}")
        self.root, self.val_size, self.subset, self.pad, self.hflip = root, val_size, subset, pad, hflip
        self.mean, self.std = (MEAN,), (STD,)

    def set_model(self, model: torch.nn.Module) -> None:
        """With ``img_size='auto'``, the smallest side ``model`` takes (28 px, the images' own, when it takes them)."""
        if self.img_size == "auto":
            self.img_size = smallest_input_side(model, NATIVE_SIDE)
            if self.img_size != NATIVE_SIDE:
                _logger.info("Fashion-MNIST images are resized from %d to %d px for %s (data.img_size=auto)",
                             NATIVE_SIDE, self.img_size, type(model).__name__)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_fashion_mnist(self.root, "train")
        test_images, test_labels = load_fashion_mnist(self.root, "test")
        if self.subset is not None:
            if not 0 < self.subset <= len(images):
                raise ValueError(f"subset must be in 1..{len(images)}, got {self.subset}")
            images, labels = images[: self.subset], labels[: self.subset]
            test_images, test_labels = test_images[: max(1, self.subset // 5)], test_labels[: max(1, self.subset // 5)]
        val_size = min(self.val_size, len(images) // 5) if self.subset is not None else self.val_size
        if not 0 < val_size < len(images):
            raise ValueError(f"val_size must be in 1..{len(images) - 1}, got {self.val_size}")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[:val_size], order[val_size:]
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        self.test_set = TensorDataset(test_images, test_labels)
        _logger.info("Fashion-MNIST: %d train, %d val, %d test images", len(train_idx), val_size, len(test_images))

    def on_after_batch_transfer(self, batch: list[torch.Tensor], dataloader_idx: int) -> list[torch.Tensor]:
        images, labels = batch
        images = images.float().div_(255.0)
        if self.trainer is not None and self.trainer.training and (self.pad or self.hflip):
            images = random_shift_flip(images, self.pad, self.hflip, self.augment_generator)
        images = (images - MEAN) / STD
        side = NATIVE_SIDE if self.img_size == "auto" else self.img_size
        if side != NATIVE_SIDE:
            images = torch.nn.functional.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
        return [images, labels]


def smallest_input_side(model: torch.nn.Module, native: int) -> int:
    """The side ``native``-pixel images must be resized to for ``model``: a fixed-size model's own input size
    (a ViT's position table without dynamic sizes), else ``native`` grown to the model's declared minimum and to its
    total stride (so the last stage keeps at least one pixel)."""
    patch_embed = getattr(model, "patch_embed", None)
    fixed = getattr(patch_embed, "img_size", None)
    if fixed is not None and not getattr(patch_embed, "dynamic_img_size", False) and not getattr(
            patch_embed, "dynamic_img_pad", False):
        return int(fixed[0] if isinstance(fixed, (tuple, list)) else fixed)
    side = native
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("min_input_size"):
        side = max(side, int(cfg["min_input_size"][-1]))
    info = getattr(model, "feature_info", None)
    reductions = [int(f["reduction"]) for f in info if "reduction" in f] if isinstance(info, list) else []
    if hasattr(info, "reduction"):
        reductions = list(info.reduction())
    if reductions:
        side = max(side, max(reductions))
    return side


def random_shift_flip(
    images: torch.Tensor, pad: int, hflip: bool, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Per-image random translation by up to ``pad`` pixels (zero fill) and optional horizontal flip, batched.

    Draws come from ``generator`` (a CPU generator; the global one when ``None``) whatever the images' device.
    """
    n, _, h, w = images.shape
    if pad:
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
        batch_idx = torch.arange(n, device=images.device)[:, None, None, None]
        images = padded[batch_idx, torch.arange(images.shape[1], device=images.device)[None, :, None, None], rows, cols]
    if hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images
