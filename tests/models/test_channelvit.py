"""ChannelViT (Bao et al., ICLR 2024): shapes, channel subsets, SDPA, HCS statistics, converters, errors, training."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from scipy.stats import chisquare
from skimage import data as skdata
from skimage.filters import gaussian, sobel
from skimage.transform import resize

import chanzoo  # noqa: F401  (registers the models with timm)
from chanzoo.data.channel_sampling import ChannelSampling, drop_channels, sample_channel_subset
from chanzoo.models import channelvit
from chanzoo.models.channelvit import ChannelVisionTransformer, checkpoint_filter_fn

# Backbone parameter counts (num_classes=0, img_size=224) of the official code, obtained by instantiating
# channelvit.backbone.channel_vit.channelvit_{tiny,small,base}(patch_size=p, in_chans=C) and the hcs_ versions from
# github.com/insitro/ChannelViT on CPU and summing p.numel() over parameters(); both forms give the same counts.
OFFICIAL_PARAMS = {
    ("tiny", 16, 3): 5426688, ("tiny", 16, 8): 5427648, ("tiny", 8, 3): 5502720, ("tiny", 8, 8): 5503680,
    ("small", 16, 3): 21470208, ("small", 16, 8): 21472128, ("small", 8, 3): 21622272, ("small", 8, 8): 21624192,
    ("base", 16, 3): 85407744, ("base", 16, 8): 85411584, ("base", 8, 3): 85711872, ("base", 8, 8): 85715712,
}


def real_channels(size: int = 32) -> torch.Tensor:
    """(2, 4, size, size): two skimage photos as intensity, edges, low-pass and high-pass channels."""
    out = []
    for image in (skdata.camera(), skdata.coins()):
        img = resize(image.astype(np.float64) / 255.0, (size, size), anti_aliasing=True)
        out.append(np.stack([img, sobel(img), gaussian(img, 2), img - gaussian(img, 1)]))
    x = torch.tensor(np.stack(out), dtype=torch.float32)
    return (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)


def small_model(**kwargs) -> ChannelVisionTransformer:
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, in_chans=4, num_classes=5, embed_dim=48, depth=2, num_heads=3)
    return ChannelVisionTransformer(**{**cfg, **kwargs}).eval()


@pytest.mark.parametrize("size,patch,chans", sorted(OFFICIAL_PARAMS))
def test_param_counts_equal_official(size: str, patch: int, chans: int) -> None:
    with torch.device("meta"):
        model = timm.create_model(f"channelvit_{size}_p{patch}", in_chans=chans, num_classes=0)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[(size, patch, chans)]


def test_token_count_and_shapes_for_every_subset() -> None:
    model, x = small_model(), real_channels()
    for k in range(1, 5):
        for subset in itertools.combinations(range(4), k):
            ids = torch.tensor(subset)
            tokens = model.forward_features(x[:, ids], ids)
            assert tokens.shape == (2, 1 + k * 32 * 32 // 8**2, 48)
            assert model(x[:, ids], ids).shape == (2, 5)
            assert model.forward_head(tokens, pre_logits=True).shape == (2, 48)


def reference_cls(model: ChannelVisionTransformer, x: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """CLS features computed from the paper's definition with the model's weights, channel by channel."""
    weight, bias = model.patch_embed.proj.weight, model.patch_embed.proj.bias
    grid = model.patch_embed.grid_size
    pos = model.pos_embed[:, 1:].reshape(1, *grid, -1).permute(0, 3, 1, 2)
    if len(ids) > 1:  # the official code resamples with DINO's +0.1 offset whenever there are several channels
        pos = F.interpolate(pos, scale_factor=((grid[0] + 0.1) / grid[0], (grid[1] + 0.1) / grid[1]), mode="bicubic")
    pos = pos.flatten(2).transpose(1, 2)
    tokens = [model.cls_token + model.pos_embed[:, :1]]
    for c, channel_id in enumerate(ids):
        patches = F.conv2d(x[:, c : c + 1], weight, bias, stride=model.patch_size).flatten(2).transpose(1, 2)
        tokens.append(patches + model.patch_embed.channel_embed.weight[channel_id] + pos)
    tokens = torch.cat([tokens[0].expand(x.shape[0], -1, -1), *tokens[1:]], dim=1)
    return model.norm(model.blocks(tokens))[:, 0]


@pytest.mark.parametrize("ids", [[0, 1, 2, 3], [2], [3, 1], [1, 2, 3]])
def test_cls_features_match_reference_for_subsets(ids: list[int]) -> None:
    model, x = small_model(num_classes=0), real_channels()
    with torch.no_grad():
        ours = model(x[:, ids], torch.tensor(ids))
        assert torch.allclose(ours, reference_cls(model, x[:, ids], ids), atol=1e-5)


def test_any_order_given_ids_gives_same_output() -> None:
    model, x = small_model(), real_channels()
    with torch.no_grad():
        base = model(x)
        order = [2, 0, 3, 1]
        assert torch.allclose(model(x[:, order], torch.tensor(order)), base, atol=1e-5)
        per_sample = torch.tensor([order, [3, 2, 1, 0]])
        shuffled = torch.stack([x[0, order], x[1, [3, 2, 1, 0]]])
        assert torch.allclose(model(shuffled, per_sample), base, atol=1e-5)
        # the ids matter: the same pixels labelled as other channels give other outputs
        assert not torch.allclose(model(x[:, order]), base, atol=1e-3)


def test_attention_runs_through_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = small_model(), real_channels()
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append(q.shape)
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model(x[:, [0, 2]], torch.tensor([0, 2]))
    assert len(calls) == 2 and all(shape[-2] == 1 + 2 * 16 for shape in calls)


def test_hcs_draws_uniform_k_then_uniform_subsets() -> None:
    gen, num_channels, draws = torch.Generator().manual_seed(0), 4, 12000
    samples = [tuple(sample_channel_subset(num_channels, gen).tolist()) for _ in range(draws)]
    k_counts = np.bincount([len(s) for s in samples], minlength=num_channels + 1)[1:]
    assert chisquare(k_counts).pvalue > 1e-3  # k uniform on 1..C
    for k in range(1, num_channels + 1):
        subsets = list(itertools.combinations(range(num_channels), k))
        counts = [sum(s == subset for s in samples) for subset in subsets]
        assert sum(counts) == k_counts[k - 1]  # every draw is a sorted subset of distinct channels
        if len(subsets) > 1:
            assert chisquare(counts).pvalue > 1e-3  # uniform given k


def test_hcs_samples_in_training_only() -> None:
    model, x = small_model(hcs=True), real_channels()
    with torch.no_grad():
        eval_lengths = {model.forward_features(x).shape[1] for _ in range(10)}
        model.train()
        train_lengths = {model.forward_features(x).shape[1] for _ in range(40)}
    assert eval_lengths == {1 + 4 * 16}
    assert train_lengths == {1 + k * 16 for k in range(1, 5)}


def test_plain_vit_channel_sampling_zeroes_and_rescales() -> None:
    x = real_channels()
    kept = drop_channels(x, torch.tensor([1, 3]))
    assert torch.equal(kept[:, [0, 2]], torch.zeros_like(kept[:, [0, 2]]))
    assert torch.allclose(kept[:, [1, 3]], x[:, [1, 3]] * 2.0)
    module = ChannelSampling().eval()
    assert module(x) is x
    module.train()
    torch.manual_seed(0)
    for _ in range(20):
        out = module(x)
        nonzero = [c for c in range(4) if out[:, c].abs().sum() > 0]
        assert torch.allclose(out[:, nonzero], x[:, nonzero] * 4 / len(nonzero))


def official_layout(model: ChannelVisionTransformer, channel_embed: str, lightning: bool = False) -> dict:
    """Our weights under the official keys and shapes (Conv3d patch weight; either channel-embedding form)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].unsqueeze(2)
    table = sd.pop("patch_embed.channel_embed.weight")
    if channel_embed == "embedding":
        sd["patch_embed.channel_embed.weight"] = table
    else:
        sd["patch_embed.channel_embed"] = table.t()[None, :, :, None, None]
    if lightning:
        head = {k.replace("head.", "classifier."): sd.pop(k) for k in list(sd) if k.startswith("head.")}
        backbone = {f"backbone.{k}": v for k, v in sd.items()}
        sd = {"state_dict": {**backbone, **head, "dino_head.last_layer.weight": table}}
    return sd


