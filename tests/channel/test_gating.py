"""The fused pooled gating of SE, ECA and cSE: the same values and gradients as the plain expression, and in-place
scaling only where no gradient is needed and the slot allows it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chanzoo
from chanzoo.channel.gating import pooled_channel_gate, strip_channel_gate

GATED = ["se", "eca", "cse"]


def plain_gate(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The textbook expression autograd differentiates op by op."""
    if hasattr(module, "strip_gates"):  # ELA
        gate_h, gate_w = module.strip_gates(x.mean(3), x.mean(2))
        return x * gate_h[..., None] * gate_w[:, :, None]
    return x * module.channel_gate(x.mean((2, 3)))[:, :, None, None]


def grads(module: nn.Module, x: torch.Tensor, fn) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = fn(x)
    weight = torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view(out.shape)  # a non-uniform upstream grad
    (out * weight).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("name", GATED + ["ela_t", "ela_b", "ela_s", "ela_l"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(14, 14), (7, 12)])
def test_fused_backward_equals_autograd_of_the_plain_expression(features, name: str, channels_last: bool,
                                                                size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    module = chanzoo.create_channel_module(name, 64)
    x = F.interpolate(features(64, 14, batch=2), size=size, mode="bilinear", align_corners=False)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fused = grads(module, x, module)
    reference = grads(module, x, lambda t: plain_gate(module, t))
    assert len(fused) == 2 + len(list(module.parameters()))
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # fp32 sums in another order


def test_fused_gating_passes_gradcheck_in_float64() -> None:
    torch.manual_seed(0)
    eca = chanzoo.create_channel_module("eca", 8, kernel_size=3).double()
    x = torch.randn(2, 8, 3, 2, dtype=torch.float64, requires_grad=True)
    weight = eca.conv.weight

    def gated(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return pooled_channel_gate(x, lambda p: torch.sigmoid(F.conv1d(p[:, None], w, padding=1))[:, 0], [w])

    assert torch.autograd.gradcheck(gated, (x, weight), fast_mode=True)


def test_fused_strip_gating_passes_gradcheck_in_float64() -> None:
    torch.manual_seed(0)
    ela = chanzoo.create_channel_module("ela_b", 16).double()
    x = torch.randn(2, 16, 5, 3, dtype=torch.float64, requires_grad=True)
    weight, norm_weight, norm_bias = ela.con1.weight, ela.GN.weight, ela.GN.bias

    def strips(h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def gate(t: torch.Tensor) -> torch.Tensor:
            t = F.conv1d(t, weight, padding=3, groups=16)
            return torch.sigmoid(F.group_norm(t, 16, norm_weight, norm_bias))
        return gate(h), gate(w)

    def gated(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return strip_channel_gate(x, strips, params)

    assert torch.autograd.gradcheck(gated, (x, weight, norm_weight, norm_bias), fast_mode=True)


@pytest.mark.parametrize("name", GATED + ["ela_t", "ela_b", "ela_s", "ela_l"])
def test_inplace_only_without_gradients(features, name: str) -> None:
    module = chanzoo.create_channel_module(name, 64, inplace=True)
    reference = chanzoo.create_channel_module(name, 64)  # inplace=False, the default
    reference.load_state_dict(module.state_dict())
    x = features(64, 14, batch=2)
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(x, features(64, 14, batch=2))  # the default never touches its input
    # Training: the input must survive for the backward, so the module works out of place.
    trained = x.clone().requires_grad_()
    module(trained).sum().backward()
    torch.testing.assert_close(trained.detach(), x)
    # Inference: the result is written into the input's storage.
    inferred = x.clone()
    with torch.no_grad():
        out = module(inferred)
    assert out.data_ptr() == inferred.data_ptr()
    torch.testing.assert_close(out, expected)


def test_native_slots_scale_in_place_and_stage_insertion_does_not(photos: dict[str, np.ndarray]) -> None:
    resnet = chanzoo.create_model("resnet18", attn="eca", num_classes=10).eval()
    assert all(m.inplace for m in resnet.modules() if hasattr(m, "channel_gate"))
    assert not chanzoo.create_model("resnet18", attn="eca", attn_kwargs={"inplace": False}).layer1[0].se.inplace
    convnext = chanzoo.create_model("convnext_atto", attn="se")
    assert not any(m.inplace for m in convnext.modules() if hasattr(m, "channel_gate"))
    # The ResNet block never reads the slot's input again: in-place inference gives the out-of-place output.
    image = torch.from_numpy(photos["astronaut"]).permute(2, 0, 1).float()[None] / 255
    image = F.interpolate(image, size=(64, 64), mode="bilinear", antialias=True)
    with torch.no_grad():
        in_place = resnet(image)
    out_of_place = chanzoo.create_model("resnet18", attn="eca", num_classes=10, attn_kwargs={"inplace": False})
    out_of_place.load_state_dict(resnet.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(in_place, out_of_place.eval()(image))


def test_resnet_training_step_equals_timm_modules_in_the_same_slot(photos: dict[str, np.ndarray]) -> None:
    """A ResNet-18 with our ECA (fused backward) gives timm's EcaModule model's loss gradients for every weight."""
    from timm.layers import EcaModule

    images = [F.interpolate(torch.from_numpy(photos[k]).permute(2, 0, 1).float()[None] / 255, size=(64, 64),
                            mode="bilinear", antialias=True) for k in ("astronaut", "coffee", "chelsea")]
    x, labels = torch.cat(images), torch.tensor([3, 7, 1])
    # zero_init_last=False: timm's default zero gamma in each block's last norm would leave the slots without gradient
    ours = chanzoo.create_model("resnet18", attn="eca", num_classes=10, zero_init_last=False)
    theirs = chanzoo.create_model("resnet18", attn=lambda c: EcaModule(c), num_classes=10, zero_init_last=False)
    theirs.load_state_dict(ours.state_dict())
    for model in (ours, theirs):
        F.cross_entropy(model.train()(x), labels).backward()
    assert ours.layer1[0].se.conv.weight.grad.abs().max() > 0
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
