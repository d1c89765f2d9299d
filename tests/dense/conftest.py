"""Dense-prediction fixtures from a real photo: scikit-image's coins, with each coin's exact mask and box.

Coins are segmented by Otsu's threshold (regions touching each other in the top band are dropped); a coin of more
than 170 pixels at 96x128 is class 2 ('large'), else class 1 ('small'). Batches follow the datamodule interface of
chanzoo's detection and segmentation datamodules.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

SIZE = (96, 128)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def coins_annotations(flip: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(image 3xHxW in [0, 1], detection target, semantic mask HxW with 255 on coin borders) of the coins photo."""
    from skimage import data, filters, measure, morphology, segmentation, transform

    gray = transform.resize(data.coins(), SIZE, anti_aliasing=True)
    if flip:
        gray = gray[:, ::-1].copy()
    labels = measure.label(morphology.closing(gray > filters.threshold_otsu(gray), morphology.disk(1)))
    boxes, classes, masks = [], [], []
    semantic = np.zeros(SIZE, dtype=np.int64)
    for region in measure.regionprops(labels):
        if not 100 <= region.area <= 600:  # specks and the merged band at the top
            continue
        r0, c0, r1, c1 = region.bbox
        boxes.append([c0, r0, c1, r1])
        classes.append(2 if region.area > 170 else 1)
        masks.append(labels == region.label)
        semantic[labels == region.label] = classes[-1]
    semantic[segmentation.find_boundaries(labels, mode="inner")] = 255
    image = torch.from_numpy(np.repeat(gray[None], 3, axis=0)).float()
    mask_tensor = torch.from_numpy(np.stack(masks)).to(torch.uint8)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(classes, dtype=torch.int64),
        "masks": mask_tensor,
        "image_id": torch.tensor(int(flip)),
        "area": mask_tensor.flatten(1).sum(1).float(),
        "iscrowd": torch.zeros(len(boxes), dtype=torch.int64),
    }
    return image, target, torch.from_numpy(semantic)


@pytest.fixture(scope="session")
def coins() -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    return coins_annotations()


def normalize(image: torch.Tensor) -> torch.Tensor:
    return (image - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


class CoinsDetection(L.LightningDataModule):
    """The coins photo and its mirror image, as a detection datamodule (same images for train, val and test)."""

    num_classes, class_names, in_chans, task_type = 2, ["small", "large"], 3, "detection"

    def __init__(self, with_masks: bool = False, batch_size: int = 2) -> None:
        super().__init__()
        self.with_masks, self.batch_size = with_masks, batch_size
        self.samples = [coins_annotations(flip)[:2] for flip in (False, True)]

    def _loader(self) -> DataLoader:
        return DataLoader(self.samples, batch_size=self.batch_size, collate_fn=lambda b: tuple(map(list, zip(*b))))

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


class CoinsSegmentation(L.LightningDataModule):
    """The coins photo and its mirror image as a segmentation datamodule (background, small coin, large coin)."""

    num_classes, class_names, ignore_index = 3, ["background", "small", "large"], 255
    in_chans, task_type = 3, "segmentation"
    mean, std = MEAN, STD

    def __init__(self, batch_size: int = 2) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.samples: list[Any] = []
        for flip in (False, True):
            image, _, semantic = coins_annotations(flip)
            self.samples.append((normalize(image), semantic))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.samples, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.samples, batch_size=1)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.samples, batch_size=1)


@pytest.fixture
def detection_data() -> type[CoinsDetection]:
    return CoinsDetection


@pytest.fixture
def segmentation_data() -> type[CoinsSegmentation]:
    return CoinsSegmentation