@pytest.mark.parametrize("form,lightning", [("embedding", False), ("parameter", False), ("embedding", True)])
def test_official_checkpoints_load_exactly(form: str, lightning: bool) -> None:
    source, target, x = small_model(), small_model(), real_channels()
    torch.nn.init.normal_(target.patch_embed.channel_embed.weight)
    state = checkpoint_filter_fn(official_layout(source, form, lightning), target)
    result = target.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(target(x[:, [1, 2]], torch.tensor([1, 2])), source(x[:, [1, 2]], torch.tensor([1, 2])))


def test_converter_resamples_position_embedding_and_checks_channels() -> None:
    source = small_model(num_classes=0)
    larger = small_model(num_classes=0, img_size=64)
    state = checkpoint_filter_fn(official_layout(source, "parameter"), larger)
    assert state["pos_embed"].shape == (1, 1 + 64, 48)
    larger.load_state_dict(state, strict=True)
    with pytest.raises(ValueError, match="knows 4 channels.*in_chans=6"):
        checkpoint_filter_fn(official_layout(source, "embedding"), small_model(in_chans=6))


def test_timm_contract_and_official_cfgs() -> None:
    model = timm.create_model("channelvit_small_p16", in_chans=5, num_classes=7, img_size=64)
    assert model.in_chans == 5 and model.num_features == 384 and model.num_classes == 7
    cfg = model.pretrained_cfg
    keys = dict(model.named_parameters())
    assert cfg["first_conv"] + ".weight" in keys and cfg["classifier"] + ".weight" in keys
    for tag in ("in1k_hcs", "in1k_dino"):
        official = timm.models.get_pretrained_cfg(f"channelvit_small_p16.{tag}")
        assert official.license == "cc-by-nc-4.0" and "insitro/ChannelViT" in official.url
    assert timm.models.get_pretrained_cfg("channelvit_small_p8.so2sat_random_hcs").input_size == (18, 32, 32)
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3
    x = torch.randn(1, 5, 64, 64)
    final, inter = model.forward_intermediates(x, indices=[2, 11])
    assert final.shape == (1, 1 + 5 * 16, 384) and [t.shape for t in inter] == [(1, 384, 4, 4)] * 2
    nlc = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
    assert nlc[0].shape == (1, 5 * 16, 384)
    features = timm.create_model("channelvit_tiny_p16", in_chans=2, features_only=True, out_indices=(5, 11))
    assert [f.shape for f in features(torch.randn(1, 2, 32, 32))] == [(1, 192, 2, 2)] * 2


