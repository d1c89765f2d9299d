"""ViM2 (MambaMixer): parameter counts by formula, forward/backward, features, channels-last, weighted averaging."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from skimage import data, transform

import chanzoo
from chanzoo.models.mambamixer import MambaMixerStage, SelectiveChannelMixer, SelectiveTokenMixer


def photo(size: int, batch: int = 1) -> torch.Tensor:
    """skimage's astronaut (and coffee) resized to size x size, ImageNet-normalised, (B, 3, H, W)."""
    imgs = [data.astronaut(), data.coffee()][:batch]
    arr = np.stack([transform.resize(im, (size, size), anti_aliasing=True) for im in imgs]).astype(np.float32)
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean[:, None, None]) / std[:, None, None]


def token_mixer_params(dim: int, n: int = 16, ratio: float = 2.0) -> int:
    e, r = int(ratio * dim), math.ceil(dim / 16)
    return 2 * dim + dim * 2 * e + 10 * e + 4 * (r + 2 * n) * e + 4 * (e * r + e) + 4 * e * n + 4 * e + e * dim


def channel_mixer_params(dim: int, n: int = 16, e: int = 2) -> int:
    # LayerNorm, Linear(1, 2E) with bias, depthwise conv 3 over 2E, two S6 (x_proj, dt_proj+bias, A, D), Linear(E, 1)
    return 2 * dim + 4 * e + 2 * e * 4 + 2 * ((1 + 2 * n) * e + 2 * e + e * n + e) + e + 1


def expected_params(dims, token_depths, channel_depths, num_classes=1000) -> int:
    total = 3 * dims[0] * 16 + dims[0] + 2 * dims[0]  # stem conv 4x4 + bias, stem LayerNorm
    for i, (d, t, c) in enumerate(zip(dims, token_depths, channel_depths)):
        if i > 0:
            total += 2 * 4 * dims[i - 1] + 4 * dims[i - 1] * d  # patch merging: LayerNorm(4C) + Linear(4C, C')
        total += t * token_mixer_params(d) + c * channel_mixer_params(d)
        k = t + c + 1
        total += k * (k + 1) // 2  # weighted-averaging coefficients
    return total + 2 * dims[-1] + dims[-1] * num_classes + num_classes


VARIANTS = {
    "vim2_tiny": ((96, 192, 384, 768), (2, 2, 6, 2), (1, 1, 3, 1), 20e6),
    "vim2_small": ((96, 192, 384, 768), (2, 2, 18, 2), (1, 1, 9, 1), 43e6),
    "vim2_base": ((128, 256, 512, 1024), (2, 2, 18, 2), (1, 1, 9, 1), 74e6),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_param_counts(name):
    dims, tdep, cdep, paper = VARIANTS[name]
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == expected_params(dims, tdep, cdep)
    if name == "vim2_tiny":  # small/base: the paper's 43M/74M do not follow from its own Table 6 (docs/mambamixer.md)
        assert abs(count - paper) / paper <= 0.10


def test_mixers_keep_shape_and_mix_their_axis():
    torch.manual_seed(0)
    x = photo(32).permute(0, 2, 3, 1).repeat(1, 1, 1, 8)[..., :16]  # (1, 32, 32, 16) channels-last
    token, channel = SelectiveTokenMixer(16).eval(), SelectiveChannelMixer(16).eval()
    with torch.no_grad():
        assert token(x).shape == x.shape and channel(x).shape == x.shape
        # the channel mixer treats tokens independently: changing one token changes only that token's output
        x2 = x.clone()
        x2[0, 5, 7] += 1.0
        diff = (channel(x2) - channel(x)).abs().sum(-1)[0]
        assert diff[5, 7] > 0 and diff.sum() == diff[5, 7]
        # the token mixer spreads one pixel's change over the whole (8x8) image: the four scans reach every pixel
        token.ssm.A_logs.fill_(-10.0)  # slow decay and large steps: the far end of each scan sees the change
        token.ssm.dt_projs_bias.fill_(1.0)
        small, small2 = x[:, :8, :8].clone(), x[:, :8, :8].clone()
        small2[0, 5, 6] += 1.0
        tdiff = (token(small2) - token(small)).abs().sum(-1)[0]
        assert (tdiff > 0).all()


def test_weighted_averaging_starts_as_residual_stream():
    torch.manual_seed(0)
    stage = MambaMixerStage(8, 8, token_depth=2, channel_depth=1, downsample=False, d_state=4, ssm_ratio=2.0,
                            channel_expand=2, drop_path=[0.0] * 3).eval()
    x = photo(16).permute(0, 2, 3, 1).repeat(1, 1, 1, 3)[..., :8]
    with torch.no_grad():
        h = x
        for mixer in stage.mixers:  # weights 1: x_k = x_0 + sum of earlier mixer outputs
            h = h + mixer(h)
        torch.testing.assert_close(stage(x), h)
        # Learned weights select earlier features: only the stage input kept -> identity
        stage.avg_weights.zero_()
        last = stage.avg_weights.numel() - (len(stage.mixers) + 1)
        stage.avg_weights[last] = 1.0
        torch.testing.assert_close(stage(x), x)


@pytest.mark.parametrize("size", [64, 224])
def test_vim2_tiny_forward_backward(size):
    torch.manual_seed(0)
    model = timm.create_model("vim2_tiny", num_classes=10)
    out = model(photo(size))
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.stages[0].mixers[0].ssm.A_logs.grad.abs().sum() > 0
    assert model.stages[2].avg_weights.grad.abs().sum() > 0


def test_features_only_and_intermediates():
    model = timm.create_model("vim2_nano", features_only=True, in_chans=3).eval()
    x = photo(32, batch=2)
    with torch.no_grad():
        feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2), (2, 256, 1, 1)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    full = timm.create_model("vim2_nano", in_chans=3).eval()
    with torch.no_grad():
        final, inter = full.forward_intermediates(x)
        torch.testing.assert_close(full.forward_head(final), full(x))
    assert [t.shape[1] for t in inter] == [32, 64, 128, 256]


