"""timm's model contract, checked on every model chanzoo registers.

The model list is read from timm's registry (every name whose entry point lives under ``chanzoo.models``), so a new
family is checked without anyone writing a test for it. The checks mirror timm's own ``tests/test_models.py``:
default cfgs (first conv and classifier in the state dict, mean/std, input sizes, ``num_features``,
``head_hidden_size``, ``output_fmt``), forward and backward (every parameter gets a gradient), ``reset_classifier``
and ``num_classes=0``, ``forward_head(pre_logits=True)``, ``forward_intermediates`` and ``features_only``, other
input channel counts, ``torch.fx`` tracing (plain ``symbolic_trace`` and timm's feature-extraction helpers) and
``torch.export``. Image-to-image models (a ``scale`` attribute, ``num_classes=0``, an image out) get the
image-shaped form of each check.

Every registered name gets the cfg/attribute checks (built on the meta device, so even the base variants cost
nothing) and a forward and backward pass at its smallest input; the remaining checks run on the smallest member of
each family. Families without a small registered member (RGT, Histoformer) run with fewer blocks per stage
(``FAST_KWARGS``); their cfg checks use the registered depth.
"""
from __future__ import annotations

import math
from functools import cache
from typing import Any

import numpy as np
import pytest
import timm
import torch
from skimage import data as skdata
from skimage.transform import resize
from timm.layers import create_feature_extractor, get_graph_node_names

import chanzoo  # noqa: F401  (registers chanzoo's models with timm)


def _family(name: str) -> str:
    """The chanzoo module that registers ``name`` ('' for a timm model)."""
    module = timm.models.model_entrypoint(name).__module__
    return module.rsplit(".", 1)[-1] if module.startswith("chanzoo.models.") else ""


CHANZOO_MODELS = sorted(name for name in timm.list_models() if _family(name))
# Families without a small registered member: fewer blocks for the checks beyond forward/backward (two RGT groups
# of two blocks still hold shifted and unshifted windows and RG-SA; one Histoformer block per level every level).
FAST_KWARGS: dict[str, dict[str, Any]] = {
    "rgt": dict(depth=(2, 2)),
    "histoformer": dict(num_blocks=(1, 1, 1, 1), num_refinement_blocks=1),
}


def _param_count(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name).parameters())


def _smallest_of_each_family() -> list[str]:
    smallest: dict[str, tuple[int, str]] = {}
    for name in CHANZOO_MODELS:
        count = _param_count(name)
        family = _family(name)
        if family not in smallest or count < smallest[family][0]:
            smallest[family] = (count, name)
    return sorted(name for _, name in smallest.values())


REPRESENTATIVES = _smallest_of_each_family()


def _is_image_to_image(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "scale", None), int) and model.num_classes == 0


def _is_token_model(model: torch.nn.Module) -> bool:
    return getattr(model, "num_prefix_tokens", None) is not None


def _probe_side(model: torch.nn.Module) -> int:
    """The smallest square side the model takes everywhere: the declared ``min_input_size``, else the coarsest
    feature stride (one output pixel per stage at least)."""
    cfg = model.pretrained_cfg
    if cfg.get("min_input_size"):
        return max(cfg["min_input_size"][1:])
    return max(info["reduction"] for info in model.feature_info)


@cache
def _photo(channels: int, side: int) -> torch.Tensor:
    """(2, channels, side, side) in [0, 1]: two skimage photos, their RGB planes and grey levels as channels."""
    images = []
    for photo in (skdata.astronaut(), skdata.chelsea()):
        rgb = resize(photo.astype(np.float32) / 255.0, (side, side), anti_aliasing=True)
        planes = [rgb[..., 0], rgb[..., 1], rgb[..., 2], rgb.mean(-1), rgb.max(-1)]
        images.append(np.stack([planes[i % len(planes)] for i in range(channels)]))
    return torch.tensor(np.stack(images), dtype=torch.float32)


