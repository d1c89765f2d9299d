"""Histoformer: restoring images in adverse weather (rain, raindrops, snow, haze) with a histogram transformer.

Sun, Ren, Gao, Wang, Cao, "Restoring Images in Adverse Weather Conditions via Histogram Transformer", ECCV 2024
(arXiv:2407.10172; official BasicSR code and weights: https://github.com/sunshangquan/Histoformer).

A Restormer-style four-level U-Net whose blocks are

* DHSA, dynamic-range histogram self-attention: half of the channels are sorted (along H, then along W) before the
  Q/K/V convolutions (the "dynamic-range convolution"), all pixels are then sorted by the value of V and split into
  ``num_heads`` intensity bins, and attention runs between (channel, bin) tokens twice, once with contiguous bins
  (bin-wise histogram reshaping, BHR) and once with interleaved bins (frequency-wise, FHR); the two results are
  multiplied, un-sorted and projected. The attention weights are ``exp(a) / (1 + sum exp(a))`` (the official
  ``softmax_1``) of cosine similarities scaled by a learned per-head temperature.
* DGFF, dual-scale gated feed-forward: a 1x1 expansion, pixel-shuffle to twice the resolution, a 5x5 depth-wise conv
  on one half gated by Mish of a dilated 3x3 depth-wise conv on the other, pixel-unshuffle and a 1x1 projection.

Layer norms have no affine parameters (as in the released code). The down-sampled input image is fed into each
encoder level (``skip_patch_embed*``), and the output is a residual added to the input.

Module names mirror the official ``histoformer_arch.py``, so the released ``net_g_best.pth`` (weights under BasicSR's
``params``) loads through ``checkpoint_filter_fn`` with nothing missing or unexpected, and the parameter count of the
released all-weather configuration equals the official code's: 16,615,100.

Inputs are RGB in [0, 1]; the output has the input's size. ``forward`` takes any size: it pads (reflection, as the
official test script) to a multiple of 8 for the three 2x down-samplings and crops the output back.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, checkpoint_seq, register_model
from timm.models._features import feature_take_indices
from torch import nn

from chanzoo.hub import generate_default_cfgs
from chanzoo.ops.tiling import crop_output, pad_to_multiple

__all__ = ["Histoformer", "HistogramAttention", "DualScaleGatedFFN", "checkpoint_filter_fn"]

SIZE_MULTIPLE = 8  # three 2x down-samplings
_NORM_EPS = 1e-5

torch.fx.wrap("pad_to_multiple")  # one node under torch.fx tracing (its padding mode depends on the image size)


@torch.fx.wrap  # one node under torch.fx tracing; the check runs whenever the traced graph does
def _check_input(x: torch.Tensor, in_chans: int, padded: bool) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != in_chans:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"Histoformer expects input of shape (B, {in_chans}, H, W), got {shape}")
    if padded and (x.shape[-2] % SIZE_MULTIPLE or x.shape[-1] % SIZE_MULTIPLE):
        raise ValueError(
            f"this method needs H and W divisible by {SIZE_MULTIPLE}, got input {tuple(x.shape)}; "
            "forward() pads any size"
        )
    return x


class ChannelNorm(nn.Module):
    """Layer norm over channels without affine parameters (official ``WithBias_LayerNorm`` / ``BiasFree_LayerNorm``).

    ``(x - mean_c) / sqrt(var_c + 1e-5)``, or ``x / sqrt(var_c + 1e-5)`` without mean subtraction (``bias_free``).
    It is computed with the official code's operations on the channels-last view rather than with ``F.layer_norm``:
    DHSA sorts features, so a last-bit rounding difference can swap two nearly equal values between histogram bins,
    and through 36 blocks such swaps add up to visibly different outputs.
    """

    def __init__(self, bias_free: bool = False) -> None:
        super().__init__()
        self.bias_free = bias_free

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        var = x.var(-1, keepdim=True, unbiased=False)
        if not self.bias_free:
            x = x - x.mean(-1, keepdim=True)
        return (x / torch.sqrt(var + _NORM_EPS)).permute(0, 3, 1, 2)


def _unsort(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Undo ``sorted = x_orig.gather(dim, index)``: put each value of ``x`` back at position ``index``."""
    return torch.empty_like(x).scatter(dim, index, x)


