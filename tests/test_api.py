"""The public API: create_model over timm's registry, channel modules by name, errors with close matches."""
import pytest
import timm
import torch

import chanzoo
from chanzoo.channel.eca import EfficientChannelAttention
from chanzoo.channel.se import SqueezeExcite


def test_chanzoo_models_join_timms_registry():
    assert "small_cnn" in timm.list_models("small_cnn")
    assert chanzoo.list_models("small_cnn") == ["small_cnn"]
    model = timm.create_model("small_cnn", num_classes=7, in_chans=3)
    assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 7)


def test_channel_module_registry():
    names = chanzoo.list_channel_modules()
    assert {"se", "eca"} <= set(names)
    module = chanzoo.create_channel_module("se", 64, reduction=8)
    assert isinstance(module, SqueezeExcite) and module.fc1.out_channels == 8
    assert isinstance(chanzoo.create_channel_module("none", 64), torch.nn.Identity)


def test_attn_goes_through_resnets_native_slot():
    model = chanzoo.create_model("resnet18", attn="eca", num_classes=10)
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    assert all(isinstance(b.se, EfficientChannelAttention) for b in blocks)
    plain = timm.create_model("resnet18", num_classes=10)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == sum(b.se.kernel_size for b in blocks)  # ECA: k weights per module, no bias


def test_attn_on_smallcnn_slot_adds_exactly_se_params():
    with_se = chanzoo.create_model("small_cnn", attn="se")
    without = chanzoo.create_model("small_cnn")
    extra = sum(p.numel() for p in with_se.parameters()) - sum(p.numel() for p in without.parameters())
    # SE with r=16 on 32/64/128 channels: 2*C*C/16 weights + C/16 + C biases each
    expected = sum(2 * c * (c // 16) + c // 16 + c for c in (32, 64, 128))
    assert extra == expected


def test_stage_insertion_keeps_backbone_keys_and_outputs_shape():
    plain = timm.create_model("resnet18")
    model = chanzoo.create_model("resnet18", attn="se", attn_position="stage")
    plain_keys, keys = set(plain.state_dict()), set(model.state_dict())
    assert plain_keys <= keys
    assert {k.split(".channel_attn")[0] for k in keys - plain_keys} == {"layer1", "layer2", "layer3", "layer4"}
    model.load_state_dict(plain.state_dict(), strict=False)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


def test_unknown_names_suggest_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'resnet5O'.*resnet50"):
        chanzoo.create_model("resnet5O")
    with pytest.raises(ValueError, match=r"unknown channel module 'eka'.*eca"):
        chanzoo.create_model("small_cnn", attn="eka")
    with pytest.raises(ValueError, match=r"attn_position must be one of .* got 'stages'"):
        chanzoo.create_model("small_cnn", attn="se", attn_position="stages")
    with pytest.raises(ValueError, match="channels must be a positive int, got 0"):
        chanzoo.create_channel_module("se", 0)


def test_smallcnn_model_contract():
    model = chanzoo.create_model("small_cnn", attn="eca", num_classes=10)
    x = torch.zeros(2, 1, 28, 28)
    features = model.forward_features(x)
    assert features.shape == (2, model.num_features, 7, 7)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    final, intermediates = model.forward_intermediates(x)
    assert [t.shape[1] for t in intermediates] == [f["num_chs"] for f in model.feature_info]
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model(x).shape == (2, 3)
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in state and f"{cfg['classifier']}.weight" in state
    feats = chanzoo.create_model("small_cnn", features_only=True, out_indices=(1, 2))
    assert [f.shape[1] for f in feats(x)] == [64, 128]
    with pytest.raises(ValueError, match=r"expects \(B, 1, H, W\) input, got shape \(2, 3, 28, 28\)"):
        model(torch.zeros(2, 3, 28, 28))


def _declared(folder: str, pattern: str) -> dict[str, str]:
    """name -> file for every declaration ``pattern`` matches in the package folder ``folder``."""
    import re
    from pathlib import Path

    found = {}
    for path in sorted((Path(chanzoo.__file__).parent / folder).glob("*.py")):
        for name in re.findall(pattern, path.read_text()):
            found[name] = path.name
    return found


def test_every_model_a_file_declares_is_registered():
    """A model file missing from ``chanzoo/models/__init__.py`` would never register its models."""
    declared = _declared("models", r"@register_model\s*\ndef (\w+)\(")
    assert {"small_cnn", "vim2_nano", "rgt_s_x2", "histoformer", "channelvit_tiny_p8"} <= set(declared)
    missing = {name: file for name, file in declared.items() if not timm.is_model(name)}
    assert missing == {}


def test_every_channel_module_a_file_declares_is_registered():
    """A module file missing from ``chanzoo/channel/__init__.py`` would never register its modules."""
    declared = _declared("channel", r"@register_channel_module\(\s*[\"'](\w+)[\"']")
    assert {"se", "eca", "scse"} <= set(declared)
    missing = {name: file for name, file in declared.items() if name not in chanzoo.list_channel_modules()}
    assert missing == {}