def _create(name: str, fast: bool = False, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = FAST_KWARGS.get(_family(name), {}) if fast else {}
    return timm.create_model(name, **{**extra, **kwargs})


def _input(model: torch.nn.Module, side: int | None = None) -> torch.Tensor:
    return _photo(model.in_chans, side or _probe_side(model))


def _spatial_axes(fmt: str) -> tuple[int, int]:
    return (1, 2) if fmt == "NHWC" else (2, 3)


def _channel_axis(fmt: str) -> int:
    return 3 if fmt == "NHWC" else 1


# ----------------------------------------------------------------------------------------------------- every name
def test_registry_lists_every_family() -> None:
    families = {_family(name) for name in CHANZOO_MODELS}
    assert {"small_cnn", "channelvit", "mambamixer", "rgt", "histoformer"} <= families
    assert len(REPRESENTATIVES) == len(families)


@pytest.mark.parametrize("name", CHANZOO_MODELS)
def test_default_cfg(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    cfg = model.pretrained_cfg
    keys = model.state_dict().keys()
    assert cfg["architecture"] == name and cfg["tag"], "cfgs are named arch.tag"
    for conv in (cfg["first_conv"],) if isinstance(cfg["first_conv"], str) else cfg["first_conv"]:
        assert conv + ".weight" in keys, f"first_conv {conv!r} is not in the state dict"
    if cfg["num_classes"]:
        assert cfg["classifier"] + ".weight" in keys, f"classifier {cfg['classifier']!r} is not in the state dict"
        assert model.get_classifier() is model.get_submodule(cfg["classifier"])
    channels, height, width = cfg["input_size"]
    assert channels == model.in_chans and len(cfg["mean"]) == len(cfg["std"]) == channels
    assert all(s > 0 for s in cfg["std"])
    if cfg.get("min_input_size"):
        assert len(cfg["min_input_size"]) == 3 and cfg["min_input_size"][0] == channels
        assert all(m <= s for m, s in zip(cfg["min_input_size"][1:], (height, width)))
    assert model.num_classes == cfg["num_classes"]
    assert model.num_features > 0 and model.head_hidden_size > 0
    assert getattr(model, "output_fmt", "NCHW") in ("NCHW", "NHWC")
    assert cfg.get("license"), "every cfg states the licence of its weights"
    modules = dict(model.named_modules())
    for info in model.feature_info:
        assert info["module"] in modules and info["num_chs"] > 0 and info["reduction"] >= 1
    if cfg.get("pool_size"):  # the unpooled feature map at the cfg's input size
        stride = model.feature_info[-1]["reduction"]
        assert tuple(cfg["pool_size"]) == (math.ceil(height / stride), math.ceil(width / stride))


@pytest.mark.parametrize("name", CHANZOO_MODELS)
def test_forward_backward(name: str) -> None:
    """timm's forward and backward tests at the smallest input: the right shape, finite, and every parameter gets
    a gradient."""
    classes = {} if _family(name) in ("rgt", "histoformer") else {"num_classes": 7}
    model = _create(name, fast=True, **classes)
    x = _input(model)
    model.eval()
    with torch.no_grad():
        out = model(x)
    if _is_image_to_image(model):
        assert out.shape == (2, model.in_chans, model.scale * x.shape[2], model.scale * x.shape[3])
    else:
        assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    model.train()
    model(x).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", CHANZOO_MODELS)
def test_fx_traces_every_name(name: str) -> None:
    """Every registered model traces with torch.fx (graph only, so the meta device serves); the smallest of each
    family also runs its traced graph below."""
    with torch.device("meta"):
        model = timm.create_model(name).eval()
    graph = torch.fx.symbolic_trace(model).graph
    assert any(node.op == "call_module" for node in graph.nodes) and list(graph.nodes)[-1].op == "output"


# ---------------------------------------------------------------------------------- the smallest of each family
@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_head_contract(name: str) -> None:
    """forward_features, forward_head(pre_logits=True), reset_classifier and num_classes=0 as timm's tests read them."""
    model = _create(name, fast=True).eval()
    x = _input(model)
    side = x.shape[-1]
    fmt = getattr(model, "output_fmt", "NCHW")
    with torch.no_grad():
        features = model.forward_features(x)
        pre = model.forward_head(features, pre_logits=True)
    if _is_image_to_image(model):
        assert features.shape == (2, model.num_features, side, side)
        assert pre.shape[:2] == (2, model.head_hidden_size) and pre.shape[-1] == model.scale * side
        model.reset_classifier(0)
        with pytest.raises(ValueError, match="num_classes must stay 0, got 3"):
            model.reset_classifier(3)
        return
    if _is_token_model(model):
        assert features.shape[0] == 2 and features.shape[-1] == model.num_features
    else:
        stride = model.feature_info[-1]["reduction"]
        assert features.shape[_channel_axis(fmt)] == model.num_features
        assert tuple(features.shape[a] for a in _spatial_axes(fmt)) == (math.ceil(side / stride),) * 2
    assert pre.shape == (2, model.head_hidden_size)
    model.reset_classifier(0)
    with torch.no_grad():
        pooled = model(x)
    assert pooled.shape == pre.shape and torch.allclose(pooled, pre)
    model.reset_classifier(5)
    assert model.num_classes == 5 and model.get_classifier().out_features == 5
    if not _is_token_model(model):
        model.reset_classifier(0, "")
        with torch.no_grad():
            unpooled = model(x)
        assert unpooled.ndim == 4 and unpooled.shape[_channel_axis(fmt)] == model.num_features
    headless = _create(name, fast=True, num_classes=0).eval()
    with torch.no_grad():
        assert headless(x).shape == (2, headless.num_features)


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_forward_intermediates(name: str) -> None:
    model = _create(name, fast=True).eval()
    x = _input(model)
    side = x.shape[-1]
    last = len(model.feature_info) - 1
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        features = model.forward_features(x)
        picked = model.forward_intermediates(x, [0, last], intermediates_only=True)  # positional indices, as timm
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
    assert torch.allclose(final, features, atol=1e-6)
    assert len(intermediates) == len(model.feature_info)
    for info, feature in zip(model.feature_info, intermediates):
        assert feature.shape[:2] == (2, info["num_chs"])
        assert all(s <= math.ceil(side / info["reduction"]) + 1 for s in feature.shape[2:])
    assert len(picked) == 2
    assert torch.allclose(picked[0], intermediates[0]) and torch.allclose(picked[1], intermediates[-1])
    assert len(normed) == 1 and normed[0].shape == intermediates[-1].shape


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_features_only(name: str) -> None:
    model = _create(name, fast=True, features_only=True).eval()
    x = _photo(model.pretrained_cfg["input_size"][0], _probe_side(_create(name, fast=True)))
    with torch.no_grad():
        outputs = model(x)
    assert [o.shape[1] for o in outputs] == model.feature_info.channels()
    assert all(o.shape[0] == 2 and torch.isfinite(o).all() for o in outputs)


@pytest.mark.parametrize("chans", [1, 5])
@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_other_input_channels(name: str, chans: int) -> None:
    model = _create(name, fast=True, in_chans=chans).eval()
    x = _input(model)
    assert x.shape[1] == chans
    with torch.no_grad():
        out = model(x)
    if _is_image_to_image(model):
        assert out.shape[:2] == (2, chans)
    else:
        assert out.shape == (2, model.num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing the model in eval mode")  # torchvision's
@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_fx_trace(name: str) -> None:
    """torch.fx: plain symbolic_trace and timm's feature extractor (timm's fx tests) give the eager outputs exactly,
    the traced graph still raises the model's errors, and a graph traced in training mode back-propagates."""
    model = _create(name, fast=True).eval()
    x = _input(model)
    traced = torch.fx.symbolic_trace(model)
    train_nodes, eval_nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(traced(x), expected)
        assert torch.equal(next(iter(extractor(x).values())), expected)
    with pytest.raises(ValueError, match=f"\\b{model.in_chans}\\b"):
        traced(_photo(model.in_chans + 1, x.shape[-1]))
    model.train()
    train_graph = torch.fx.symbolic_trace(model)
    train_graph(x).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_torch_export(name: str) -> None:
    model = _create(name, fast=True).eval()
    x = _input(model)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        expected = model(x)
        exported = program.module()(x)
    assert exported.shape == expected.shape
    assert torch.allclose(exported, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # exporting leaves nothing behind: eager results are unchanged
        assert torch.equal(model(x), expected)
