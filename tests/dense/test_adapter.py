"""The backbone -> pyramid adapter: which features it takes, their strides and layout, freezing, lr groups."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

import chanzoo
from chanzoo.dense import PyramidBackbone, default_out_indices, dense_param_groups


@pytest.fixture(scope="module")
def photo_batch(photos: dict) -> torch.Tensor:
    """The astronaut and the coffee photos at 128x128, in [0, 1]."""
    crops = [photos[k][:384, :384] for k in ("astronaut", "coffee")]
    images = [torch.from_numpy(crop).permute(2, 0, 1).float()[None] / 255 for crop in crops]
    return torch.nn.functional.interpolate(torch.cat(images), size=(128, 128), mode="bilinear", antialias=True)


def test_default_indices_pick_strides_4_to_32() -> None:
    assert default_out_indices(chanzoo.create_model("resnet18")) == [1, 2, 3, 4]  # act1 (stride 2) left out
    assert default_out_indices(chanzoo.create_model("resnet18"), strides=(8, 16, 32)) == [2, 3, 4]
    assert default_out_indices(chanzoo.create_model("davit_tiny", depths=(1, 1, 1, 1))) == [0, 1, 2, 3]
    assert default_out_indices(chanzoo.create_model("channelvit_tiny_p16", depth=3)) == [2]  # single-scale: last block


@pytest.mark.parametrize("name, kwargs", [
    ("resnet18", {"attn": "eca"}),
    ("davit_tiny", {"depths": (1, 1, 1, 1), "attn": "se"}),  # a module inserted after each stage
    ("vim2_nano", {"in_chans": 3}),
])
def test_features_equal_the_models_own_stage_outputs(name: str, kwargs: dict, photo_batch: torch.Tensor) -> None:
    """The pyramid holds the model's forward_intermediates (NCHW) at strides 4-32, channel modules included."""
    torch.manual_seed(0)
    model = chanzoo.create_model(name, **kwargs).eval()
    indices = default_out_indices(model)
    with torch.no_grad():
        expected = model.forward_intermediates(photo_batch, indices=indices, intermediates_only=True)
        pyramid = PyramidBackbone(model).eval()
        features = list(pyramid(photo_batch).values())
    assert pyramid.strides == [4, 8, 16, 32]
    for feature, reference, stride, channels in zip(features, expected, pyramid.strides, pyramid.out_channels):
        assert feature.shape == (2, channels, 128 // stride, 128 // stride)
        torch.testing.assert_close(feature, reference)


def test_features_only_model_is_accepted_and_nhwc_becomes_nchw(photo_batch: torch.Tensor) -> None:
    """vim2 built with features_only gives NHWC maps (its native layout); the adapter returns NCHW."""
    model = chanzoo.create_model("vim2_nano", in_chans=3, features_only=True, out_indices=(0, 1, 2, 3)).eval()
    pyramid = PyramidBackbone(model).eval()
    with torch.no_grad():
        raw = model(photo_batch)
        features = list(pyramid(photo_batch).values())
    for feature, native, channels in zip(features, raw, pyramid.out_channels):
        assert feature.shape[1] == channels
        is_nhwc = native.shape[-1] == channels and native.shape[1] != channels
        expected = native.permute(0, 3, 1, 2) if is_nhwc else native
        torch.testing.assert_close(feature, expected)
    with pytest.raises(ValueError, match="out_indices=\\[1\\].*features_only"):
        PyramidBackbone(model, out_indices=[1])


def test_channelvit_gets_a_simple_pyramid(photo_batch: torch.Tensor) -> None:
    model = chanzoo.create_model("channelvit_tiny_p16", img_size=64, depth=2)
    pyramid = PyramidBackbone(model, pyramid_channels=64)
    features = pyramid(photo_batch)
    assert [tuple(f.shape) for f in features.values()] == [(2, 64, 128 // s, 128 // s) for s in (4, 8, 16, 32)]


def test_frozen_stages_and_frozen_bn() -> None:
    model = chanzoo.create_model("resnet18")
    pyramid = PyramidBackbone(model, frozen_stages=1, frozen_bn=True)
    frozen = {n for n, p in pyramid.inner.named_parameters() if not p.requires_grad}
    stem_and_layer1 = {n for n, _ in pyramid.inner.named_parameters() if n.split(".")[0] in ("conv1", "bn1", "layer1")}
    assert frozen == stem_and_layer1
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in pyramid.modules())
    frozen_bns = sum(isinstance(m, FrozenBatchNorm2d) for m in pyramid.modules())
    assert frozen_bns == 1 + 2 * 4 * 2 + 3  # stem, 2 per block in 8 blocks, 3 downsamples
    stem_only = PyramidBackbone(chanzoo.create_model("resnet18"), frozen_stages=0)
    assert {n for n, p in stem_only.inner.named_parameters() if not p.requires_grad} == {
        "conv1.weight", "bn1.weight", "bn1.bias"}


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="out_indices=\\[7\\]"):
        PyramidBackbone(chanzoo.create_model("resnet18"), out_indices=[7])
    with pytest.raises(ValueError, match="frozen_stages=5"):
        PyramidBackbone(chanzoo.create_model("resnet18"), frozen_stages=5)
    with pytest.raises(ValueError, match="backbone_lr_mult=-1"):
        dense_param_groups(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), 0.1, 0.0, backbone_lr_mult=-1)


def test_backbone_lr_multiplier_and_layer_decay() -> None:
    """Backbone groups at lr x multiplier (x layer decay per block for a ViT), neck/head groups at lr."""
    from chanzoo.dense import build_segmenter

    segmenter = build_segmenter(PyramidBackbone(chanzoo.create_model("davit_tiny", depths=(1, 1, 1, 1))), "fpn", 3, 32)
    backbone = segmenter.backbone.inner
    groups = dense_param_groups(segmenter, backbone, lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1)
    backbone_ids = {id(p) for p in backbone.parameters()}
    for group in groups:
        in_backbone = {id(p) in backbone_ids for p in group["params"]}
        assert len(in_backbone) == 1
        assert group["lr"] == pytest.approx(1e-4 if in_backbone.pop() else 1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(segmenter.parameters()))
    decayed = dense_param_groups(segmenter, backbone, lr=1e-3, weight_decay=0.05, backbone_lr_mult=1.0, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in decayed})
    assert scales[-1] == 1.0 and scales[0] < 0.1  # the stem gets the deepest decay, the decoder none


def test_dense_profile_splits_backbone_and_head() -> None:
    """Backbone + head params and FLOPs add up to the whole detector's; the backbone is counted at the size the
    detector resizes the image to (shorter side 160 -> 160x224 after padding to 32)."""
    from chanzoo.dense import build_detector, dense_profile
    from chanzoo.profile import count_flops, count_params

    model = chanzoo.create_model("resnet18", num_classes=0)
    pyramid = PyramidBackbone(model)
    detector = build_detector(pyramid, "faster_rcnn", num_classes=2, min_size=160, max_size=224)
    report = dense_profile(detector, pyramid.body, input_size=[3, 160, 220])
    assert report["backbone_input"] == [3, 160, 224]
    assert report["backbone_params"] == count_params(pyramid.body)[0] == 11_176_512  # resnet18 without its fc
    assert report["backbone_params"] + report["head_params"] == count_params(detector)[0]
    assert report["backbone_flops"] == count_flops(pyramid.body.eval(), torch.zeros(1, 3, 160, 224))[0]
    assert report["head_flops"] > 0
    with pytest.raises(ValueError, match="input_size=\\[160, 220\\]"):
        dense_profile(detector, pyramid.body, input_size=[160, 220])