def _attention_weights(logits: torch.Tensor) -> torch.Tensor:
    """``exp(a) / (1 + sum_j exp(a_j))`` over the last dim (official ``softmax_1``: a softmax with an extra zero logit).

    The logits are cosine similarities times the per-head temperature, so ``exp`` stays finite without subtracting
    the maximum; the official arithmetic is kept so that outputs match it bit for bit (see ``ChannelNorm``).
    """
    weights = logits.exp()
    return weights / (weights.sum(dim=-1, keepdim=True) + 1)


class HistogramAttention(nn.Module):
    """Dynamic-range histogram self-attention (DHSA, paper Sec. 3.2; official ``Attention_histogram``).

    Args:
        dim: channels.
        num_heads: attention heads; also the number of intensity bins.
        bias: biases in the 1x1 and depth-wise convolutions.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 5, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 5, dim * 5, kernel_size=3, padding=1, groups=dim * 5, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def _binned_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, contiguous: bool) -> torch.Tensor:
        """Attention between (channel, bin) tokens of value-sorted (B, C, N) inputs; ``num_heads`` bins per channel.

        ``contiguous``: bin b holds sorted pixels [b*N/bins, (b+1)*N/bins) (BHR); otherwise pixels b, b+bins, ...
        (FHR). N is zero-padded to a multiple of the number of bins, as in the official code.
        """
        b, c, n = q.shape
        heads = bins = self.num_heads
        pad = (-n) % bins
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))  # unconditional (a no-op for pad=0): fx-traceable
        length = (n + pad) // bins

        def to_tokens(t: torch.Tensor) -> torch.Tensor:
            if contiguous:
                t = t.reshape(b, heads, c // heads, bins, length)
            else:
                t = t.reshape(b, heads, c // heads, length, bins).transpose(-1, -2)
            return t.reshape(b, heads, c // heads * bins, length)

        q, k, v = to_tokens(q), to_tokens(k), to_tokens(v)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        out = _attention_weights((q @ k.transpose(-2, -1)) * self.temperature) @ v
        out = out.reshape(b, heads, c // heads, bins, length)
        if not contiguous:
            out = out.transpose(-1, -2)
        return out.reshape(b, c, n + pad)[..., :n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        half = c // 2
        # dynamic-range convolution: the first half of the channels enters the convolutions sorted along H, then W
        sorted_h, index_h = x[:, :half].sort(dim=-2)
        sorted_hw, index_w = sorted_h.sort(dim=-1)
        x = torch.cat([sorted_hw, x[:, half:]], dim=1)
        q1, k1, q2, k2, v = self.qkv_dwconv(self.qkv(x)).chunk(5, dim=1)
        v, index = v.reshape(b, c, -1).sort(dim=-1)
        q1, k1, q2, k2 = (t.reshape(b, c, -1).gather(2, index) for t in (q1, k1, q2, k2))
        out = self._binned_attention(q1, k1, v, contiguous=True) * self._binned_attention(q2, k2, v, contiguous=False)
        out = self.project_out(_unsort(out, index, dim=2).view(b, c, h, w))
        first = _unsort(_unsort(out[:, :half], index_w, dim=-1), index_h, dim=-2)
        return torch.cat([first, out[:, half:]], dim=1)


class DualScaleGatedFFN(nn.Module):
    """Dual-scale gated feed-forward network (DGFF, paper Sec. 3.3; official ``FeedForward``).

    Args:
        dim: channels.
        ffn_expansion_factor: hidden width ``int(dim * factor)``, which must be a multiple of 4.
        bias: biases in the convolutions.
    """

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool = False) -> None:
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        quarter = hidden // 4
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv_5 = nn.Conv2d(quarter, quarter, kernel_size=5, padding=2, groups=quarter, bias=bias)
        self.dwconv_dilated2_1 = nn.Conv2d(
            quarter, quarter, kernel_size=3, padding=2, dilation=2, groups=quarter, bias=bias
        )
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = F.pixel_shuffle(self.project_in(x), 2).chunk(2, dim=1)
        x = F.mish(self.dwconv_dilated2_1(x2)) * self.dwconv_5(x1)
        return self.project_out(F.pixel_unshuffle(x, 2))


class HistoformerBlock(nn.Module):
    """Pre-norm residual block: ``x + DHSA(norm(x))`` then ``x + DGFF(norm(x))`` (official ``TransformerBlock``)."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool, layer_norm_type: str) -> None:
        super().__init__()
        self.attn_g = HistogramAttention(dim, num_heads, bias)
        self.norm_g = ChannelNorm(bias_free=layer_norm_type == "BiasFree")
        self.ffn = DualScaleGatedFFN(dim, ffn_expansion_factor, bias)
        self.norm_ff1 = ChannelNorm(bias_free=layer_norm_type == "BiasFree")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_g(self.norm_g(x))
        return x + self.ffn(self.norm_ff1(x))


