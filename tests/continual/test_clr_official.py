"""Fidelity to the official CLR code (gyhandy/Channel-wise-Lightweight-Reprogramming): its three variants' parameter
overhead on ResNet-18, its regulariser, and its task checkpoints loaded through the converter.

The official layout is rebuilt here from the official code's rules on torchvision's ResNet-18 (the official anchor):
every ``nn.Conv2d`` becomes a block with the frozen conv as ``original_block`` and a depthwise conv ``Ghos_Mod.0``
(kernel 3; 1x1 convs: none in reduced_v1, kernel 1 in reduced_v2, kernel 3 in base), the model sits under ``model.``,
and BatchNorm layers and ``fc`` keep torchvision's names."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file
from torch import nn

import chanzoo
from chanzoo.channel.clr import (
    CLRConv2d,
    l2_norm_penalty,
    load_task,
    reprogram,
    task_parameter_count,
    task_state_dict,
)
from chanzoo.continual import convert

OFFICIAL_KERNEL = {"reduced_v1": {True: None, False: 3}, "reduced_v2": {True: 1, False: 3}, "base": {True: 3, False: 3}}
RESNET18_PARAMS = 11_689_512  # torchvision's and timm's ResNet-18 with the ImageNet head


def official_kernels(model: nn.Module, variant: str) -> dict[str, int]:
    """Conv name -> kernel of its Ghos_Mod under the official rules (convs without one left out)."""
    kernels = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            k = OFFICIAL_KERNEL[variant][m.kernel_size == (1, 1)]
            if k is not None:
                kernels[name] = k
    return kernels


def official_checkpoint(variant: str, num_classes: int = 5, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A torchvision ResNet-18 task model in the official checkpoint layout, with task tensors moved away from their
    initial values (as after training). Returns the torchvision model (task BN/fc loaded) and the state dict."""
    generator = torch.Generator().manual_seed(seed)
    tv = torchvision.models.resnet18(num_classes=num_classes).eval()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(1 + 0.1 * torch.randn(m.weight.shape, generator=generator))
                m.bias.add_(0.05 * torch.randn(m.bias.shape, generator=generator))
                m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
                m.running_var.mul_(1 + 0.2 * torch.rand(m.running_var.shape, generator=generator))
    kernels = official_kernels(tv, variant)
    state = {}
    for key, value in tv.state_dict().items():
        module, _, leaf = key.rpartition(".")
        state[f"model.{module}.original_block.{leaf}" if module in kernels else f"model.{key}"] = value.clone()
    for name, k in kernels.items():
        channels = tv.get_submodule(name).out_channels
        ghost = torch.zeros(channels, 1, k, k)
        ghost[:, 0, k // 2, k // 2] = 1.0  # the official Dirac init, then a trained-looking change
        state[f"model.{name}.Ghos_Mod.0.weight"] = ghost + 0.05 * torch.randn(ghost.shape, generator=generator)
    return tv, state


def official_forward(tv: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The official block's forward (``Ghos_Mod(original_block(x))``) on torchvision's model, through hooks."""
    hooks = []
    for key, weight in state.items():
        if key.endswith(".Ghos_Mod.0.weight"):
            name = key[len("model."): -len(".Ghos_Mod.0.weight")]

            def ghost(_m: nn.Module, _inp: tuple, out: torch.Tensor, w: torch.Tensor = weight) -> torch.Tensor:
                return F.conv2d(out, w, padding=w.shape[-1] // 2, groups=w.shape[0])

            hooks.append(tv.get_submodule(name).register_forward_hook(ghost))
    try:
        with torch.no_grad():
            return tv(x)
    finally:
        for hook in hooks:
            hook.remove()


@pytest.fixture(scope="module")
def photo_batch(photos: dict[str, np.ndarray]) -> torch.Tensor:
    """Two real photos at 64x64, ImageNet-normalised."""
    x = torch.cat([
        F.interpolate(torch.from_numpy(photos[k]).permute(2, 0, 1).float()[None] / 255, size=(64, 64),
                      mode="bilinear", antialias=True)
        for k in ("astronaut", "chelsea")
    ])
    return (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]


@pytest.mark.parametrize("variant, percent", [("reduced_v1", 0.383), ("reduced_v2", 0.390), ("base", 0.452)])
def test_resnet18_overhead_equals_the_official_layout(variant: str, percent: float) -> None:
    tv = torchvision.models.resnet18()
    official = sum(tv.get_submodule(n).out_channels * k * k for n, k in official_kernels(tv, variant).items())
    official += sum(m.weight.numel() + m.bias.numel() for m in tv.modules() if isinstance(m, nn.BatchNorm2d))
    model = chanzoo.create_model("resnet18")
    assert sum(p.numel() for p in model.parameters()) == RESNET18_PARAMS
    reprogram(model, variant=variant)
    assert task_parameter_count(model) == official
    assert round(100 * official / RESNET18_PARAMS, 3) == percent  # reduced_v1: 44,736 = 0.383% (35,136 CLR + 9,600 BN)
    pointwise = [m for m in model.modules() if isinstance(m, CLRConv2d) and m.anchor.kernel_size == (1, 1)]
    assert len(pointwise) == {"reduced_v1": 0, "reduced_v2": 3, "base": 3}[variant]
    assert all(m.reprogram.kernel_size == ((1, 1) if variant == "reduced_v2" else (3, 3)) for m in pointwise)


def test_regularizer_is_the_official_sum_of_l2_norms() -> None:
    model = reprogram(chanzoo.create_model("resnet18", num_classes=4))
    with torch.no_grad():
        model.layer1[0].bn1.bias.zero_()  # a zero tensor: the official code skips it
    trainable = [p for p in model.parameters() if p.requires_grad]
    reference = sum(torch.sqrt(torch.sum(torch.square(p))) for p in trainable if torch.sum(p * p) > 0)
    penalty = l2_norm_penalty(model.parameters())
    torch.testing.assert_close(penalty, 1e-5 * reference)
    penalty.backward()
    fc = model.fc.weight
    torch.testing.assert_close(fc.grad, 1e-5 * fc.detach() / fc.detach().norm())
    assert torch.count_nonzero(model.layer1[0].bn1.bias.grad) == 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    with pytest.raises(ValueError, match="no trainable tensor"):
        l2_norm_penalty(model.layer1[0].conv1.anchor.parameters())


@pytest.mark.parametrize("variant", ["reduced_v1", "reduced_v2", "base"])
def test_official_checkpoint_loads_through_the_converter(
    variant: str, photo_batch: torch.Tensor, tmp_path: Path
) -> None:
    tv, state = official_checkpoint(variant)
    expected = official_forward(tv, state, photo_batch)
    torch.save(state, tmp_path / "official.pth")

    model = convert.load_official_checkpoint(chanzoo.create_model("resnet18"), str(tmp_path / "official.pth"))
    assert convert.official_variant(convert.convert_official_state_dict(state)) == (variant, 3)
    assert sum(isinstance(m, CLRConv2d) for m in model.modules()) == len(official_kernels(tv, variant))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(photo_batch), expected)

    # the CLI writes the task's own tensors, which load_task puts on an anchor of the same weights
    convert.main([str(tmp_path / "official.pth"), str(tmp_path / "task.safetensors")])
    saved = load_file(str(tmp_path / "task.safetensors"))
    assert set(saved) == set(task_state_dict(model)) and not any(".anchor." in k for k in saved)
    fresh = chanzoo.create_model("resnet18")
    fresh.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}, strict=False)
    load_task(reprogram(fresh, variant=variant), tmp_path / "task.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(photo_batch), expected)


def test_converter_refuses_a_foreign_anchor_and_a_plain_state_dict() -> None:
    tv, state = official_checkpoint("reduced_v1")
    other = reprogram(chanzoo.create_model("resnet18", num_classes=5))  # random anchor weights, not the checkpoint's
    with pytest.raises(ValueError, match="the checkpoint's anchor differs from the model's in 20 tensors"):
        convert.load_official_checkpoint(other, state, load_anchor=False)
    with pytest.raises(ValueError, match="no `Ghos_Mod.0` tensor: it is not an official CLR checkpoint"):
        convert.convert_official_state_dict(tv.state_dict())
    with pytest.raises(ValueError, match="CLR variant must be one of .* got 'reduced_v3'"):
        reprogram(chanzoo.create_model("resnet18"), variant="reduced_v3")