def test_channels_last_input_same_output():
    model = timm.create_model("vim2_nano", in_chans=3).eval()
    x = photo(32, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), model(x), atol=1e-5,
                                   rtol=1e-5)


def test_contract_and_attn_slot():
    model = chanzoo.create_model("vim2_nano", attn="se", num_classes=7, in_chans=1)
    names = dict(model.named_modules())
    assert type(names["stages.0.attn"]).__name__ == "SqueezeExcite"
    x = torch.from_numpy(data.camera()[::16, ::16][:28, :28].astype(np.float32) / 255)[None, None]
    assert model(x).shape == (1, 7)
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model.num_features == 256
    assert "stages.0.avg_weights" in model.no_weight_decay()


def test_bad_inputs():
    model = timm.create_model("vim2_nano", in_chans=1)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match="at least 4x4"):
        model(torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="multiples of channel_depths"):
        timm.create_model("vim2_nano", token_depths=(3, 2, 2, 2), channel_depths=(2, 1, 1, 1))
    with pytest.raises(ValueError, match="same length"):
        timm.create_model("vim2_nano", dims=(32, 64))


def test_flops_on_the_meta_device_equal_those_of_a_real_tensor() -> None:
    """benchmarks/model_table.py counts on the meta device; the scan must count there as on the CPU kernel."""
    from chanzoo.profile import count_flops

    counts = []
    for device in ("meta", "cpu"):
        with torch.device(device):
            torch.manual_seed(0)
            model = timm.create_model("vim2_nano").eval()
            with torch.no_grad():
                counts.append(count_flops(model, torch.zeros(1, 1, 28, 28))[1])
    assert counts[0] == counts[1]


def test_stage_insertion_runs_the_module_on_nchw_features() -> None:
    """attn_position='stage' reads output_fmt='NHWC' and gives the module NCHW maps: the stage-inserted SE equals the
    native slot's SE with the same weights (both act on each stage's output)."""
    x = torch.from_numpy(data.camera()[::16, ::16][:28, :28].astype(np.float32) / 255)[None, None]
    torch.manual_seed(0)
    native = chanzoo.create_model("vim2_nano", attn="se").eval()
    staged = chanzoo.create_model("vim2_nano", attn="se", attn_position="stage").eval()
    assert staged.output_fmt == "NHWC" and type(staged.stages[0].channel_attn.attn).__name__ == "SqueezeExcite"
    state = {k.replace(".attn.", ".channel_attn.attn."): v for k, v in native.state_dict().items()}
    staged.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(staged(x), native(x))


