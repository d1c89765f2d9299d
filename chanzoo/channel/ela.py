"""Efficient Local Attention (Xu & Wan, "ELA: Efficient Local Attention for Deep Convolutional Neural Networks",
arXiv:2403.01123, 2024)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chanzoo.channel.gating import strip_channel_gate
from chanzoo.channel.registry import register_channel_module

# The paper's variants: (kernel size, input channels per conv group (None: depthwise), GroupNorm groups).
ELA_VARIANTS: dict[str, tuple[int, int | None, int]] = {
    "T": (5, None, 32),
    "B": (7, None, 16),
    "S": (5, 8, 16),
    "L": (7, 8, 16),
}


@register_channel_module("ela_t", variant="T")
@register_channel_module("ela_b", variant="B")
@register_channel_module("ela_s", variant="S")
@register_channel_module("ela_l", variant="L")
class EfficientLocalAttention(nn.Module):
    """ELA: ``y = x * sigmoid(GN(conv1d(mean_W x))) * sigmoid(GN(conv1d(mean_H x)))``.

    Both strips (the average over W, one value per row, and over H, one per column) go through the *same* Conv1d
    (no bias) and GroupNorm. The paper's variants T/B/S/L use kernel 5/7/5/7, a depthwise conv for T and B and
    C//8 groups (8 input channels each) for S and L, and GroupNorm with 32/16/16/16 groups. Parameter names follow
    the paper's listing (``con1``, ``GN``) so its state dicts load.

    Args:
        channels: input channels C.
        variant: 'T', 'B', 'S' or 'L' (sets the three defaults below).
        kernel_size: odd Conv1d kernel size, overriding the variant's.
        group_channels: input channels per conv group (``None``: depthwise), overriding the variant's.
        num_groups: GroupNorm groups, overriding the variant's.
        inplace: scale ``x`` in place when no gradient is needed (set by native slots whose block does not read
            the input again).
    """

    def __init__(
        self,
        channels: int,
        variant: str = "B",
        kernel_size: int | None = None,
        group_channels: int | None = None,
        num_groups: int | None = None,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        if variant not in ELA_VARIANTS:
            raise ValueError(f"ELA variant must be one of {sorted(ELA_VARIANTS)}, got {variant!r}")
        default_k, default_gc, default_ng = ELA_VARIANTS[variant]
        kernel_size = default_k if kernel_size is None else kernel_size
        group_channels = default_gc if group_channels is None else group_channels
        num_groups = default_ng if num_groups is None else num_groups
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"ELA kernel_size must be a positive odd int, got {kernel_size!r}")
        if channels % num_groups:
            raise ValueError(
                f"ELA-{variant} needs channels divisible by its {num_groups} GroupNorm groups, got channels={channels}"
            )
        if group_channels is not None and (group_channels < 1 or channels % group_channels):
            raise ValueError(
                f"ELA-{variant} needs channels divisible by its {group_channels} input channels per conv group, "
                f"got channels={channels}"
            )
        conv_groups = channels if group_channels is None else channels // group_channels
        self.variant = variant
        self.con1 = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, groups=conv_groups, bias=False)
        self.GN = nn.GroupNorm(num_groups, channels)
        self.inplace = inplace

    def strip_gate(self, strip: torch.Tensor) -> torch.Tensor:
        """(B, C, L) strip -> its gate through the shared conv + norm.

        The Conv1d runs as a (k, 1) Conv2d on a (B, C, L, 1) view: the same weights and result, and on the CPU
        oneDNN's backward for that layout is 3-5x faster on short strips (7x7 maps) than for Conv1d's (1, k).
        """
        conv = self.con1
        out = F.conv2d(strip[..., None], conv.weight[..., None], padding=(conv.padding[0], 0), groups=conv.groups)
        return torch.sigmoid(self.GN(out[..., 0]))

    def strip_gates(self, strip_h: torch.Tensor, strip_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row strip (B, C, H) and column strip (B, C, W) -> their gates, through the one shared conv + norm."""
        return self.strip_gate(strip_h), self.strip_gate(strip_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return strip_channel_gate(x, self.strip_gates, list(self.parameters()), self.inplace)
