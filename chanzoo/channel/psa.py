"""Polarized Self-Attention (Liu et al., "Polarized Self-Attention: Towards High-quality Pixel-wise Regression",
arXiv:2107.00782, 2021).

Both layouts follow the official release (DeLightCMU/PSA, ``semantic-segmentation/network/PSA.py``) parameter for
parameter and operation for operation, so its state dicts load and give the same outputs. The release differs from
the paper's equations in three places, which we keep: the channel-only branch's ``W_z`` is one 1x1 conv in the
parallel layout and a 1x1 conv bottleneck (C/2 -> C/8, LayerNorm, ReLU -> C, with bias) in the sequential one; in the
parallel layout's spatial-only branch the softmax runs over the H*W spatial logits (not over the pooled query's
channels); and in the sequential layout it runs over the H*W positions of each value channel.
"""
from __future__ import annotations

import torch
from torch import nn

from chanzoo.channel.registry import register_channel_module


class _PolarizedBase(nn.Module):
    """The two branches shared by both layouts; ``conv_up`` (the channel branch's W_z) is set by the subclass."""

    conv_up: nn.Module

    def __init__(self, channels: int, min_channels: int, name: str) -> None:
        super().__init__()
        if channels < min_channels:
            raise ValueError(f"{name} needs channels >= {min_channels}, got channels={channels}")
        self.inter_planes = channels // 2
        self.conv_q_right = nn.Conv2d(channels, 1, 1, bias=False)  # channel branch: query W_q (C -> 1)
        self.conv_v_right = nn.Conv2d(channels, self.inter_planes, 1, bias=False)  # channel branch: value W_v
        self.conv_q_left = nn.Conv2d(channels, self.inter_planes, 1, bias=False)  # spatial branch: query W_q
        self.conv_v_left = nn.Conv2d(channels, self.inter_planes, 1, bias=False)  # spatial branch: value W_v
        for conv in (self.conv_q_right, self.conv_v_right, self.conv_q_left, self.conv_v_left):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """Channel-only branch: softmax-pooled values -> W_z -> sigmoid, shape (B, C, 1, 1)."""
        value = self.conv_v_right(x).flatten(2)  # (B, C/2, HW)
        query = torch.softmax(self.conv_q_right(x).flatten(2), dim=2)  # (B, 1, HW)
        context = torch.matmul(value, query.transpose(1, 2)).unsqueeze(-1)  # (B, C/2, 1, 1)
        return torch.sigmoid(self.conv_up(context))

    def spatial_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spatial-only branch inputs: the pooled query (B, 1, C/2) and the values (B, C/2, HW)."""
        query = self.conv_q_left(x).mean((2, 3)).unsqueeze(1)
        return query, self.conv_v_left(x).flatten(2)


@register_channel_module("psa_p")
class PolarizedSelfAttentionParallel(_PolarizedBase):
    """PSA, parallel layout (the release's ``PSA_p``): ``y = x * A_ch(x) + x * A_sp(x)``.

    Args:
        channels: input channels C (>= 2); the branches work on C/2 channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, 2, "psa_p")
        self.conv_up = nn.Conv2d(self.inter_planes, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, value = self.spatial_logits(x)
        spatial = torch.softmax(torch.matmul(query, value), dim=2)  # (B, 1, HW)
        spatial_gate = torch.sigmoid(spatial).view(x.shape[0], 1, x.shape[2], x.shape[3])
        return x * self.channel_gate(x) + x * spatial_gate


@register_channel_module("psa_s")
class PolarizedSelfAttentionSequential(_PolarizedBase):
    """PSA, sequential layout (the release's ``PSA_s``): ``z = x * A_ch(x)``, ``y = z * A_sp(z)``.

    Args:
        channels: input channels C (>= 8: the channel branch's bottleneck has C/8 channels).
        ratio: bottleneck reduction of the channel branch's W_z (4 in the release).
    """

    def __init__(self, channels: int, ratio: int = 4) -> None:
        super().__init__(channels, 2 * ratio, "psa_s")
        hidden = self.inter_planes // ratio
        self.conv_up = nn.Sequential(
            nn.Conv2d(self.inter_planes, hidden, 1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel_gate(x)
        query, value = self.spatial_logits(x)
        spatial = torch.matmul(query, torch.softmax(value, dim=2))  # (B, 1, HW)
        return x * torch.sigmoid(spatial).view(x.shape[0], 1, x.shape[2], x.shape[3])