def _reference_scan(ssm, xs: torch.Tensor) -> torch.Tensor:
    """The S6 step as first written (per-direction einsums laid out (b, k, c, L), bias, softplus and D outside the
    scan core) on the step-by-step reference recurrence, one stacked copy per direction: the oracle."""
    from chanzoo.ops.selective_scan import selective_scan_ref

    batch, directions, inner, length = xs.shape
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, ssm.x_proj_weight)
    dts, Bs, Cs = torch.split(x_dbl, [ssm.dt_rank, ssm.d_state, ssm.d_state], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, ssm.dt_projs_weight)
    channels = directions * inner
    y = selective_scan_ref(xs.reshape(batch, channels, length), dts.reshape(batch, channels, length),
                           -torch.exp(ssm.A_logs), Bs, Cs, D=ssm.Ds, delta_bias=ssm.dt_projs_bias.reshape(-1),
                           delta_softplus=True)
    return y.view(batch, directions, inner, length)


def _reference_token_mixer(self, x: torch.Tensor) -> torch.Tensor:
    """Token mixer as first written: four stacked cross-scan copies, scanned, merged by flips and sums."""
    from chanzoo.ops.cross_scan import cross_merge, cross_scan

    height, width = x.shape[1:3]
    x, z = self.in_proj(self.norm(x)).chunk(2, dim=-1)
    x = torch.nn.functional.silu(self.conv2d(x.permute(0, 3, 1, 2)))
    y = cross_merge(_reference_scan(self.ssm, cross_scan(x)), height, width)
    return self.out_proj(y.permute(0, 2, 3, 1) * torch.nn.functional.silu(z))


def _reference_channel_mixer(self, x: torch.Tensor) -> torch.Tensor:
    """Channel mixer as first written: the backward direction as a flipped copy with its own conv, flipped back."""
    shape = x.shape
    seq = self.norm(x).reshape(-1, shape[-1], 1)
    x_in, z = self.in_proj(seq).chunk(2, dim=-1)
    x_in = x_in.transpose(1, 2)
    both = torch.nn.functional.silu(self.conv1d(torch.cat([x_in, x_in.flip(-1)], dim=1)))
    ys = _reference_scan(self.ssm, both.view(-1, 2, self.expand, shape[-1]))
    y = (ys[:, 0] + ys[:, 1].flip(-1)).transpose(1, 2)
    return self.out_proj(y * torch.nn.functional.silu(z)).view(shape)


def _reference_average(stage, outputs: list[torch.Tensor]) -> torch.Tensor:
    k = len(outputs)
    start = (k - 1) * k // 2
    return sum(stage.avg_weights[start + j] * y for j, y in enumerate(outputs))


@pytest.mark.parametrize("dim, size", [(32, 16), (96, 14)])  # ViM2-nano's and ViM2-T's stage widths
def test_fast_path_equals_reference_formulation(monkeypatch, dim, size):
    """A whole stage (token, token, channel mixer, weighted averaging) on a real photo: the output and every
    parameter gradient of the default path equal those of the reference formulation."""
    torch.manual_seed(dim)
    stage = MambaMixerStage(dim, dim, token_depth=2, channel_depth=1, downsample=False, d_state=16, ssm_ratio=2.0,
                            channel_expand=2, drop_path=[0.0] * 3)
    with torch.no_grad():  # perturb the init so that the averaging weights, D and the biases all matter
        for p in stage.parameters():
            p.mul_(1 + 0.2 * torch.cos(torch.arange(p.numel(), dtype=torch.float32)).view_as(p))
    x = photo(size, batch=2).permute(0, 2, 3, 1).repeat(1, 1, 1, dim // 3 + 1)[..., :dim].contiguous()
    weight = torch.cos(torch.arange(x.numel(), dtype=torch.float32)).view_as(x)

    def run() -> list[torch.Tensor]:
        stage.zero_grad(set_to_none=True)
        out = stage(x)
        (out * weight).sum().backward()
        return [out.detach()] + [p.grad.clone() for p in stage.parameters()]

    fast = run()
    monkeypatch.setattr(SelectiveTokenMixer, "forward", _reference_token_mixer)
    monkeypatch.setattr(SelectiveChannelMixer, "forward", _reference_channel_mixer)
    monkeypatch.setattr(MambaMixerStage, "_average", _reference_average)
    ref = run()
    names = ["out"] + [n for n, _ in stage.named_parameters()]
    for name, got, want in zip(names, fast, ref):
        err = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
        # Outputs to 1e-5; gradients to 1e-4 as in tests/ops/test_selective_scan.py: the averaging weights' gradients
        # are sums over every (B, H, W, D) product, so float32 summation order alone moves them by ~2e-5.
        assert err <= (1e-5 if name == "out" else 1e-4), f"{name}: relative error {err:.2e}"