def test_other_image_sizes_are_resampled_like_the_official_code() -> None:
    model, x = small_model(num_classes=0), real_channels(48)
    with torch.no_grad():
        out = model(x)
    grid = model.patch_embed.grid_size
    pos = model.pos_embed[:, 1:].reshape(1, *grid, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, scale_factor=(6.1 / 4, 6.1 / 4), mode="bicubic").flatten(2).transpose(1, 2)
    table = channelvit._patch_pos_embed(model.pos_embed, grid, 6, 6, 4)
    assert table.shape == (1, 4 * 36, 48)
    assert torch.equal(table[:, 36:72], pos)
    assert out.shape == (2, 48) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "shape,ids,error,match",
    [
        ((2, 4, 32, 32), [0, 1, 2, 4], ValueError, r"channel_ids \[4\] out of range.*0\.\.3"),
        ((2, 5, 32, 32), None, ValueError, "5 channels but the model was built for in_chans=4"),
        ((2, 4, 30, 32), None, ValueError, "30x32 must be divisible by the patch size 8"),
        ((2, 2, 32, 32), None, ValueError, "pass channel_ids"),
        ((2, 2, 32, 32), [0.0, 1.0], TypeError, "integer tensor"),
        ((2, 2, 32, 32), [0, 1, 2], ValueError, r"shape \(2, 2\) or \(2,\)"),
    ],
)
def test_errors_name_the_bad_value(shape, ids, error, match) -> None:
    model = small_model()
    with pytest.raises(error, match=match):
        model(torch.zeros(shape), None if ids is None else torch.tensor(ids))


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="img_size .30, 30. must be divisible by patch_size=8"):
        small_model(img_size=30)
    with pytest.raises(ValueError, match="global_pool must be"):
        small_model(global_pool="max")


def test_loss_falls_on_real_digits_with_hcs() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images[:256] / 16.0
    x = torch.tensor(np.stack([np.stack([im, sobel(im), gaussian(im, 1)]) for im in images]), dtype=torch.float32)
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)
    y = torch.tensor(digits.target[:256])
    torch.manual_seed(0)
    model = ChannelVisionTransformer(img_size=8, patch_size=4, in_chans=3, num_classes=10, embed_dim=32, depth=2,
                                     num_heads=2, hcs=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    before = eval_loss()
    for step in range(80):
        model.train()
        batch = torch.arange(64) + 64 * (step % 4)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before and math.isfinite(after)


def test_pretrained_with_fewer_channels_keeps_the_checkpoint_rows(tmp_path, caplog) -> None:
    """timm.create_model(..., pretrained=True, in_chans=1) on an RGB release: like timm's first-conv adaptation,
    the model keeps the checkpoint's channel-0 embedding and reproduces the 3-channel model on that channel."""
    torch.manual_seed(0)
    source = timm.create_model("channelvit_tiny_p16", num_classes=0, img_size=32, depth=2).eval()
    file = tmp_path / "official.pth"
    torch.save(official_layout(source, "parameter"), file)
    with caplog.at_level("INFO", logger="chanzoo.models.channelvit"):
        gray = timm.create_model(
            "channelvit_tiny_p16", pretrained=True, in_chans=1, num_classes=0, img_size=32, depth=2,
            pretrained_cfg_overlay=dict(file=str(file), num_classes=0),
        ).eval()
    assert "channels 0..0 of 3 (in_chans=1)" in caplog.text
    assert torch.equal(gray.patch_embed.channel_embed.weight, source.patch_embed.channel_embed.weight[:1])
    x = real_channels(32)[:, :1]
    with torch.no_grad():
        assert torch.equal(gray(x), source(x, torch.tensor([0])))
