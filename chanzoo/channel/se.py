"""Squeeze-and-Excitation (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018)."""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers import get_act_layer
from torch import nn

from chanzoo.channel.gating import pooled_channel_gate
from chanzoo.channel.registry import register_channel_module


@register_channel_module("se")
class SqueezeExcite(nn.Module):
    """SE block: ``x * gate(W2 act(W1 avgpool(x)))``.

    Args:
        channels: input channels C.
        reduction: C / hidden width (the paper's r, 16 by default).
        rd_ratio: hidden width as a fraction of C; overrides ``reduction`` (timm's slot passes it).
        rd_channels: explicit hidden width; overrides both.
        act_layer: activation between the two FC layers (name or class).
        gate_layer: gating function (name or class), sigmoid in the paper.
        inplace: scale ``x`` in place when no gradient is needed (set by native slots whose block does not read
            the input again).
    """

    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        rd_ratio: Optional[float] = None,
        rd_channels: Optional[int] = None,
        act_layer: str | type[nn.Module] = "relu",
        gate_layer: str | type[nn.Module] = "sigmoid",
        inplace: bool = False,
    ) -> None:
        super().__init__()
        if rd_channels is None:
            ratio = rd_ratio if rd_ratio is not None else 1.0 / reduction
            rd_channels = max(1, int(round(channels * ratio)))
        if rd_channels <= 0:
            raise ValueError(f"SE hidden width must be positive, got rd_channels={rd_channels}")
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.act = get_act_layer(act_layer)(inplace=True) if isinstance(act_layer, str) else act_layer()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)
        self.gate = get_act_layer(gate_layer)() if isinstance(gate_layer, str) else gate_layer()
        self.inplace = inplace

    def channel_gate(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C) pooled features -> (B, C) gate."""
        return self.gate(self.fc2(self.act(self.fc1(pooled[:, :, None, None])))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_channel_gate(x, self.channel_gate, list(self.parameters()), self.inplace)
