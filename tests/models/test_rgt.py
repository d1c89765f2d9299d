"""RGT (Chen et al., ICLR 2024): parameter counts, official key layout, any input size, attention vs a reference."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from skimage import data

import chanzoo
from chanzoo.models.rgt import RG_SA, RGT, WindowAttention, _is_shifted, _recursive_reduction, _shift_mask

# Exact counts of the official basicsr/archs/rgt_arch.py (zhengchen1999/RGT) built with the released test ymls;
# the README/paper round them to 10.05/10.24/10.20M and 13.22/13.40/13.37M.
OFFICIAL_PARAMS = {
    "rgt_s_x2": 10_051_055,
    "rgt_s_x3": 10_235_695,
    "rgt_s_x4": 10_198_767,
    "rgt_x2": 13_217_831,
    "rgt_x3": 13_402_471,
    "rgt_x4": 13_365_543,
}
TINY = dict(embed_dim=32, num_heads=2, depth=(2, 2), drop_path_rate=0.0)


def _photo(height: int, width: int, top: int = 100, left: int = 180) -> torch.Tensor:
    image = torch.from_numpy(data.astronaut()[top : top + height, left : left + width]).permute(2, 0, 1)
    return image[None].float() / 255.0


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_count_equals_official(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]
    assert model.pretrained_cfg["num_classes"] == 0 and model.num_classes == 0
    assert model.pretrained_cfg["license"] == "apache-2.0"
    assert f"scale={int(name[-1])}" in model.pretrained_cfg["notes"]


def _official_state_dict(model: RGT) -> dict[str, torch.Tensor]:
    """Our weights in the official layout: BasicSR's ``params`` plus the buffers the official code saves."""
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, WindowAttention):
            state[f"{name}.rpe_biases"] = module.rpe_biases.clone()
            state[f"{name}.relative_position_index"] = module.relative_position_index.clone()
    for g, group in enumerate(model.layers):
        for b, block in enumerate(group.blocks):
            if b % 2 == 0 and _is_shifted(g, b):
                short, long = model.split_size
                state[f"layers.{g}.blocks.{b}.attn.attn_mask_0"] = _shift_mask(64, 64, short, long, short // 2, long // 2)
                state[f"layers.{g}.blocks.{b}.attn.attn_mask_1"] = _shift_mask(64, 64, long, short, long // 2, short // 2)
    return {"params": state}


def test_official_layout_counts_match_the_official_key_set() -> None:
    """RGT-S x2's official state dict has 1520 entries: our 1430 parameters/LN stats + 90 saved buffers."""
    with torch.device("meta"):
        model = timm.create_model("rgt_s_x2")
    assert len(model.state_dict()) == 1430
    assert len(_official_state_dict(model)["params"]) == 1520
    shifted = [(g, b) for g in range(6) for b in range(0, 6, 2) if _is_shifted(g, b)]
    assert shifted == [(0, 2), (1, 0), (1, 4), (2, 2), (3, 0), (3, 4), (4, 2), (5, 0), (5, 4)]


def test_official_checkpoint_loads_through_create_model(tmp_path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("rgt_s_x3", **TINY).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "RGT_tiny_x3.pth"
    torch.save(_official_state_dict(source), path)
    loaded = chanzoo.create_model("rgt_s_x3", pretrained_file=str(path), **TINY).eval()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    x = _photo(20, 27)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))


def test_checkpoint_of_other_shape_is_refused_by_name(tmp_path) -> None:
    source = timm.create_model("rgt_s_x2", **TINY)
    path = tmp_path / "x2.pth"
    torch.save(_official_state_dict(source), path)
    with pytest.raises(ValueError, match="do not fit 'rgt_s_x4'"):
        chanzoo.create_model("rgt_s_x4", pretrained_file=str(path), **TINY)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("size", [(7, 9), (17, 40), (33, 65)])
def test_output_is_scale_times_input_for_odd_sizes(scale: int, size: tuple[int, int]) -> None:
    model = RGT(upscale=scale, **TINY).eval()
    with torch.no_grad():
        out = model(_photo(*size))
    assert out.shape == (1, 3, size[0] * scale, size[1] * scale)
    assert torch.isfinite(out).all()


def test_training_mode_takes_small_patches_and_backpropagates() -> None:
    model = RGT(upscale=2, **TINY).train()
    out = model(torch.cat([_photo(12, 12), _photo(12, 12, 300, 50)]))
    assert out.shape == (2, 3, 24, 24)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_min_input_size_pads_only_where_rg_sa_needs_it() -> None:
    """Eval needs H, W >= 16 and the short side >= 4**T, T = max(2, int(log4(long side // 16))) recursions."""
    model = RGT(upscale=2, **TINY).eval()
    assert model.min_input_size(40, 64) == (40, 64)
    assert model.min_input_size(5, 70) == (16, 70)
    assert model.min_input_size(16, 600) == (16, 600)  # log4(600 // 16) = 2.6 -> 2 recursions: 16 suffices
    assert model.min_input_size(20, 1100) == (64, 1100)  # 3 recursions need 64 rows


@pytest.mark.parametrize("shifted", [True, False])
@pytest.mark.parametrize("height, width, batch", [(8, 16, 2), (12, 24, 2), (16, 8, 1)])
def test_window_attention_equals_reference_softmax(height: int, width: int, batch: int, shifted: bool) -> None:
    """Our SDPA window attention equals softmax(q k^T * d^-0.5 + bias + mask) v computed window by window; 3x3 and
    4x1 window grids check that only the last window row and column need the shift mask."""
    torch.manual_seed(0)
    attn = WindowAttention(dim=16, num_heads=2, window_h=4, window_w=8).eval()
    qkv = torch.randn(3, batch, height * width, 16)
    mask = _shift_mask(height, width, 4, 8, 2, 4) if shifted else torch.zeros(height * width // 32, 32, 32)
    out = attn(qkv, height, width, mask if shifted else None)

    tokens = 32
    bias = attn.pos(attn.rpe_biases)[attn.relative_position_index.view(-1)].view(tokens, tokens, 2).permute(2, 0, 1)
    grid = qkv.view(3, batch, height, width, 16)
    expected = torch.zeros(batch, height, width, 16)
    for b in range(batch):
        for wi, (top, left) in enumerate([(t, l) for t in range(0, height, 4) for l in range(0, width, 8)]):
            win = grid[:, b, top : top + 4, left : left + 8].reshape(3, tokens, 2, 8).permute(0, 2, 1, 3)
            q, k, v = win
            logits = q @ k.transpose(-1, -2) / math.sqrt(8) + bias + mask[wi]
            res = (logits.softmax(-1) @ v).permute(1, 0, 2).reshape(4, 8, 16)
            expected[b, top : top + 4, left : left + 8] = res
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _rg_sa_reference(attn: RG_SA, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """RG-SA written out with an explicit softmax (q/k head size ``c_ratio`` times v's, as in the paper)."""
    batch, length, channels = x.shape
    heads = attn.num_heads
    reduced = _recursive_reduction(
        x.transpose(1, 2).reshape(batch, channels, height, width), attn.reduction1.weight, attn.reduction1.bias, False
    )
    rh, rw = reduced.shape[-2:]
    reduced = attn.norm_act(attn.conv(attn.dwconv(reduced)).flatten(2).transpose(1, 2))
    q = attn.q(x).view(batch, length, heads, -1).transpose(1, 2)
    k = attn.k(reduced).view(batch, rh * rw, heads, -1).transpose(1, 2)
    v = attn.v(reduced)
    v = v + attn.cpe(v.transpose(1, 2).reshape(batch, channels, rh, rw)).flatten(2).transpose(1, 2)
    v = v.view(batch, rh * rw, heads, -1).transpose(1, 2)
    weights = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(batch, length, channels))


@pytest.mark.parametrize("c_ratio", [0.5, 2.0])
def test_rg_sa_equals_reference_softmax(c_ratio: float) -> None:
    """RG-SA pads the narrower of q/k and v to one head size for the fused kernel; the result is unchanged."""
    torch.manual_seed(0)
    attn = RG_SA(dim=24, num_heads=3, c_ratio=c_ratio).eval()
    height, width = 32, 48
    x = _photo(height, width).repeat(1, 8, 1, 1).flatten(2).transpose(1, 2) * 2 - 1  # (1, H*W, 24) real pixels
    with torch.no_grad():
        torch.testing.assert_close(attn(x, height, width), _rg_sa_reference(attn, x, height, width),
                                   rtol=1e-5, atol=1e-5)


def test_shift_mask_separates_wrapped_regions() -> None:
    mask = _shift_mask(8, 16, 4, 8, 2, 4)
    assert mask.shape == (4, 32, 32)
    assert (mask[0] == 0).all()  # the first window holds one region only
    assert set(mask[3].unique().tolist()) == {-100.0, 0.0}


def test_features_and_intermediates() -> None:
    model = RGT(upscale=2, **TINY).eval()
    x = _photo(16, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        final, inter = model.forward_intermediates(x)
        out = model.forward_head(feats)
    assert feats.shape == (1, 32, 16, 32) and len(inter) == 2 and inter[0].shape == (1, 32, 16, 32)
    torch.testing.assert_close(final, feats)
    torch.testing.assert_close(out, model(x))
    getter = timm.create_model("rgt_s_x2", features_only=True, **TINY)
    assert [f.shape[1] for f in getter(x)] == [32, 32]


def test_bad_inputs_are_named() -> None:
    model = RGT(upscale=2, **TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(1, 1, 16, 16\)"):
        model(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="forward\\(\\) pads any size"):
        model.forward_features(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="num_classes must be 0.*got 10"):
        RGT(num_classes=10, **TINY)
    with pytest.raises(ValueError, match="upscale must be.*got 5"):
        RGT(upscale=5, **TINY)
    with pytest.raises(ValueError, match="num_heads=3"):
        RGT(embed_dim=32, num_heads=3, depth=(2,))
    with pytest.raises(ValueError, match="num_classes must stay 0, got 3"):
        model.reset_classifier(3)
