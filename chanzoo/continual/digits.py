"""scikit-learn's handwritten digits as a classification datamodule (offline, 1,797 images): a quick real sequence."""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from chanzoo.data.base import ClassificationDataModule

_logger = logging.getLogger(__name__)


class DigitsDataModule(ClassificationDataModule):
    """The UCI handwritten digits bundled with scikit-learn (8x8 grey, 10 classes), resized to ``img_size``.

    The split into train / val / test is stratified by class and fixed by ``seed``. Images are standardised with
    the training set's mean and std; there is no augmentation.

    Args:
        img_size: side the 8x8 images are resized to (bilinear).
        val_fraction, test_fraction: shares of the 1,797 images held out for validation and test.
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        img_size: int = 32,
        val_fraction: float = 0.15,
        test_fraction: float = 0.3,
        seed: int = 0,
        num_classes: int = 10,
        in_chans: int = 1,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, num_classes, in_chans, img_size)
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction and test_fraction must be in (0, 1) with a sum below 1, got {val_fraction}, "
                f"{test_fraction}"
            )
        if img_size < 8:
            raise ValueError(f"img_size must be >= 8 (the images are 8x8), got {img_size}")
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_digits(return_X_y=True)
        x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        x = x.expand(-1, self.in_chans, -1, -1).contiguous()
        y = torch.tensor(labels, dtype=torch.long)
        index = torch.arange(len(y))
        rest, test = train_test_split(index, test_size=self.test_fraction, stratify=y, random_state=self.seed)
        val_share = self.val_fraction / (1 - self.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, stratify=y[rest], random_state=self.seed)
        mean, std = x[train].mean(), x[train].std()
        x = (x - mean) / std
        self.train_set, self.val_set, self.test_set = (TensorDataset(x[i], y[i]) for i in (train, val, test))
        _logger.info("digits: %d train, %d val, %d test images at %dpx", len(train), len(val), len(test), self.img_size)
