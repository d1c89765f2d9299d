"""Channel modules: parameter counts (papers / official code), outputs vs reference computations and timm, and the
generic contract (shape, gradients, channels-last, autocast, torch.compile, errors)."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.layers import EcaModule, SEModule
from timm.layers.coord_attn import EfficientLocalAttn
from torch import nn

import chanzoo
from chanzoo.channel.eca import eca_kernel_size

MODULES = ["se", "eca", "ela_t", "ela_b", "ela_s", "ela_l", "psa_p", "psa_s", "cse", "sse", "scse"]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_every_module_is_registered() -> None:
    assert set(MODULES) <= set(chanzoo.list_channel_modules())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # ELA at C=256, the paper's Table: T/B/S/L.
        ("ela_t", 1792), ("ela_b", 2304), ("ela_s", 10752), ("ela_l", 14848),
        # SE with r=16: 2 * C * C/16 weights + C/16 + C biases.
        ("se", 2 * 256 * 16 + 16 + 256),
        # ECA: k weights, k = 5 for C=256 by the adaptive rule.
        ("eca", 5),
        # scSE with r=2 (the authors' release): cSE 2 * C * C/2 + C/2 + C, sSE C + 1.
        ("cse", 2 * 256 * 128 + 128 + 256), ("sse", 257), ("scse", 2 * 256 * 128 + 128 + 256 + 257),
        # PSA: the counts of the official PSA_p / PSA_s (DeLightCMU/PSA) built with inplanes = planes = 256.
        ("psa_p", 131328), ("psa_s", 111200),
    ],
)
def test_parameter_counts_at_256_channels(name: str, expected: int) -> None:
    assert n_params(chanzoo.create_channel_module(name, 256)) == expected


def test_se_counts_follow_the_reduction() -> None:
    for reduction, hidden in [(4, 64), (8, 32), (16, 16)]:
        se = chanzoo.create_channel_module("se", 256, reduction=reduction)
        assert n_params(se) == 2 * 256 * hidden + hidden + 256


def test_eca_adaptive_kernel_follows_the_paper() -> None:
    # k = |log2(C)/2 + 1/2|_odd: C=64 -> 3.5 -> 3, C=256 -> 4.5 -> 5, C=512 -> 5, C=2048 -> 6 -> 7.
    assert [eca_kernel_size(c) for c in (64, 256, 512, 1024, 2048)] == [3, 5, 5, 5, 7]


def test_eca_kernel_list_on_resnet50_adds_80_parameters() -> None:
    # 3 blocks x 3 + 4 x 5 + 6 x 5 + 3 x 7 = 80 (ECA-Net's released eca_resnet50_k3557).
    plain = n_params(chanzoo.create_model("resnet50"))
    eca = chanzoo.create_model("resnet50", attn="eca", attn_kwargs={"kernel_size": [3, 5, 5, 7]})
    assert n_params(eca) - plain == 80
    kernels = {name.split(".")[0]: m.kernel_size for name, m in eca.named_modules() if hasattr(m, "kernel_size")
               and type(m).__name__ == "EfficientChannelAttention"}
    assert kernels == {"layer1": 3, "layer2": 5, "layer3": 5, "layer4": 7}


@pytest.mark.parametrize("size", [(9, 9), (7, 12)])
@pytest.mark.parametrize("name", ["ela_t", "ela_b", "ela_s", "ela_l"])
def test_ela_matches_its_formula(features, name: str, size: tuple[int, int]) -> None:
    ela = chanzoo.create_channel_module(name, 64)
    nn.init.normal_(ela.GN.weight, 1.0, 0.3)
    nn.init.normal_(ela.GN.bias, 0.0, 0.3)
    x = F.interpolate(features(64, 12), size=size, mode="bilinear")

    def gate(strip: torch.Tensor) -> torch.Tensor:  # one strip through the shared conv + GroupNorm + sigmoid
        conv = F.conv1d(strip, ela.con1.weight, padding=ela.con1.kernel_size[0] // 2, groups=ela.con1.groups)
        return torch.sigmoid(F.group_norm(conv, ela.GN.num_groups, ela.GN.weight, ela.GN.bias, ela.GN.eps))

    expected = x * gate(x.mean(3))[..., None] * gate(x.mean(2))[:, :, None, :]
    torch.testing.assert_close(ela(x), expected)


def test_ela_b_equals_timm_ela_with_the_same_norm_and_shared_weights(features) -> None:
    ours = chanzoo.create_channel_module("ela_b", 64)
    nn.init.normal_(ours.GN.weight, 1.0, 0.3)
    theirs = EfficientLocalAttn(64, kernel_size=7, act_layer=nn.Identity, norm_layer=partial(nn.GroupNorm, 16))
    with torch.no_grad():
        theirs.conv_h.weight.copy_(ours.con1.weight.view(64, 1, 7, 1))
        theirs.conv_w.weight.copy_(ours.con1.weight.view(64, 1, 1, 7))
        theirs.norm_h.load_state_dict(ours.GN.state_dict())
        theirs.norm_w.load_state_dict(ours.GN.state_dict())
    x = features(64, 14)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("kernel_size", [None, 5])
def test_eca_equals_timm(features, kernel_size: int | None) -> None:
    ours = chanzoo.create_channel_module("eca", 64, kernel_size=kernel_size)
    # timm derives the kernel from `channels` when given, else takes kernel_size as is.
    theirs = EcaModule(64) if kernel_size is None else EcaModule(None, kernel_size=kernel_size)
    nn.init.normal_(ours.conv.weight)
    theirs.load_state_dict(ours.state_dict())
    x = features(64, 8)
    torch.testing.assert_close(ours(x), theirs(x))


def test_se_equals_timm(features) -> None:
    ours = chanzoo.create_channel_module("se", 64)
    theirs = SEModule(64, rd_channels=4)
    theirs.load_state_dict(ours.state_dict())
    x = features(64, 8)
    torch.testing.assert_close(ours(x), theirs(x))


def test_psa_keys_follow_the_official_release() -> None:
    p = chanzoo.create_channel_module("psa_p", 64).state_dict()
    s = chanzoo.create_channel_module("psa_s", 64).state_dict()
    branches = {"conv_q_right.weight", "conv_v_right.weight", "conv_q_left.weight", "conv_v_left.weight"}
    assert set(p) == branches | {"conv_up.weight"}
    assert set(s) == branches | {f"conv_up.{i}.{w}" for i in (0, 1, 3) for w in ("weight", "bias")}
    assert tuple(s["conv_up.1.weight"].shape) == (8, 1, 1)  # LayerNorm([C/8, 1, 1]) at C=64


@pytest.mark.parametrize("name", ["psa_p", "psa_s"])
def test_psa_matches_the_official_equations(features, name: str) -> None:
    psa = chanzoo.create_channel_module(name, 32)
    x = features(32, 6)
    b, c, h, w = x.shape
    flat = x.flatten(2)  # (B, C, HW)
    wq_r, wv_r = psa.conv_q_right.weight.flatten(1), psa.conv_v_right.weight.flatten(1)
    wq_l, wv_l = psa.conv_q_left.weight.flatten(1), psa.conv_v_left.weight.flatten(1)

    def channel_gate(t: torch.Tensor) -> torch.Tensor:
        attn = torch.softmax(torch.einsum("oc,bcn->bn", wq_r, t), dim=1)  # softmax over positions
        pooled = torch.einsum("vc,bcn,bn->bv", wv_r, t, attn)[..., None, None]
        return torch.sigmoid(psa.conv_up(pooled)).flatten(1)[..., None]  # (B, C, 1)

    if name == "psa_p":
        query = torch.einsum("qc,bcn->bq", wq_l, flat) / (h * w)
        spatial = torch.softmax(torch.einsum("bq,qc,bcn->bn", query, wv_l, flat), dim=1)
        expected = flat * channel_gate(flat) + flat * torch.sigmoid(spatial)[:, None]
    else:
        z = flat * channel_gate(flat)
        query = torch.einsum("qc,bcn->bq", wq_l, z) / (h * w)
        values = torch.softmax(torch.einsum("vc,bcn->bvn", wv_l, z), dim=2)
        expected = z * torch.sigmoid(torch.einsum("bq,bqn->bn", query, values))[:, None]
    torch.testing.assert_close(psa(x), expected.view(b, c, h, w))


@pytest.mark.parametrize("aggregation", ["max", "add", "mul"])
def test_scse_matches_its_formula(features, aggregation: str) -> None:
    scse = chanzoo.create_channel_module("scse", 32, aggregation=aggregation)
    assert set(scse.state_dict()) == {"cSE.fc1.weight", "cSE.fc1.bias", "cSE.fc2.weight", "cSE.fc2.bias",
                                      "sSE.conv.weight", "sSE.conv.bias"}  # the authors' release
    x = features(32, 8)
    hidden = torch.relu(F.linear(x.mean((2, 3)), scse.cSE.fc1.weight, scse.cSE.fc1.bias))
    cse = x * torch.sigmoid(F.linear(hidden, scse.cSE.fc2.weight, scse.cSE.fc2.bias))[..., None, None]
    sse = x * torch.sigmoid(F.conv2d(x, scse.sSE.conv.weight, scse.sSE.conv.bias))
    expected = {"max": torch.maximum(cse, sse), "add": cse + sse, "mul": cse * sse}[aggregation]
    torch.testing.assert_close(scse(x), expected)


@pytest.mark.parametrize("name", MODULES)
def test_shape_gradients_and_channels_last(features, name: str) -> None:
    module = chanzoo.create_channel_module(name, 64)
    x = features(64, 10).requires_grad_(True)
    y = module(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for param_name, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
    x_cl = x.detach().to(memory_format=torch.channels_last)
    torch.testing.assert_close(module(x_cl), module(x.detach()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", MODULES)
def test_autocast(features, name: str, dtype: torch.dtype) -> None:
    module = chanzoo.create_channel_module(name, 64)
    x = features(64, 10)
    with torch.autocast("cpu", dtype=dtype):
        y = module(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), module(x), atol=0.08, rtol=0.05)


def test_torch_compile_traces_every_module_without_graph_breaks(features) -> None:
    # One chain of every module, captured whole (fullgraph) with forward and backward through AOTAutograd; the
    # aot_eager backend skips inductor's C++ code generation, which takes minutes on this CPU for eleven modules.
    chain = nn.Sequential(*(chanzoo.create_channel_module(name, 32) for name in MODULES))
    compiled = torch.compile(chain, backend="aot_eager", fullgraph=True)
    x = features(32, 6)
    x_eager, x_compiled = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_eager, y_compiled = chain(x_eager), compiled(x_compiled)
    torch.testing.assert_close(y_compiled, y_eager)
    y_eager.sum().backward()
    y_compiled.sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


def test_torch_compile_default_backend(features) -> None:
    module = chanzoo.create_channel_module("ela_b", 32)
    x = features(32, 6)
    torch.testing.assert_close(torch.compile(module, fullgraph=True)(x), module(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "channels", "kwargs", "message"),
    [
        ("ela_t", 48, {}, r"ELA-T needs channels divisible by its 32 GroupNorm groups, got channels=48"),
        ("ela_b", 40, {}, r"ELA-B needs channels divisible by its 16 GroupNorm groups, got channels=40"),
        ("ela_s", 48, {"num_groups": 4, "group_channels": 32}, r"divisible by its 32 input channels per conv group"),
        ("ela_b", 64, {"variant": "X"}, r"variant must be one of \['B', 'L', 'S', 'T'\], got 'X'"),
        ("ela_b", 64, {"kernel_size": 4}, r"kernel_size must be a positive odd int, got 4"),
        ("eca", 64, {"kernel_size": 4}, r"ECA kernel_size must be a positive odd int, got 4"),
        ("eca", 64, {"kernel_size": [3, 5]}, r"got \[3, 5\] \(one kernel per stage"),
        ("psa_s", 6, {}, r"psa_s needs channels >= 8, got channels=6"),
        ("psa_p", 1, {}, r"psa_p needs channels >= 2, got channels=1"),
        ("cse", 1, {}, r"cSE needs channels >= reduction >= 1, got channels=1, reduction=2"),
        ("scse", 64, {"aggregation": "concat"}, r"aggregation must be one of \('max', 'add', 'mul'\), got 'concat'"),
    ],
)
def test_bad_arguments_name_the_constraint(name: str, channels: int, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        chanzoo.create_channel_module(name, channels, **kwargs)
