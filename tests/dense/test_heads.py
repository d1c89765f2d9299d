"""One training step of every detection head and segmentation decoder on chanzoo backbones, on the coins photo:
the loss is finite and gradients reach the backbone's first and last stage."""
from __future__ import annotations

from typing import Any

import pytest
import torch

import chanzoo
from chanzoo.dense import DETECTION_HEADS, SEGMENTATION_DECODERS, PyramidBackbone, build_detector, build_segmenter

# keep the two-stage heads cheap at 96x128: fewer proposals and sampled RoIs
SMALL_RCNN = {"rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 64}
BACKBONES: dict[str, dict[str, Any]] = {
    "resnet18+se": {"model_name": "resnet18", "attn": "se"},
    "resnet18+eca": {"model_name": "resnet18", "attn": "eca"},
    "resnet18+ela_b": {"model_name": "resnet18", "attn": "ela_b"},
    "resnet18+psa_p": {"model_name": "resnet18", "attn": "psa_p"},
    "inception_next_atto": {"model_name": "inception_next_atto"},
    "davit_tiny-1111": {"model_name": "davit_tiny", "depths": (1, 1, 1, 1)},
    "vim2_nano": {"model_name": "vim2_nano", "in_chans": 3},
    "channelvit_tiny_p16-4blocks": {"model_name": "channelvit_tiny_p16", "img_size": 64, "depth": 4},
}


def _stage_grads(backbone: PyramidBackbone) -> tuple[float, float]:
    """Gradient norms of the backbone's first parameter (stem) and of its last feature stage's parameters.

    (A module's own parameters can get no gradient at init: timm zero-initialises the last BatchNorm of each
    ResNet block, so an SE module in the slot after it sees a constant map.)
    """
    first = next(backbone.body.parameters()).grad
    last_stage = backbone.inner.get_submodule(backbone.body.feature_info.module_name()[-1])
    grads = [p.grad for p in last_stage.parameters() if p.grad is not None]
    assert first is not None and grads
    return float(first.norm()), float(torch.stack([g.norm() for g in grads]).norm())


def _detection_step(model: torch.nn.Module, head: str, coins: tuple) -> None:
    image, target, _ = coins
    strides = (4, 8, 16, 32) if head.endswith("rcnn") else (8, 16, 32)
    pyramid = PyramidBackbone(model, strides=strides)
    detector = build_detector(pyramid, head, num_classes=2, fpn_channels=64, min_size=96, max_size=128,
                              head_kwargs=SMALL_RCNN if head.endswith("rcnn") else None)
    detector.train()
    losses = detector([image], [target])
    if head == "mask_rcnn":
        assert "loss_mask" in losses
    loss = sum(losses.values())
    assert torch.isfinite(loss), losses
    loss.backward()
    assert all(g > 0 for g in _stage_grads(pyramid))


def _segmentation_step(model: torch.nn.Module, decoder: str, coins: tuple) -> None:
    image, _, semantic = coins
    segmenter = build_segmenter(PyramidBackbone(model), decoder, num_classes=3, decoder_channels=64).train()
    images = torch.stack([image, image.flip(-1)])
    logits = segmenter(images)
    assert logits.shape == (2, 3, *image.shape[-2:])
    loss = torch.nn.functional.cross_entropy(logits, torch.stack([semantic, semantic.flip(-1)]), ignore_index=255)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(g > 0 for g in _stage_grads(segmenter.backbone))


@pytest.mark.parametrize("head", DETECTION_HEADS)
def test_every_detection_head_trains_on_resnet18(head: str, coins: tuple) -> None:
    _detection_step(chanzoo.create_model("resnet18", num_classes=0), head, coins)


@pytest.mark.parametrize("decoder", SEGMENTATION_DECODERS)
def test_every_decoder_trains_on_resnet18(decoder: str, coins: tuple) -> None:
    _segmentation_step(chanzoo.create_model("resnet18", num_classes=0), decoder, coins)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_family_trains_with_a_head_and_a_decoder(name: str, coins: tuple) -> None:
    kwargs = dict(BACKBONES[name])
    model_name = kwargs.pop("model_name")
    torch.manual_seed(0)
    _detection_step(chanzoo.create_model(model_name, num_classes=0, **kwargs), "fcos", coins)
    _segmentation_step(chanzoo.create_model(model_name, num_classes=0, **kwargs), "upernet", coins)


@pytest.mark.parametrize("head, levels", [("faster_rcnn", 5), ("retinanet", 5), ("fcos", 5)])
def test_anchors_follow_the_pyramid_levels(head: str, levels: int) -> None:
    """A backbone with three levels (strides 8-32) still gets one anchor size per FPN level."""
    model = chanzoo.create_model("resnet18", num_classes=0)
    pyramid = PyramidBackbone(model, strides=(8, 16, 32) if head != "faster_rcnn" else (4, 8, 16, 32))
    detector = build_detector(pyramid, head, num_classes=2, min_size=64, max_size=64)
    generator = detector.rpn.anchor_generator if head == "faster_rcnn" else detector.anchor_generator
    assert len(generator.sizes) == levels == len(detector.backbone.strides)
    detector.eval()
    with torch.no_grad():
        detections = detector([torch.zeros(3, 64, 64)])
    assert set(detections[0]) >= {"boxes", "scores", "labels"}


def test_unknown_head_and_decoder_are_named() -> None:
    pyramid = PyramidBackbone(chanzoo.create_model("resnet18", num_classes=0))
    with pytest.raises(ValueError, match="head='yolo'.*faster_rcnn"):
        build_detector(pyramid, "yolo", num_classes=2)
    with pytest.raises(ValueError, match="decoder='segformer'.*upernet"):
        build_segmenter(pyramid, "segformer", num_classes=3)


def test_untrained_fcos_predicts_boxes_of_positive_size(coins: tuple) -> None:
    """FCOS's (l, t, r, b) pass through a ReLU: from torchvision's zero bias half of them start dead and Adam can
    push the rest below zero, leaving zero-size boxes that no GIoU gradient revives. chanzoo starts every box at
    two strides, so an untrained FCOS already predicts boxes with area, from every location."""
    image, _, _ = coins
    pyramid = PyramidBackbone(chanzoo.create_model("resnet18", num_classes=0), strides=(8, 16, 32))
    detector = build_detector(pyramid, "fcos", num_classes=2, fpn_channels=64, min_size=96, max_size=128,
                              head_kwargs={"score_thresh": 0.0, "detections_per_img": 1000})
    detector.eval()
    with torch.no_grad():
        boxes = detector([image])[0]["boxes"]
    sizes = boxes[:, 2:] - boxes[:, :2]
    assert len(boxes) > 100 and bool((sizes > 1).all()), sizes.min(0).values
