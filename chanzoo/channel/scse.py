"""Spatial and channel squeeze & excitation (Roy et al., "Recalibrating Fully Convolutional Networks with Spatial
and Channel 'Squeeze & Excitation' Blocks", IEEE TMI 2019; first as "Concurrent Spatial and Channel Squeeze &
Excitation in Fully Convolutional Networks", MICCAI 2018).

Parameter names follow the authors' release (ai-med/squeeze_and_excitation): ``fc1``/``fc2`` (Linear) in cSE,
``conv`` in sSE, ``cSE``/``sSE`` in scSE, so its state dicts load.
"""
from __future__ import annotations

import torch
from torch import nn

from chanzoo.channel.gating import pooled_channel_gate
from chanzoo.channel.registry import register_channel_module

SCSE_AGGREGATIONS = ("max", "add", "mul")


@register_channel_module("cse")
class ChannelSqueezeExcite(nn.Module):
    """cSE: ``x * sigmoid(W2 relu(W1 avgpool(x)))`` with a hidden width of ``C // reduction`` (2 in the paper).

    Args:
        channels: input channels C (>= reduction).
        reduction: C / hidden width.
        inplace: scale ``x`` in place when no gradient is needed (set by native slots whose block does not read
            the input again).
    """

    def __init__(self, channels: int, reduction: int = 2, inplace: bool = False) -> None:
        super().__init__()
        if not isinstance(reduction, int) or reduction < 1 or channels // reduction < 1:
            raise ValueError(f"cSE needs channels >= reduction >= 1, got channels={channels}, reduction={reduction!r}")
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)
        self.inplace = inplace

    def channel_gate(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C) pooled features -> (B, C) gate."""
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(pooled))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_channel_gate(x, self.channel_gate, list(self.parameters()), self.inplace)


@register_channel_module("sse")
class SpatialSqueezeExcite(nn.Module):
    """sSE: ``x * sigmoid(conv1x1(x))``, one gate per pixel from a C -> 1 convolution (with bias)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(x))


@register_channel_module("scse")
class SpatialChannelSqueezeExcite(nn.Module):
    """scSE: cSE and sSE on the same input, combined by ``aggregation``.

    The TMI paper compares max-out, addition, multiplication and concatenation and finds max-out best; it is the
    default here and in the authors' release. Concatenation doubles the channels, so it is not offered.

    Args:
        channels: input channels C.
        reduction: cSE's C / hidden width.
        aggregation: 'max', 'add' or 'mul'.
    """

    def __init__(self, channels: int, reduction: int = 2, aggregation: str = "max") -> None:
        super().__init__()
        if aggregation not in SCSE_AGGREGATIONS:
            raise ValueError(f"scSE aggregation must be one of {SCSE_AGGREGATIONS}, got {aggregation!r}")
        self.aggregation = aggregation
        self.cSE = ChannelSqueezeExcite(channels, reduction)
        self.sSE = SpatialSqueezeExcite(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel, spatial = self.cSE(x), self.sSE(x)
        if self.aggregation == "max":
            return torch.maximum(channel, spatial)
        if self.aggregation == "add":
            return channel + spatial
        return channel * spatial
