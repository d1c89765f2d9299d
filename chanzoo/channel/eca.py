"""Efficient Channel Attention (Wang et al., "ECA-Net: Efficient Channel Attention for Deep CNNs", CVPR 2020)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from chanzoo.channel.gating import pooled_channel_gate
from chanzoo.channel.registry import register_channel_module


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """The paper's adaptive kernel size ``k = |log2(C)/gamma + beta/gamma|`` rounded down to the nearest odd."""
    t = int(abs((math.log2(channels) + beta) / gamma))
    return t if t % 2 else t + 1


@register_channel_module("eca")
class EfficientChannelAttention(nn.Module):
    """ECA: global average pool, a 1-D conv of size k across channels (no bias), sigmoid gate.

    Args:
        channels: input channels C (sets the adaptive kernel size).
        kernel_size: fixed odd kernel size; ``None`` uses the adaptive rule with ``gamma`` and ``beta``.
        inplace: scale ``x`` in place when no gradient is needed (set by native slots whose block does not read
            the input again).
    """

    def __init__(self, channels: int, kernel_size: Optional[int] = None, gamma: float = 2, beta: float = 1,
                 inplace: bool = False) -> None:
        super().__init__()
        if kernel_size is None:
            kernel_size = eca_kernel_size(channels, gamma, beta)
        if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"ECA kernel_size must be a positive odd int, got {kernel_size!r} (one kernel per stage is a list "
                "given to create_model's attn_kwargs)"
            )
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.inplace = inplace

    def channel_gate(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C) pooled features -> (B, C) gate: a 1-D conv across the channel axis."""
        return torch.sigmoid(F.conv1d(pooled[:, None], self.conv.weight, padding=self.kernel_size // 2))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_channel_gate(x, self.channel_gate, [self.conv.weight], self.inplace)