class PatchEmbed(nn.Module):
    """3x3 convolution from the image to ``dim`` channels (official ``OverlapPatchEmbed``)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class SkipPatchEmbed(nn.Module):
    """The image at half resolution: 2x2 average pool, 1x1 conv, 3x3 depth-wise conv (official ``SkipPatchEmbed``)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.AvgPool2d(2, stride=2),
            nn.Conv2d(in_chans, dim, kernel_size=1, bias=False),
            nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """Halve the resolution, double the channels: 3x3 conv to ``dim/2`` then pixel-unshuffle."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim // 2, kernel_size=3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Double the resolution, halve the channels: 3x3 conv to ``2 dim`` then pixel-shuffle."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim * 2, kernel_size=3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Histoformer(nn.Module):
    """Histoformer (Sun et al., ECCV 2024): image in [0, 1] -> restored image of the same size.

    Args:
        in_chans: image channels (input and output; the output is a residual added to the input).
        dim: channels of the first level (levels 2-4 have 2, 4, 8 times as many; the last decoder level 2 times).
        num_blocks: blocks in encoder levels 1-3 and the latent level (decoder levels 3-1 mirror levels 3-1).
        num_refinement_blocks: blocks after the last decoder level.
        heads: attention heads (= histogram bins) per level.
        ffn_expansion_factor: DGFF hidden width factor; ``int(c * factor)`` must be a multiple of 4 at every level.
        bias: biases in the blocks and the channel-reduction / output convolutions.
        layer_norm_type: ``'WithBias'`` (mean and variance, as released) or ``'BiasFree'`` (variance only).
        num_classes: must be 0 (image-to-image model; accepted for timm's interface).
    """

    def __init__(
        self,
        in_chans: int = 3,
        dim: int = 36,
        num_blocks: Sequence[int] = (4, 4, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.667,
        bias: bool = False,
        layer_norm_type: str = "WithBias",
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if num_classes != 0:
            raise ValueError(f"num_classes must be 0 for Histoformer (an image-to-image model), got {num_classes}")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
        if not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"dim must be a positive even int (Downsample halves it), got {dim!r}")
        num_blocks, heads = tuple(num_blocks), tuple(heads)
        if len(num_blocks) != 4 or min(num_blocks) < 1:
            raise ValueError(f"num_blocks must be four positive ints (levels 1-3 and latent), got {num_blocks}")
        if len(heads) != 4 or min(heads) < 1:
            raise ValueError(f"heads must be four positive ints (one per level), got {heads}")
        if not isinstance(num_refinement_blocks, int) or num_refinement_blocks < 0:
            raise ValueError(f"num_refinement_blocks must be a non-negative int, got {num_refinement_blocks!r}")
        if layer_norm_type not in ("WithBias", "BiasFree"):
            raise ValueError(f"layer_norm_type must be 'WithBias' or 'BiasFree', got {layer_norm_type!r}")
        # (channels, heads) of every level that has blocks: encoder 1-3, latent, decoder/refinement level 1
        for chans, h in [(dim * 2**i, heads[i]) for i in range(4)] + [(dim * 2, heads[0])]:
            if chans % h:
                raise ValueError(f"heads={heads}: {h} heads do not divide the {chans} channels of a level (dim={dim})")
            if int(chans * ffn_expansion_factor) % 4:
                raise ValueError(
                    f"ffn_expansion_factor={ffn_expansion_factor}: int({chans} * factor) = "
                    f"{int(chans * ffn_expansion_factor)} hidden channels is not a multiple of 4 (DGFF's pixel shuffle)"
                )
        self.num_classes = 0
        self.in_chans = in_chans
        self.scale = 1
        self.num_features = self.head_hidden_size = dim * 2  # forward_head(pre_logits=True) returns the features
        self.grad_checkpointing = False

        def blocks(chans: int, n: int, h: int) -> nn.Sequential:
            return nn.Sequential(
                *[HistoformerBlock(chans, h, ffn_expansion_factor, bias, layer_norm_type) for _ in range(n)]
            )

        self.patch_embed = PatchEmbed(in_chans, dim)
        self.encoder_level1 = blocks(dim, num_blocks[0], heads[0])
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = blocks(dim * 2, num_blocks[1], heads[1])
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = blocks(dim * 4, num_blocks[2], heads[2])
        self.down3_4 = Downsample(dim * 4)
        self.latent = blocks(dim * 8, num_blocks[3], heads[3])

        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level3 = blocks(dim * 4, num_blocks[2], heads[2])
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.decoder_level2 = blocks(dim * 2, num_blocks[1], heads[1])
        self.up2_1 = Upsample(dim * 2)
        self.decoder_level1 = blocks(dim * 2, num_blocks[0], heads[0])
        self.refinement = blocks(dim * 2, num_refinement_blocks, heads[0])

        self.skip_patch_embed1 = SkipPatchEmbed(in_chans, in_chans)
        self.skip_patch_embed2 = SkipPatchEmbed(in_chans, in_chans)
        self.skip_patch_embed3 = SkipPatchEmbed(in_chans, in_chans)
        self.reduce_chan_level_1 = nn.Conv2d(dim * 2 + in_chans, dim * 2, kernel_size=1, bias=bias)
        self.reduce_chan_level_2 = nn.Conv2d(dim * 4 + in_chans, dim * 4, kernel_size=1, bias=bias)
        self.reduce_chan_level_3 = nn.Conv2d(dim * 8 + in_chans, dim * 8, kernel_size=1, bias=bias)
        self.output = nn.Conv2d(dim * 2, in_chans, kernel_size=3, padding=1, bias=bias)

        self.feature_info = [
            dict(num_chs=dim * 2**i, reduction=2**i, module=name)
            for i, name in enumerate(("encoder_level1", "encoder_level2", "encoder_level3", "latent"))
        ]

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The output convolution producing the residual image (Histoformer has no classifier)."""
        return self.output

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if num_classes != 0:
            raise ValueError(f"Histoformer is an image-to-image model; num_classes must stay 0, got {num_classes}")

    def _run(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)

    def _encode(self, x: torch.Tensor, levels: int = 4) -> list[torch.Tensor]:
        """Outputs of encoder levels 1-3 and the latent level (the first ``levels`` of them)."""
        feats = [self._run(self.encoder_level1, self.patch_embed(x))]
        skip = x
        stages = (
            (self.down1_2, self.skip_patch_embed1, self.reduce_chan_level_1, self.encoder_level2),
            (self.down2_3, self.skip_patch_embed2, self.reduce_chan_level_2, self.encoder_level3),
            (self.down3_4, self.skip_patch_embed3, self.reduce_chan_level_3, self.latent),
        )
        for down, skip_embed, reduce, stage in stages[: levels - 1]:
            skip = skip_embed(skip)
            feats.append(self._run(stage, reduce(torch.cat([down(feats[-1]), skip], dim=1))))
        return feats

    def _decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        enc1, enc2, enc3, latent = feats
        x = self._run(self.decoder_level3, self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], dim=1)))
        x = self._run(self.decoder_level2, self.reduce_chan_level2(torch.cat([self.up3_2(x), enc2], dim=1)))
        x = self._run(self.decoder_level1, torch.cat([self.up2_1(x), enc1], dim=1))
        return self._run(self.refinement, x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Refined full-resolution features (B, 2*dim, H, W) of an image whose H and W are multiples of 8."""
        return self._decode(self._encode(_check_input(x, self.in_chans, padded=True)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The residual image (B, in_chans, H, W) from ``forward_features`` (``pre_logits``: the features unchanged)."""
        return x if pre_logits else self.output(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Encoder level outputs (strides 1, 2, 4, 8) at ``indices`` for an image with H, W multiples of 8.

        Returns them alone (``intermediates_only``) or with ``forward_features``' output.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' for Histoformer, got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        x = _check_input(x, self.in_chans, padded=True)
        if intermediates_only:  # only the levels up to the deepest one asked for
            feats = self._encode(x, levels=max_index + 1)
            return [feats[i] for i in take_indices]
        feats = self._encode(x)  # the decoder needs every level, so ``stop_early`` changes nothing
        return self._decode(feats), [feats[i] for i in take_indices]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Restore ``x`` (B, C, H, W) in [0, 1]; any H, W >= 1 (padded to a multiple of 8, cropped back)."""
        x = _check_input(x, self.in_chans, padded=False)
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x, SIZE_MULTIPLE)
        return crop_output(self.forward_head(self.forward_features(padded)) + padded, height, width)


def checkpoint_filter_fn(state_dict: dict[str, Any], model: Histoformer) -> dict[str, torch.Tensor]:
    """Convert an official Histoformer checkpoint (BasicSR: weights under ``params``) to chanzoo's Histoformer.

    Parameter names are the official ones, so this unwraps ``params`` (or ``params_ema`` / ``state_dict``) and a
    ``module.`` prefix (DataParallel); plain chanzoo state dicts pass through unchanged.
    """
    for key in ("params", "params_ema", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def _create_histoformer(variant: str, pretrained: bool = False, **kwargs: Any) -> Histoformer:
    return build_model_with_cfg(
        Histoformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


_WEIGHTS_FOLDER = "https://drive.google.com/drive/folders/1dmPhr8Z5iPRx9lh7TwdUFPSfwGIxp5l0"


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 0,
        "input_size": (3, 256, 256),
        "min_input_size": (3, SIZE_MULTIPLE, SIZE_MULTIPLE),  # forward_features' smallest; forward() pads any size
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "first_conv": "patch_embed.proj",
        "classifier": "output",
        "license": "unspecified",
        "origin_url": _WEIGHTS_FOLDER,
        "paper_ids": "arXiv:2407.10172",
        "paper_name": "Restoring Images in Adverse Weather Conditions via Histogram Transformer",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "histoformer.allweather": _cfg(
        description="all-weather restoration (rain+fog, raindrops, snow): RGB in [0, 1] -> same size",
        notes=(
            "scale=1", "value range [0, 1]", "official net_g_best.pth, trained on the All-Weather set "
            "(Snow100K + Outdoor-Rain + RainDrop)", "the official repository states no licence",
        ),
    ),
    "histoformer.realsnow": _cfg(
        description="real-snow restoration: RGB in [0, 1] -> same size",
        notes=("scale=1", "value range [0, 1]", "official net_g_real.pth (RealSnow)",
               "the official repository states no licence"),
    ),
})

_ALLWEATHER = dict(
    dim=36, num_blocks=(4, 4, 6, 8), num_refinement_blocks=4, heads=(1, 2, 4, 8), ffn_expansion_factor=2.667,
    bias=False, layer_norm_type="WithBias",
)


@register_model
def histoformer(pretrained: bool = False, **kwargs: Any) -> Histoformer:
    """Histoformer, the released all-weather configuration (dim 36, blocks 4/4/6/8 + 4; 16.62M parameters)."""
    return _create_histoformer("histoformer", pretrained, **dict(_ALLWEATHER, **kwargs))
