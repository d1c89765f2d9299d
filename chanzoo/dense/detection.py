"""torchvision's detectors (Faster R-CNN, Mask R-CNN, RetinaNet, FCOS) on chanzoo's pyramid backbone + FPN.

The FPN levels and the anchors follow the backbone: two-stage detectors read P2-P5 plus a max-pooled P6 (anchor
size 8x the stride, as in torchvision's 32-512), one-stage ones P3-P5 plus P6/P7 from P5 (RetinaNet: three octave
scales from 4x the stride; FCOS: one point per location, size = stride). A backbone with fewer or more levels gets
as many anchor sizes as it has levels.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from chanzoo.dense.backbone import PyramidBackbone

DETECTION_HEADS = ("faster_rcnn", "mask_rcnn", "retinanet", "fcos")
FCOS_REGRESSION_BIAS = 1.0  # initial (l, t, r, b) in strides: boxes start 2 strides wide
_TWO_STAGE = ("faster_rcnn", "mask_rcnn")


class BackboneFPN(nn.Module):
    """A ``PyramidBackbone`` followed by torchvision's ``FeaturePyramidNetwork`` (torchvision's ``BackboneWithFPN``
    for backbones that are not torchvision ResNets). ``out_channels`` is what torchvision's detectors read."""

    def __init__(self, backbone: PyramidBackbone, out_channels: int, extra_blocks: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.fpn = FeaturePyramidNetwork(backbone.out_channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels
        self.strides = list(backbone.strides) + [backbone.strides[-1] * 2 ** k for k in (1, 2)][
            : 1 if isinstance(extra_blocks, LastLevelMaxPool) else 2
        ]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.backbone(x))


def _anchor_generator(head: str, strides: Sequence[int]) -> AnchorGenerator:
    if head in _TWO_STAGE:
        sizes = tuple((8 * s,) for s in strides)
        ratios = ((0.5, 1.0, 2.0),) * len(strides)
    elif head == "retinanet":
        sizes = tuple(tuple(int(4 * s * 2 ** (k / 3)) for k in range(3)) for s in strides)
        ratios = ((0.5, 1.0, 2.0),) * len(strides)
    else:  # fcos: one point per location
        sizes = tuple((s,) for s in strides)
        ratios = ((1.0,),) * len(strides)
    return AnchorGenerator(sizes, ratios)


def build_detector(
    backbone: PyramidBackbone,
    head: str,
    num_classes: int,
    fpn_channels: int = 256,
    min_size: int = 800,
    max_size: int = 1333,
    image_mean: Optional[Sequence[float]] = None,
    image_std: Optional[Sequence[float]] = None,
    head_kwargs: Optional[dict[str, Any]] = None,
) -> nn.Module:
    """A torchvision detector with ``num_classes`` foreground classes (label 0 is background) on ``backbone``.

    ``min_size``/``max_size``: torchvision's resize of every image (shorter side / longer-side cap);
    ``image_mean``/``image_std``: its input normalisation (default ImageNet's); ``head_kwargs``: any other keyword
    of the torchvision class (e.g. ``box_detections_per_img``, ``score_thresh``).
    """
    if head not in DETECTION_HEADS:
        raise ValueError(f"head={head!r} is not a detection head; choose one of {DETECTION_HEADS}")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes}: a detector needs at least one foreground class")
    if len(backbone.out_channels) < 2:
        raise ValueError(f"the backbone gives {len(backbone.out_channels)} feature level(s); an FPN needs >= 2")
    extra = LastLevelMaxPool() if head in _TWO_STAGE else LastLevelP6P7(fpn_channels, fpn_channels)
    body = BackboneFPN(backbone, fpn_channels, extra)
    kwargs: dict[str, Any] = dict(
        min_size=min_size,
        max_size=max_size,
        image_mean=list(image_mean) if image_mean is not None else [0.485, 0.456, 0.406],
        image_std=list(image_std) if image_std is not None else [0.229, 0.224, 0.225],
        **(head_kwargs or {}),
    )
    anchors = _anchor_generator(head, body.strides)
    if head in _TWO_STAGE:
        level_names = [str(i) for i in range(len(backbone.out_channels))]
        kwargs["rpn_anchor_generator"] = anchors
        kwargs["box_roi_pool"] = MultiScaleRoIAlign(level_names, output_size=7, sampling_ratio=2)
        if head == "mask_rcnn":
            kwargs["mask_roi_pool"] = MultiScaleRoIAlign(level_names, output_size=14, sampling_ratio=2)
            return MaskRCNN(body, num_classes=num_classes + 1, **kwargs)
        return FasterRCNN(body, num_classes=num_classes + 1, **kwargs)
    kwargs["anchor_generator"] = anchors
    if head == "retinanet":
        return RetinaNet(body, num_classes=num_classes + 1, **kwargs)
    detector = FCOS(body, num_classes=num_classes + 1, **kwargs)
    # torchvision's FCOS regresses (l, t, r, b) / stride through a ReLU from a zero bias: half its outputs start dead,
    # and from scratch under Adam the bias can drift below zero within 50 steps, leaving zero-size boxes and a box
    # loss stuck at 1 (seen on fashion-paste with seed 0). A bias of 1 starts every box at 2 strides, inside the ReLU.
    nn.init.constant_(detector.head.regression_head.bbox_reg.bias, FCOS_REGRESSION_BIAS)
    return detector
