"""SmallCNN: a VGG-style three-stage CNN for small images (Fashion-MNIST, digits) with a channel-module slot.

It is chanzoo's walking-skeleton model: each stage is two 3x3 conv-BN-ReLU layers followed by the channel module
given as ``attn_layer`` (SE, ECA, ...), so ablating channel attention on a laptop takes minutes.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from chanzoo.channel.registry import ChannelModuleSpec, get_channel_module

__all__ = ["SmallCNN"]


@torch.fx.wrap  # one node under torch.fx tracing; the check runs whenever the traced graph does
def _check_input(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"SmallCNN expects (B, {in_chans}, H, W) input, got shape {tuple(x.shape)}")
    return x


def _conv_bn_relu(in_chs: int, out_chs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True)
    )


class SmallCNNStage(nn.Module):
    """Optional 2x2 max-pool, ``depth`` conv-BN-ReLU layers, then the channel module."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, downsample: bool, attn_factory: Optional[Callable]):
        super().__init__()
        self.downsample = nn.MaxPool2d(2) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[_conv_bn_relu(in_chs if i == 0 else out_chs, out_chs) for i in range(depth)])
        self.attn = attn_factory(out_chs) if attn_factory is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.blocks(self.downsample(x)))


class SmallCNN(nn.Module):
    """Three-stage CNN; stage ``i`` runs at 1/2**i of the input resolution."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        depths: Sequence[int] = (2, 2, 2),
        attn_layer: ChannelModuleSpec = None,
        drop_rate: float = 0.2,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"widths {tuple(widths)} and depths {tuple(depths)} must have the same length")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        attn_factory = get_channel_module(attn_layer)
        stages, self.feature_info, in_chs = [], [], in_chans
        for i, (width, depth) in enumerate(zip(widths, depths)):
            stages.append(SmallCNNStage(in_chs, width, depth, downsample=i > 0, attn_factory=attn_factory))
            self.feature_info.append(dict(num_chs=width, reduction=2**i, module=f"stages.{i}"))
            in_chs = width
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Stage outputs at ``indices`` (timm's forward_intermediates contract)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' for SmallCNN, got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        stages = self.stages if not stop_early else self.stages[: max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, list[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(_check_input(x, self.in_chans))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_small_cnn(variant: str, pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    return build_model_with_cfg(
        SmallCNN, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2), flatten_sequential=True), **kwargs
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 10,
        "input_size": (1, 28, 28),
        "pool_size": (7, 7),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.2860,),
        "std": (0.3530,),
        "first_conv": "stages.0.blocks.0.0",
        "classifier": "head.fc",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"small_cnn.untrained": _cfg()})


@register_model
def small_cnn(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """SmallCNN 32-64-128, two convs per stage (about 0.29M parameters)."""
    model_args = dict(widths=(32, 64, 128), depths=(2, 2, 2))
    return _create_small_cnn("small_cnn", pretrained, **dict(model_args, **kwargs))
