"""Backbone -> feature pyramid: multi-scale NCHW feature maps from any timm or chanzoo model.

Hierarchical backbones (ResNet, DaViT, InceptionNeXt, ViM2, any model with a channel module in its native slot or
after its stages) give their stage outputs at strides 4-32 through timm's ``forward_intermediates`` (the stage
forward hooks that carry stage-inserted channel modules run on the way). Single-scale ViTs (ChannelViT) get the
simple pyramid of ViTDet (Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection", ECCV 2022):
strides 4, 8, 16 and 32 made from the last block's stride-16 map by deconvolutions and a max-pool.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from timm.layers import LayerNorm2d, freeze_batch_norm_2d
from timm.models._features import FeatureGetterNet, FeatureInfo
from torch import nn

_logger = logging.getLogger(__name__)

PYRAMID_STRIDES = (4, 8, 16, 32)


def _feature_dicts(model: nn.Module) -> list[dict]:
    feature_info = getattr(model, "feature_info", None)
    if not feature_info:
        raise ValueError(
            f"{type(model).__name__} has no feature_info, so its multi-scale features cannot be found; dense "
            "prediction needs a backbone that lists its stages (every timm/chanzoo family with stages does)"
        )
    return feature_info.get_dicts() if isinstance(feature_info, FeatureInfo) else list(feature_info)


def default_out_indices(model: nn.Module, strides: Sequence[int] = PYRAMID_STRIDES) -> list[int]:
    """Indices into ``model.feature_info`` of the last feature at each stride in ``strides`` that the model has.

    For a single-scale model (every entry at one stride, e.g. a ViT) this is its last block.
    """
    entries = _feature_dicts(model)
    reductions = [int(e["reduction"]) for e in entries]
    if len(set(reductions)) == 1:
        return [len(entries) - 1]
    last_at = {r: i for i, r in enumerate(reductions)}
    indices = [last_at[s] for s in strides if s in last_at]
    if not indices:
        raise ValueError(f"{type(model).__name__} has no features at strides {list(strides)} (it has {reductions})")
    return indices


def freeze_stages(model: nn.Module, frozen_stages: int) -> list[str]:
    """Stop gradients in the stem and the first ``frozen_stages`` stages of ``model.feature_info`` (detection
    codebases' ``frozen_stages``: 0 freezes the stem only, -1 nothing). Returns the frozen parameter names.

    Parameters are frozen in registration order up to the last parameter of the chosen stage, which is the
    forward order of timm's models (stem, stages, head).
    """
    if frozen_stages < 0:
        return []
    entries = _feature_dicts(model)
    stages = [e["module"] for e in entries if any(True for _ in model.get_submodule(e["module"]).parameters())]
    if frozen_stages > len(stages):
        raise ValueError(f"frozen_stages={frozen_stages} but {type(model).__name__} has {len(stages)} stages {stages}")
    names = [name for name, _ in model.named_parameters()]
    if frozen_stages == 0:
        first = stages[0]
        end = next(i for i, n in enumerate(names) if n.startswith(first + "."))
    else:
        last = stages[frozen_stages - 1]
        end = max(i for i, n in enumerate(names) if n.startswith(last + ".")) + 1
    frozen = names[:end]
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one stride-``in_stride`` map -> maps at ``strides`` (4, 8, 16, 32 by default).

    Each scale is resampled (2x2 deconvolutions up, max-pool down), then projected by a 1x1 and a 3x3 convolution,
    each followed by LayerNorm, as in ViTDet.
    """

    def __init__(
        self, in_channels: int, out_channels: int, in_stride: int = 16, strides: Sequence[int] = PYRAMID_STRIDES
    ) -> None:
        super().__init__()
        self.strides = list(strides)
        self.scales = nn.ModuleList()
        for stride in self.strides:
            layers: list[nn.Module] = []
            channels = in_channels
            factor = in_stride
            while factor > stride:  # upsample by 2 until the stride is reached
                layers += [nn.ConvTranspose2d(channels, channels // 2, 2, stride=2)]
                channels //= 2
                factor //= 2
                if factor > stride:
                    layers += [LayerNorm2d(channels), nn.GELU()]
            while factor < stride:
                layers.append(nn.MaxPool2d(2))
                factor *= 2
            layers += [
                nn.Conv2d(channels, out_channels, 1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            ]
            self.scales.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [scale(x) for scale in self.scales]


class PyramidBackbone(nn.Module):
    """Multi-scale NCHW features of a timm/chanzoo model, as an ordered dict {'0': stride-4 map, '1': ...}.

    Args:
        model: a classifier built by ``chanzoo.create_model`` (its head is pruned) or a ``features_only`` model.
        out_indices: ``feature_info`` indices to return; default: the last feature at each of ``strides``
            (for a single-scale ViT: its last block, turned into those scales by a simple pyramid).
        strides: the strides the default ``out_indices`` (and a simple pyramid) give.
        frozen_stages: freeze the stem and this many stages (-1: train everything).
        frozen_bn: turn every BatchNorm into timm's ``FrozenBatchNorm2d`` (fixed statistics and affine).
        pyramid_channels: output channels of the simple pyramid of single-scale models.
    """

    def __init__(
        self,
        model: nn.Module,
        out_indices: Optional[Sequence[int]] = None,
        strides: Sequence[int] = PYRAMID_STRIDES,
        frozen_stages: int = -1,
        frozen_bn: bool = False,
        pyramid_channels: int = 256,
    ) -> None:
        super().__init__()
        model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: adapt the module it wraps
        already_features = isinstance(getattr(model, "feature_info", None), FeatureInfo)
        if already_features and out_indices is not None:
            raise ValueError(
                f"out_indices={list(out_indices)} given for a model built with features_only=True: set its "
                "model.out_indices instead (or build it without features_only)"
            )
        if not already_features:
            entries = _feature_dicts(model)
            if out_indices is None:
                out_indices = default_out_indices(model, strides)
            bad = [i for i in out_indices if not -len(entries) <= i < len(entries)]
            if bad:
                raise ValueError(f"out_indices={list(out_indices)}: {bad} outside the {len(entries)} features of "
                                 f"{type(model).__name__} (reductions {[e['reduction'] for e in entries]})")
            frozen = freeze_stages(model, frozen_stages)
            if frozen:
                _logger.info("froze %d backbone parameters (stem + %d stage(s))", len(frozen), frozen_stages)
            model = FeatureGetterNet(model, out_indices=list(out_indices), output_fmt="NCHW")
        elif frozen_stages >= 0:
            raise ValueError(f"frozen_stages={frozen_stages} needs the full model; build it without features_only")
        if frozen_bn:
            model = freeze_batch_norm_2d(model)
        self.body = model
        self.nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        channels = list(model.feature_info.channels())
        feature_strides = list(model.feature_info.reduction())
        self.pyramid: Optional[SimplePyramid] = None
        if len(feature_strides) == 1:
            self.pyramid = SimplePyramid(channels[0], pyramid_channels, in_stride=feature_strides[0], strides=strides)
            channels, feature_strides = [pyramid_channels] * len(self.pyramid.strides), list(self.pyramid.strides)
        self.out_channels: list[int] = channels
        self.strides: list[int] = feature_strides

    @property
    def inner(self) -> nn.Module:
        """The backbone network itself (for its ``group_matcher`` in layer-wise lr decay)."""
        return getattr(self.body, "model", self.body)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(x)
        if self.nhwc:
            features = [f.permute(0, 3, 1, 2) for f in features]
        if self.pyramid is not None:
            features = self.pyramid(features[-1])
        return OrderedDict((str(i), f) for i, f in enumerate(features))
