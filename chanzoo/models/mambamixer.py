"""ViM2, the Vision MambaMixer (Behrouz, Santacatterina & Zabih, "MambaMixer: Efficient Selective State Space Models
with Dual Token and Channel Selection", arXiv:2403.19888, 2024).

Each stage is a sequence of MambaMixer blocks; a block is Selective Token Mixers (linear, 3x3 depthwise conv, S6 over
the four cross-scan orders of the image, SiLU-gated branch, linear) followed by a Selective Channel Mixer (S6 run
both ways along the channel axis of every token, gated). There are no plain residual connections: the input of every
mixer, and the stage's output, is a learned weighted average of the stage input and of all earlier mixer outputs of
the stage (Sec. 3.2, "Weighted Averaging of Earlier Features"). The authors released no code; docs/mambamixer.md
lists every point where the paper is ambiguous and what chanzoo chose.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, trunc_normal_
from timm.models import build_model_with_cfg, register_model
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import PatchMerging
from torch import nn

from chanzoo.channel.registry import ChannelModuleSpec, get_channel_module
from chanzoo.hub import generate_default_cfgs
from chanzoo.ops.cross_scan import NUM_DIRECTIONS, REVERSED, merge_sources, scan_sources
from chanzoo.ops.selective_scan import selective_scan_projected

__all__ = ["ViM2", "SelectiveTokenMixer", "SelectiveChannelMixer", "MambaMixerStage"]

# Under torch.fx tracing the scan and the scan-order ops are single nodes: they check shapes and pick a backend.
torch.fx.wrap("scan_sources")
torch.fx.wrap("merge_sources")
torch.fx.wrap("selective_scan_projected")


@torch.fx.wrap  # one node under torch.fx tracing; the check runs whenever the traced graph does
def _check_input(x: torch.Tensor, in_chans: int, patch_size: int) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"ViM2 expects (B, {in_chans}, H, W) input, got shape {tuple(x.shape)}")
    if x.shape[2] < patch_size or x.shape[3] < patch_size:
        raise ValueError(
            f"ViM2 needs images of at least {patch_size}x{patch_size} pixels (the patch size), "
            f"got {x.shape[2]}x{x.shape[3]}"
        )
    return x


class _S6Params(nn.Module):
    """Input-dependent S6 parameters for ``directions`` independent scans of ``inner`` channels (Mamba's init).

    x_proj maps each step's features to (dt_rank, B, C); dt_proj lifts dt to ``inner`` channels; A = -exp(A_log)
    with A_log = log(1..N) (S4D-real); D = 1; dt_proj's bias is softplus^-1 of dt ~ logU(1e-3, 1e-1).
    """

    def __init__(self, directions: int, inner: int, d_state: int, dt_rank: int) -> None:
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        bound = inner**-0.5
        self.x_proj_weight = nn.Parameter(torch.empty(directions, dt_rank + 2 * d_state, inner).uniform_(-bound, bound))
        dt_bound = dt_rank**-0.5
        self.dt_projs_weight = nn.Parameter(torch.empty(directions, inner, dt_rank).uniform_(-dt_bound, dt_bound))
        dt = torch.exp(torch.rand(directions, inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))
        self.A_logs = nn.Parameter(a_log.repeat(directions * inner, 1))
        self.Ds = nn.Parameter(torch.ones(directions * inner))

    def scan(self, sources: torch.Tensor, reverse: Sequence[bool], outputs: int) -> torch.Tensor:
        """sources (batch, S, inner, L) -> (batch, outputs, inner, L): direction k scans source k // (K / S), backwards
        where ``reverse[k]``, and its output is added into output k // (K / outputs) (``selective_scan_projected``:
        the C++ kernel reads B and C in place from one projection product per source, or, for the channel mixer's
        two channels, computes the projections itself; the dt bias, softplus and D skip are applied inside the scan).
        """
        A = -torch.exp(self.A_logs.float())
        return selective_scan_projected(sources, self.x_proj_weight, self.dt_projs_weight, A, self.Ds.float(),
                                        self.dt_projs_bias.reshape(-1).float(), reverse, outputs)


class SelectiveTokenMixer(nn.Module):
    """Selective Token Mixer for images (paper Sec. 3.2, 4.1; appendix: "Linear D -> 2D, DWConv 3x3, S6, Linear").

    LayerNorm -> Linear(D, 2E) split into x and the gate z -> depthwise 3x3 conv + SiLU on x -> four S6 scans over the
    cross-scan orders, merged by summation -> multiplied by SiLU(z) -> Linear(E, D). E = ssm_ratio * D. Input and
    output (B, H, W, D).
    """

    def __init__(self, dim: int, d_state: int = 16, ssm_ratio: float = 2.0, dt_rank: Union[int, str] = "auto",
                 conv_size: int = 3) -> None:
        super().__init__()
        inner = int(ssm_ratio * dim)
        dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv2d = nn.Conv2d(inner, inner, conv_size, padding=conv_size // 2, groups=inner)
        self.ssm = _S6Params(NUM_DIRECTIONS, inner, d_state, dt_rank)
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1:3]
        x, z = self.in_proj(self.norm(x)).chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))
        y = merge_sources(self.ssm.scan(scan_sources(x), REVERSED, outputs=2), height, width)
        return self.out_proj(y.permute(0, 2, 3, 1) * F.silu(z))


class SelectiveChannelMixer(nn.Module):
    """Selective Channel Mixer (paper Sec. 3.2, Eq. for y_Channel; appendix table "CW-Linear, CW-S6, CW-Linear").

    For every token, its D channel values form a sequence of length D. Each step (one channel) is lifted by a
    channel-wise Linear(1, 2E) to x and the gate z (E = ``expand``, so D*E values per token: the table's "CW-Linear
    2D"); x passes a depthwise 1-D conv along the channel axis + SiLU and an S6 scan, once forward and once over the
    flipped channel order with its own conv and S6 parameters (bidirectional); the two are added, gated by SiLU(z) and
    projected back by a channel-wise Linear(E, 1). Input and output (B, H, W, D).
    """

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, conv_size: int = 3) -> None:
        super().__init__()
        self.expand = expand
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(1, 2 * expand)
        self.conv1d = nn.Conv1d(2 * expand, 2 * expand, conv_size, padding=conv_size // 2, groups=2 * expand)
        self.ssm = _S6Params(2, expand, d_state, dt_rank=1)
        self.out_proj = nn.Linear(expand, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        seq = self.norm(x).reshape(-1, shape[-1], 1)  # (tokens, D, 1): one sequence over the channels per token
        x_in, z = self.in_proj(seq).chunk(2, dim=-1)  # (tokens, D, E) each
        # The backward direction's conv over the reversed channels equals, read backwards, the conv with the reversed
        # kernel over the channels in order: one grouped conv gives both directions, interleaved (tokens, E, 2, D).
        weight, bias = self.conv1d.weight.view(2, self.expand, 1, -1), self.conv1d.bias.view(2, self.expand)
        weight = torch.stack([weight[0], weight[1].flip(-1)], dim=1).flatten(0, 1)
        both = F.conv1d(x_in.transpose(1, 2), weight, bias.t().flatten(), padding=self.conv1d.padding,
                        groups=self.expand)
        both = F.silu(both).view(-1, self.expand, 2, shape[-1]).transpose(1, 2)  # (tokens, 2, E, D), a view
        y = self.ssm.scan(both, (False, True), outputs=1)[:, 0].transpose(1, 2)  # (tokens, D, E)
        return self.out_proj(y * F.silu(z)).view(shape)


class MambaMixerStage(nn.Module):
    """Optional 2x2 patch merging, then MambaMixer blocks joined by weighted averaging of earlier features.

    With mixers m_1..m_K in order (each block: ``token_depth // channel_depth`` token mixers then one channel mixer),
    y_0 = stage input and y_k = m_k(x_k), the input of m_k is x_k = sum_{j<k} w[k, j] y_j and the stage output is
    sum_{j<=K} w[K+1, j] y_j (paper Eqs. for x_Token, x_Channel, limited to the stage as in Sec. 4.1). All weights
    start at 1, where the stage equals a pre-norm residual network; an optional channel module follows (NCHW).
    """

    def __init__(self, in_dim: int, dim: int, token_depth: int, channel_depth: int, downsample: bool,
                 d_state: int, ssm_ratio: float, channel_expand: int, drop_path: Sequence[float],
                 attn_layer: ChannelModuleSpec = None) -> None:
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim) if downsample else nn.Identity()
        per_block = token_depth // channel_depth
        mixers: list[nn.Module] = []
        for _ in range(channel_depth):
            mixers += [SelectiveTokenMixer(dim, d_state, ssm_ratio) for _ in range(per_block)]
            mixers.append(SelectiveChannelMixer(dim, d_state, channel_expand))
        self.mixers = nn.ModuleList(mixers)
        self.drop_paths = nn.ModuleList([DropPath(p) if p > 0 else nn.Identity() for p in drop_path])
        count = len(mixers) + 1  # row k (k = 1..K+1) weighs y_0..y_{k-1}
        self.avg_weights = nn.Parameter(torch.ones(count * (count + 1) // 2))
        attn_factory = get_channel_module(attn_layer)
        self.attn = attn_factory(dim) if attn_factory is not None else nn.Identity()

    def _average(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """sum_j w[k, j] y_j, accumulated in place into one new tensor (no product temporaries)."""
        k = len(outputs)
        start = (k - 1) * k // 2
        total = outputs[0] * self.avg_weights[start]
        for j in range(1, k):
            total = total.addcmul_(outputs[j], self.avg_weights[start + j])
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [self.downsample(x)]
        for mixer, drop_path in zip(self.mixers, self.drop_paths):
            outputs.append(drop_path(mixer(self._average(outputs))))
        x = self._average(outputs)
        if isinstance(self.attn, nn.Identity):
            return x
        return self.attn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ViM2(nn.Module):
    """Vision MambaMixer: 4x4 patch stem, four MambaMixer stages at strides 4-32, LayerNorm, average pool, linear."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        dims: Sequence[int] = (96, 192, 384, 768),
        token_depths: Sequence[int] = (2, 2, 6, 2),
        channel_depths: Sequence[int] = (1, 1, 3, 1),
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        channel_expand: int = 2,
        patch_size: int = 4,
        attn_layer: ChannelModuleSpec = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if not (len(dims) == len(token_depths) == len(channel_depths)):
            raise ValueError(
                f"dims {tuple(dims)}, token_depths {tuple(token_depths)} and channel_depths {tuple(channel_depths)} "
                "must have the same length"
            )
        for t, c in zip(token_depths, channel_depths):
            if c < 1 or t < 1 or t % c:
                raise ValueError(
                    f"token_depths {tuple(token_depths)} must be positive multiples of channel_depths "
                    f"{tuple(channel_depths)} (each MambaMixer block has t/c token mixers and one channel mixer)"
                )
        self.num_classes, self.in_chans, self.drop_rate, self.patch_size = num_classes, in_chans, drop_rate, patch_size
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], patch_size, stride=patch_size))
        self.stem_norm = nn.LayerNorm(dims[0])
        mixer_counts = [t + c for t, c in zip(token_depths, channel_depths)]
        total = sum(mixer_counts)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, self.feature_info, in_dim, offset = [], [], dims[0], 0
        for i, (dim, t, c, count) in enumerate(zip(dims, token_depths, channel_depths, mixer_counts)):
            stages.append(MambaMixerStage(in_dim, dim, t, c, downsample=i > 0, d_state=d_state, ssm_ratio=ssm_ratio,
                                          channel_expand=channel_expand, drop_path=rates[offset:offset + count],
                                          attn_layer=attn_layer))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2**i, module=f"stages.{i}"))
            in_dim, offset = dim, offset + count
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_dim
        self.output_fmt = "NHWC"  # forward_features is channels-last, like timm's Swin
        self.norm = nn.LayerNorm(in_dim)
        self.head = ClassifierHead(in_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC")
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear) and m.in_features > 1:
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {"A_logs", "Ds", "dt_projs_bias", "avg_weights"}
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in names}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_input(x, self.in_chans, self.patch_size)
        return self.stem_norm(self.stem(x).permute(0, 2, 3, 1))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Stage outputs at ``indices`` in NCHW or NHWC (timm's forward_intermediates contract)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self._stem(x)
        stages = self.stages if not stop_early else self.stages[: max_index + 1]
        last = len(self.stages) - 1
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                out = self.norm(x) if norm and i == last else x
                intermediates.append(out.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else out)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, list[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features (B, H/32, W/32, C), channels last like timm's Swin."""
        return self.norm(self.stages(self._stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_vim2(variant: str, pretrained: bool = False, **kwargs: Any) -> ViM2:
    return build_model_with_cfg(
        ViM2, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **kwargs
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.0",
        "classifier": "head.fc",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "vim2_nano.untrained": _cfg(num_classes=10, input_size=(1, 28, 28), pool_size=(1, 1), crop_pct=1.0,
                                    interpolation="bilinear", mean=(0.2860,), std=(0.3530,)),
        "vim2_tiny.untrained": _cfg(),
        "vim2_small.untrained": _cfg(),
        "vim2_base.untrained": _cfg(),
    }
)


@register_model
def vim2_nano(pretrained: bool = False, **kwargs: Any) -> ViM2:
    """chanzoo's reduced ViM2 for small images (not in the paper): dims 32-256, 2 token + 1 channel mixer per stage."""
    args = dict(dims=(32, 64, 128, 256), token_depths=(2, 2, 2, 2), channel_depths=(1, 1, 1, 1), drop_path_rate=0.0)
    return _create_vim2("vim2_nano", pretrained, **dict(args, **kwargs))


@register_model
def vim2_tiny(pretrained: bool = False, **kwargs: Any) -> ViM2:
    """ViM2-T: dims 96-768, token mixers 2-2-6-2, channel mixers 1-1-3-1 (paper's table of scales; 20M params)."""
    args = dict(dims=(96, 192, 384, 768), token_depths=(2, 2, 6, 2), channel_depths=(1, 1, 3, 1))
    return _create_vim2("vim2_tiny", pretrained, **dict(args, **kwargs))


@register_model
def vim2_small(pretrained: bool = False, **kwargs: Any) -> ViM2:
    """ViM2-S: dims 96-768, token mixers 2-2-18-2, channel mixers 1-1-9-1 (paper's table of scales; 43M params)."""
    args = dict(dims=(96, 192, 384, 768), token_depths=(2, 2, 18, 2), channel_depths=(1, 1, 9, 1))
    return _create_vim2("vim2_small", pretrained, **dict(args, **kwargs))


@register_model
def vim2_base(pretrained: bool = False, **kwargs: Any) -> ViM2:
    """ViM2-B: dims 128-1024, token mixers 2-2-18-2, channel mixers 1-1-9-1 (paper's table of scales; 74M params)."""
    args = dict(dims=(128, 256, 512, 1024), token_depths=(2, 2, 18, 2), channel_depths=(1, 1, 9, 1))
    return _create_vim2("vim2_base", pretrained, **dict(args, **kwargs))
