"""Hierarchical Channel Sampling (HCS), Bao et al., "Channel Vision Transformers: An Image Is Worth C x 16 x 16
Words" (ICLR 2024), Sec. 3.2.

HCS simulates missing channels during training in two steps per batch: draw the number of channels ``k``
uniformly from ``1..C``, then draw a ``k``-subset of the ``C`` channels uniformly among all ``k``-subsets. Unlike
channel dropout (each channel dropped independently, so the number kept is binomial and rarely 1 or C), every
subset *size* is equally likely.

* ``sample_channel_subset`` draws the indices; ChannelViT keeps only those channels' tokens
  (``chanzoo.models.channelvit``).
* ``ChannelSampling`` is the plain-ViT form of the paper (any model with a fixed input width): the channels not
  drawn are set to zero and the image is multiplied by ``C / k`` so that its expected sum is unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["ChannelSampling", "sample_channel_subset", "drop_channels"]


def sample_channel_subset(
    num_channels: int, generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Indices (sorted, int64) of a hierarchically sampled channel subset: k ~ U{1..C}, then a uniform k-subset."""
    if not isinstance(num_channels, int) or isinstance(num_channels, bool) or num_channels < 1:
        raise ValueError(f"num_channels must be an int >= 1, got {num_channels!r}")
    k = int(torch.randint(1, num_channels + 1, (1,), generator=generator))
    subset = torch.randperm(num_channels, generator=generator)[:k]
    return subset.sort().values.to(device)


def drop_channels(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero every channel of ``x`` (B, C, H, W) not in ``keep`` and rescale by C / len(keep) (plain-ViT HCS)."""
    if x.ndim != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    num_channels = x.shape[1]
    keep = torch.as_tensor(keep, dtype=torch.long, device=x.device)
    if keep.ndim != 1 or keep.numel() == 0 or int(keep.min()) < 0 or int(keep.max()) >= num_channels:
        raise ValueError(
            f"keep must be a non-empty list of channel indices in 0..{num_channels - 1}, got {keep.tolist()}"
        )
    mask = torch.zeros(num_channels, dtype=x.dtype, device=x.device)
    mask[keep] = num_channels / keep.unique().numel()
    return x * mask.view(1, -1, 1, 1)


class ChannelSampling(nn.Module):
    """Plain-ViT HCS as a module: in training, keep a hierarchically sampled subset of channels (others zeroed,
    the rest scaled by C / k); in eval mode the input passes unchanged. Put it in front of any model or apply it to
    batches (``chanzoo.data.MultiChannelDataModule(channel_sampling=True)`` does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return drop_channels(x, sample_channel_subset(x.shape[1], device=x.device))
