"""Semantic segmentation: segmentation_models_pytorch's decoders on chanzoo's pyramid backbone.

UPerNet (Xiao et al., ECCV 2018; the DaViT / InceptionNeXt ADE20K protocol), DeepLabV3+ (Chen et al., ECCV 2018;
the ELA VOC protocol) and semantic FPN (Kirillov et al., CVPR 2019) come from smp's decoder modules; smp's own
``tu-`` encoders are not used, since they build plain timm models without chanzoo's channel modules.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3PlusDecoder
from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from torch import nn

from chanzoo.dense.backbone import PyramidBackbone

SEGMENTATION_DECODERS = ("upernet", "deeplabv3plus", "fpn")
# smp's decoders index encoder features as [input, stride 2, stride 4, ...]; the two slots before stride 4 are
# filled with placeholders (no decoder used here reads them).
_SMP_PREFIX = 2


class SegmentationModel(nn.Module):
    """Pyramid backbone + smp decoder + 1x1 classifier; logits are resized to the input.

    The input is zero-padded (bottom/right) to a multiple of the backbone's largest stride, so any image size
    works (validation at the original size), and the logits are cropped back.
    """

    def __init__(self, backbone: PyramidBackbone, decoder: nn.Module, decoder_channels: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.segmentation_head = SegmentationHead(decoder_channels, num_classes, kernel_size=1)
        self.num_classes = num_classes
        self.size_divisor = max(backbone.strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % self.size_divisor, (-width) % self.size_divisor
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        features = list(self.backbone(x).values())
        decoded = self.decoder([x] * _SMP_PREFIX + features)
        logits = self.segmentation_head(decoded)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :height, :width]


def build_segmenter(
    backbone: PyramidBackbone,
    decoder: str,
    num_classes: int,
    decoder_channels: int = 256,
    decoder_kwargs: Optional[dict[str, Any]] = None,
) -> SegmentationModel:
    """A ``SegmentationModel`` with smp's ``decoder`` ('upernet', 'deeplabv3plus' or 'fpn') for ``num_classes``
    classes. ``decoder_kwargs`` go to the smp decoder (e.g. ``atrous_rates`` of DeepLabV3+, ``dropout`` of FPN)."""
    if decoder not in SEGMENTATION_DECODERS:
        raise ValueError(f"decoder={decoder!r} is not a segmentation decoder; choose one of {SEGMENTATION_DECODERS}")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: segmentation needs at least 2 classes")
    channels = [0] * _SMP_PREFIX + list(backbone.out_channels)
    levels = len(backbone.out_channels)
    kwargs = dict(decoder_kwargs or {})
    if decoder == "upernet":
        if levels < 2:
            raise ValueError(f"UPerNet needs >= 2 feature levels, the backbone gives {levels}")
        module: nn.Module = UPerNetDecoder(
            channels, encoder_depth=levels + 1, decoder_channels=decoder_channels, **kwargs
        )
        out_channels = decoder_channels
    elif decoder == "fpn":
        if levels != 4:
            raise ValueError(f"semantic FPN needs the 4 levels at strides 4-32, the backbone gives {backbone.strides}")
        module = FPNDecoder(channels, encoder_depth=5, pyramid_channels=decoder_channels, **kwargs)
        out_channels = module.out_channels
    else:
        ratio = backbone.strides[-1] // backbone.strides[0]
        kwargs.setdefault("atrous_rates", (12, 24, 36))
        kwargs.setdefault("aspp_separable", True)
        kwargs.setdefault("aspp_dropout", 0.5)
        module = DeepLabV3PlusDecoder(
            channels, encoder_depth=5, out_channels=decoder_channels, output_stride=16, **kwargs
        )
        # smp assumes an output-stride-16 encoder; any final stride is brought to the stride-4 skip's resolution
        module.up = nn.Upsample(scale_factor=ratio, mode="bilinear", align_corners=True)
        out_channels = decoder_channels
    return SegmentationModel(backbone, module, out_channels, num_classes)
