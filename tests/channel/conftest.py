"""Feature maps cut from real photos, for testing channel modules on real image statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F


def photo_features(photos: dict[str, np.ndarray], channels: int, size: int, batch: int = 2) -> torch.Tensor:
    """(batch, channels, size, size) from bundled photos: 512x512 RGB -> pixel_unshuffle(32) -> 3072 channels.

    Each photo's 32x32 blocks become channels (so neighbouring channels are neighbouring pixels); the first
    ``channels`` are kept, resized to ``size`` and standardised per channel.
    """
    maps = []
    for image in list(photos.values())[:batch]:
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 255
        x = F.interpolate(x, size=(512, 512), mode="bilinear", align_corners=False)
        x = F.pixel_unshuffle(x, 32)[:, :channels]
        maps.append(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False))
    x = torch.cat(maps)
    return (x - x.mean((0, 2, 3), keepdim=True)) / (x.std((0, 2, 3), keepdim=True) + 1e-5)


@pytest.fixture(scope="session")
def features(photos: dict[str, np.ndarray]):
    """``features(channels, size, batch=2)``: real-photo feature maps (see ``photo_features``)."""
    return lambda channels, size, batch=2: photo_features(photos, channels, size, batch)
