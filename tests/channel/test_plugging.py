"""Plugging channel modules into backbones: native slots (ResNet, MobileNetV2/V3), per-stage kwargs, stage
insertion, official ECA-Net checkpoints with per-stage kernels, and the errors for what cannot take a module."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chanzoo
from chanzoo.channel.ela import EfficientLocalAttention
from chanzoo.channel.eca import EfficientChannelAttention


@pytest.fixture(scope="module")
def images(photos: dict[str, np.ndarray]) -> torch.Tensor:
    """Two bundled photos as a normalised (2, 3, 64, 64) batch."""
    x = torch.stack([torch.from_numpy(photos[k]).permute(2, 0, 1).float() / 255 for k in ("astronaut",)] +
                    [F.interpolate(torch.from_numpy(photos["coffee"]).permute(2, 0, 1).float()[None] / 255,
                                   size=(512, 512))[0]])
    x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True)
    return (x - 0.45) / 0.225


def placed(model: nn.Module, cls: type) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


def test_resnet_native_slot_puts_one_module_in_every_block(images: torch.Tensor) -> None:
    model = chanzoo.create_model("resnet18", attn="ela_b", num_classes=5).eval()
    where = placed(model, EfficientLocalAttention)
    assert sorted(where) == [f"layer{s}.{b}.se" for s in range(1, 5) for b in range(2)]
    assert model(images).shape == (2, 5)


def test_mobilenetv3_native_slot_replaces_exactly_its_se_blocks(images: torch.Tensor) -> None:
    plain = chanzoo.create_model("mobilenetv3_large_100")
    had_se = {f"{n}.se": b.se.conv_reduce.in_channels for n, b in plain.named_modules()
              if hasattr(b, "se") and not isinstance(b.se, nn.Identity)}
    model = chanzoo.create_model("mobilenetv3_large_100", attn="eca", num_classes=3).eval()
    where = placed(model, EfficientChannelAttention)
    assert set(where) == set(had_se)
    from chanzoo.channel.eca import eca_kernel_size

    assert {n: m.kernel_size for n, m in where.items()} == {n: eca_kernel_size(c) for n, c in had_se.items()}
    assert model(images).shape == (2, 3)


def test_mobilenetv2_native_slot_fills_every_block(images: torch.Tensor) -> None:
    plain = chanzoo.create_model("mobilenetv2_100")
    blocks = [n for n, b in plain.named_modules() if isinstance(getattr(b, "se", None), nn.Identity)]
    model = chanzoo.create_model("mobilenetv2_100", attn="se", num_classes=3).eval()
    where = placed(model, chanzoo.channel.se.SqueezeExcite)
    assert sorted(where) == sorted(f"{n}.se" for n in blocks)
    # each module acts on its block's expanded width: conv_pw's output, or conv_dw's in the first (DS) block
    for name, module in where.items():
        block = model.get_submodule(name.rsplit(".", 1)[0])
        width = (block.conv_pw if hasattr(block, "conv_pwl") else block.conv_dw).out_channels
        assert module.fc1.in_channels == width
    assert model(images).shape == (2, 3)


def test_per_stage_kwargs_in_native_placed_slots() -> None:
    model = chanzoo.create_model("mobilenetv3_large_100", attn="eca", attn_kwargs={"kernel_size": [3, 3, 5, 5, 7]})
    kernels = {int(name.split(".")[1]): m.kernel_size for name, m in placed(model, EfficientChannelAttention).items()}
    # feature_info stages end at blocks 0, 1, 2, 4, 6: blocks.3 belongs to the stage ending at blocks.4, blocks.5 to
    # the one ending at blocks.6; SE (so ECA) sits in blocks 2, 4 and 5 of MobileNetV3-Large
    assert [f["module"] for f in model.feature_info] == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]
    assert kernels == {2: 5, 4: 5, 5: 7}


def test_per_stage_kwargs_with_stage_insertion() -> None:
    model = chanzoo.create_model("small_cnn", attn="eca", attn_position="stage", attn_kwargs={"kernel_size": [3, 5, 7]})
    assert [m.kernel_size for m in placed(model, EfficientChannelAttention).values()] == [3, 5, 7]


def test_per_stage_list_of_the_wrong_length_is_named() -> None:
    with pytest.raises(ValueError, match=r"attn_kwargs\['kernel_size'\]=\[3, 5, 7\] gives 3 values.*resnet18 has 4 "
                                         r"stages \['layer1', 'layer2', 'layer3', 'layer4'\]"):
        chanzoo.create_model("resnet18", attn="eca", attn_kwargs={"kernel_size": [3, 5, 7]})


def test_official_ecanet_release_with_per_stage_kernels_loads(tmp_path: Path, images: torch.Tensor) -> None:
    # An ECA-Net release in the official layout (DataParallel 'module.' prefix, ECA at layerX.Y.eca, kernels 3,3,5,7
    # per stage as in eca_resnet*_k3357), written from our own model, loads into resnet18 + eca with those kernels.
    kernels = [3, 3, 5, 7]
    source = chanzoo.create_model("resnet18", attn="eca", attn_kwargs={"kernel_size": kernels}).eval()
    official = {f"module.{k.replace('.se.', '.eca.')}": v for k, v in source.state_dict().items()}
    path = tmp_path / "eca_resnet18_k3357.pth.tar"
    torch.save({"state_dict": official}, path)
    loaded = chanzoo.create_model("resnet18", attn="eca", attn_kwargs={"kernel_size": kernels},
                                  pretrained_file=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), source(images), rtol=0, atol=0)


def test_weights_load_after_modules_are_placed(tmp_path: Path, images: torch.Tensor) -> None:
    source = chanzoo.create_model("mobilenetv3_small_100", attn="psa_s").eval()
    path = tmp_path / "mnv3_psa.pth"
    torch.save(source.state_dict(), path)
    loaded = chanzoo.create_model("mobilenetv3_small_100", attn="psa_s", pretrained_file=str(path))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), source(images), rtol=0, atol=0)


def test_a_slot_width_the_module_cannot_take_is_named() -> None:
    with pytest.raises(ValueError, match="ELA-B needs channels divisible by its 16 GroupNorm groups, got channels=120"):
        chanzoo.create_model("mobilenetv3_small_100", attn="ela_b")


def test_token_models_allow_neither_slot_nor_stage() -> None:
    with pytest.raises(ValueError, match="vit_tiny_patch16_224 is a token model"):
        chanzoo.create_model("vit_tiny_patch16_224", attn="se", img_size=32, patch_size=16)
    with pytest.raises(ValueError, match="has no native channel-attention slot"):
        chanzoo.create_model("vit_tiny_patch16_224", attn="se", attn_position="native", img_size=32, patch_size=16)
