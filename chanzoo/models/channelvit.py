"""ChannelViT: Bao et al., "Channel Vision Transformers: An Image Is Worth C x 16 x 16 Words", ICLR 2024.

Every input channel is cut into patches on its own and embedded by one projection shared by all channels; a learnable
embedding of the channel's identity is added to its tokens, and a position embedding shared across channels to each
patch position. The transformer therefore sees ``C * H * W / p**2`` patch tokens plus a CLS token and reasons across
channels and positions. Because channels are tokens, a model trained on ``C`` channels runs on any subset of them
(``channel_ids`` says which trained channel each input channel is); Hierarchical Channel Sampling (``hcs=True``,
Sec. 3.2) trains for that by keeping a random subset of channels per batch.

Written for chanzoo against the paper; parameter names, shapes and counts follow the official implementation
(github.com/insitro/ChannelViT) so its checkpoints load through ``checkpoint_filter_fn``. Differences in form, not
in function: the shared projection is a ``Conv2d(1, D, p, p)`` applied to every channel (the official code uses an
equivalent ``Conv3d`` with kernel ``(1, p, p)``; the converter squeezes its weight), and the channel embedding is an
``nn.Embedding`` (the official HCS releases; the other releases' ``(1, D, C, 1, 1)`` parameter is converted).

Position embedding: as in the official code, the patch position embedding is resampled bicubically to the input's
patch grid with DINO's scale factor ``(grid + 0.1) / built_grid`` (github.com/facebookresearch/dino/issues/8) for
every input except a single channel at the built size (so also at the built size with several channels, which shifts
the embedding by a fraction of a patch), so that official weights give the official outputs. One difference is kept
on purpose: the official code skips the resampling whenever the total token count C * (H/p) * (W/p) equals the built
patch count on a square input and then adds the unresized table across all channels' tokens; chanzoo resamples there
too (docs/channelvit.md). Images of any size divisible by the patch size are accepted.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block
from torch import nn

from chanzoo.hub import generate_default_cfgs
from chanzoo.ops.channel_sampling import sample_channel_subset

__all__ = ["ChannelVisionTransformer", "PatchEmbedPerChannel", "checkpoint_filter_fn"]

_logger = logging.getLogger(__name__)


@torch.fx.wrap  # one node under torch.fx tracing; the checks run whenever the traced graph does
def _channel_ids_for(
    x: torch.Tensor, channel_ids: Optional[torch.Tensor], in_chans: int, patch_size: int
) -> torch.Tensor:
    """Validate ``x`` (B, C, H, W) and ``channel_ids``; return the ids as a (B, C) int64 tensor."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    b, c, h, w = x.shape
    if c > in_chans:
        raise ValueError(f"x has {c} channels but the model was built for in_chans={in_chans}")
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} must be divisible by the patch size {patch_size}")
    if channel_ids is None:
        if c != in_chans:
            raise ValueError(
                f"x has {c} of the {in_chans} trained channels: pass channel_ids (B, {c}) or ({c},) "
                "naming which trained channel each input channel is"
            )
        return torch.arange(c, device=x.device).expand(b, c)
    channel_ids = torch.as_tensor(channel_ids, device=x.device)
    if channel_ids.is_floating_point() or channel_ids.dtype == torch.bool:
        raise TypeError(f"channel_ids must be an integer tensor, got dtype {channel_ids.dtype}")
    if channel_ids.ndim == 1:
        channel_ids = channel_ids.expand(b, -1)
    if tuple(channel_ids.shape) != (b, c):
        raise ValueError(f"channel_ids must have shape ({b}, {c}) or ({c},) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(channel_ids.shape)}")
    if int(channel_ids.min()) < 0 or int(channel_ids.max()) >= in_chans:
        bad = channel_ids[(channel_ids < 0) | (channel_ids >= in_chans)].unique().tolist()
        raise ValueError(f"channel_ids {bad} out of range: the model knows channels 0..{in_chans - 1}")
    return channel_ids.long()


@torch.fx.wrap
def _sample_channels(x: torch.Tensor, channel_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hierarchical Channel Sampling: the input channels and their ids for a random subset (Sec. 3.2)."""
    keep = sample_channel_subset(x.shape[1], device=x.device)
    return x[:, keep], channel_ids[:, keep]


@torch.fx.wrap
def _patch_pos_embed(
    pos_embed: torch.Tensor, built_grid: tuple[int, int], grid_h: int, grid_w: int, num_channels: int
) -> torch.Tensor:
    """Patch position embedding for a ``grid_h`` x ``grid_w`` grid of patches, repeated for each channel.

    Resampled as the official code does (bicubic, DINO's scale factor), except for one channel at the built size.
    """
    pos = pos_embed[:, 1:]
    gh, gw = built_grid
    if num_channels == 1 and (grid_h, grid_w) == (gh, gw):
        return pos
    pos = pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    scale = ((grid_h + 0.1) / gh, (grid_w + 0.1) / gw)
    pos = F.interpolate(pos, scale_factor=scale, mode="bicubic")
    return pos.flatten(2).transpose(1, 2).repeat(1, num_channels, 1)


class PatchEmbedPerChannel(nn.Module):
    """Patches of each channel through one shared projection, plus a learnable embedding of the channel's identity."""

    def __init__(self, img_size: Union[int, tuple[int, int]], patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size={patch_size}")
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]  # per channel
        self.in_chans = in_chans
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.channel_embed = nn.Embedding(in_chans, embed_dim)

    def forward(self, x: torch.Tensor, channel_ids: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) and ids (B, C) -> tokens (B, C * H/p * W/p, D), channel-major as in the official code."""
        b, c, h, w = x.shape
        x = self.proj(x.reshape(b * c, 1, h, w))  # (B*C, D, h/p, w/p)
        x = x.flatten(2).transpose(1, 2).reshape(b, c, -1, x.shape[1])  # (B, C, N, D)
        x = x + self.channel_embed(channel_ids).unsqueeze(2)
        return x.flatten(1, 2)


class ChannelVisionTransformer(nn.Module):
    """ChannelViT (Bao et al., ICLR 2024).

    Args:
        img_size: image size the position embedding is built for (other sizes divisible by the patch are resampled).
        patch_size: patch side in pixels.
        in_chans: number of distinct channels the model knows (the rows of the channel embedding).
        num_classes: classifier outputs (0: no classifier, ``forward`` returns the pooled features).
        global_pool: 'token' (CLS, the paper's), 'avg' (mean of the patch tokens) or '' (no pooling).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer width, blocks, heads, MLP ratio, qkv bias.
        drop_rate: dropout before the classifier.
        pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: dropout after the position embedding, after
            the attention/MLP projections, of the attention weights, and the stochastic-depth rate of the last block
            (the official ``drop_rate`` is ``pos_drop_rate`` and ``proj_drop_rate`` together).
        hcs: Hierarchical Channel Sampling in training mode (Sec. 3.2): per batch keep a random subset of channels,
            its size uniform on 1..C. Nothing is sampled in eval mode.
    """

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        hcs: bool = False,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be an int >= 1, got {in_chans!r}")
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be an int >= 1, got {patch_size!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.hcs = hcs
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = PatchEmbedPerChannel(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth, linear in depth
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer,
                )
                for i in range(depth)
            ]
        )
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.patch_embed.channel_embed.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "patch_embed.channel_embed.weight"}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # ------------------------------------------------------------------------------------------------- tokens
    def _tokens(self, x: torch.Tensor, channel_ids: Optional[torch.Tensor]) -> torch.Tensor:
        channel_ids = _channel_ids_for(x, channel_ids, self.in_chans, self.patch_size)
        if self.training and self.hcs:
            x, channel_ids = _sample_channels(x, channel_ids)
        grid_h, grid_w = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        x = self.patch_embed(x, channel_ids)
        x = x + _patch_pos_embed(self.pos_embed, self.patch_embed.grid_size, grid_h, grid_w, channel_ids.shape[1])
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return self.pos_drop(torch.cat((cls, x), dim=1))

    # ------------------------------------------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor, channel_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalised tokens (B, 1 + C * HW / p**2, D): the CLS token, then each channel's patch tokens in turn."""
        return self.norm(self.blocks(self._tokens(x, channel_ids)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, channel_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, channel_ids))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        *,
        channel_ids: Optional[torch.Tensor] = None,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Block outputs at ``indices`` (timm's contract and argument order; ``channel_ids`` as in ``forward``).

        'NLC': the patch tokens (B, C * N, D) of all channels; 'NCHW': (B, D, H/p, W/p), the patch tokens averaged
        over the input channels."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        b, _, h, w = x.shape
        x = self._tokens(x, channel_ids)
        num_channels = (x.shape[1] - 1) // ((h // self.patch_size) * (w // self.patch_size))
        blocks = self.blocks if not stop_early else self.blocks[: max_index + 1]
        intermediates, prefixes = [], []
        for i, block in enumerate(blocks):
            x = block(x)
            if i in take_indices:
                y = self.norm(x) if norm else x
                prefixes.append(y[:, :1])
                patches = y[:, 1:]
                if output_fmt == "NCHW":
                    grid = patches.reshape(b, num_channels, h // self.patch_size, w // self.patch_size, -1)
                    patches = grid.mean(dim=1).permute(0, 3, 1, 2).contiguous()
                intermediates.append(patches)
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefixes))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, list[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def checkpoint_filter_fn(state_dict: dict[str, Any], model: ChannelVisionTransformer) -> dict[str, torch.Tensor]:
    """Map an official ChannelViT checkpoint (insitro/ChannelViT) onto chanzoo's keys.

    Accepts the released backbone files and full training checkpoints (``state_dict``/``model``/``teacher``
    wrappers, ``backbone.``/``module.`` prefixes, the supervised ``classifier`` -> ``head``); the ``Conv3d`` patch
    weight (D, 1, 1, p, p) -> (D, 1, p, p); the channel embedding in both forms, ``channel_embed.weight`` (C, D) of the
    HCS releases and ``channel_embed`` (1, D, C, 1, 1) of the others; a position embedding built for another image
    size is resampled to the model's. A model built with fewer channels than the checkpoint (``in_chans=1`` for an
    RGB release) keeps the embeddings of the checkpoint's first ``in_chans`` channels, as timm adapts a first conv.
    """
    for wrapper in ("state_dict", "model", "teacher"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    has_backbone_prefix = any(k.startswith(("backbone.", "module.backbone.")) for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if has_backbone_prefix:
            if key.startswith("backbone."):
                key = key[len("backbone."):]
            elif key.startswith("classifier."):
                key = "head." + key[len("classifier."):]
            else:  # a DINO projection head or other training-only module
                continue
        if key == "patch_embed.proj.weight" and value.ndim == 5:
            value = value.squeeze(2)
        elif key == "patch_embed.channel_embed":
            key, value = "patch_embed.channel_embed.weight", value[0, :, :, 0, 0].t()
        if key == "patch_embed.channel_embed.weight" and value.shape[0] < model.in_chans:
            raise ValueError(
                f"the checkpoint's channel embedding knows {value.shape[0]} channels but the model was built with "
                f"in_chans={model.in_chans}; build it with in_chans <= {value.shape[0]}"
            )
        if key == "patch_embed.channel_embed.weight" and value.shape[0] > model.in_chans:
            _logger.info(
                "ChannelViT: keeping the channel embeddings of the checkpoint's channels 0..%d of %d (in_chans=%d)",
                model.in_chans - 1, value.shape[0], model.in_chans,
            )
            value = value[: model.in_chans]
        if key == "pos_embed" and value.shape[1] != model.pos_embed.shape[1]:
            value = resample_abs_pos_embed(
                value, new_size=model.patch_embed.grid_size, num_prefix_tokens=1, interpolation="bicubic",
                antialias=False, verbose=True,
            )
        out[key] = value
    return out


def _create_channelvit(variant: str, pretrained: bool = False, **kwargs: Any) -> ChannelVisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        ChannelVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


_RELEASES = "https://github.com/insitro/ChannelViT/releases/download/v1.0.0/"
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Normalisation of the official data configs (channelvit/config/transformations/{cell,so2sat}.yaml).
_JUMPCP_MEAN = (4.0317, 1.5659, 3.7737, 3.4605, 4.1723, 6.7805, 6.7874, 6.7781)
_JUMPCP_STD = (17.3184, 12.0159, 16.9661, 15.0648, 17.9641, 21.6388, 21.6706, 21.6395)
_SO2SAT_MEAN = (
    -2.7662e-05, 2.2140e-05, 2.3080e-05, -2.8971e-05, 0.045272, 0.26610, 0.0019685, 0.0014895, 0.12442, 0.11015,
    0.10252, 0.11548, 0.15986, 0.18195, 0.17501, 0.19552, 0.15674, 0.11151,
)
_SO2SAT_STD = (
    0.17875, 0.17800, 0.46588, 0.46137, 4.0270, 8.2891, 2.7972, 1.6729, 0.039533, 0.047356, 0.065607, 0.062691,
    0.075968, 0.089223, 0.090549, 0.099729, 0.099299, 0.087634,
)


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": _IMAGENET_MEAN,
        "std": _IMAGENET_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


def _official(file: str, **kwargs: Any) -> dict[str, Any]:
    """An official backbone release (no classifier; CC-BY-NC 4.0, non-commercial use only)."""
    return _cfg(
        _RELEASES + file, num_classes=0, license="cc-by-nc-4.0", origin_url="https://github.com/insitro/ChannelViT",
        paper_ids="arXiv:2309.16108", **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "channelvit_tiny_p16.untrained": _cfg(),
        "channelvit_tiny_p8.untrained": _cfg(),
        "channelvit_small_p16.in1k_hcs": _official("imagenet_channelvit_small_p16_with_hcs_supervised.pth"),
        "channelvit_small_p16.in1k_dino": _official("imagenet_channelvit_small_p16_DINO.pth"),
        "channelvit_small_p8.jumpcp_cellpaint_hcs": _official(
            "cpjump_cellpaint_channelvit_small_p8_with_hcs_supervised.pth",
            input_size=(5, 224, 224), mean=_JUMPCP_MEAN[:5], std=_JUMPCP_STD[:5],
        ),
        "channelvit_small_p8.jumpcp_cellpaint_bf_hcs": _official(
            "cpjump_cellpaint_bf_channelvit_small_p8_with_hcs_supervised.pth",
            input_size=(8, 224, 224), mean=_JUMPCP_MEAN, std=_JUMPCP_STD,
        ),
        "channelvit_small_p8.so2sat_random_hcs": _official(
            "so2sat_channelvit_small_p8_with_hcs_random_split_supervised.pth",
            input_size=(18, 32, 32), mean=_SO2SAT_MEAN, std=_SO2SAT_STD, crop_pct=1.0,
        ),
        "channelvit_small_p8.so2sat_hard_hcs": _official(
            "so2sat_channelvit_small_p8_with_hcs_hard_split_supervised.pth",
            input_size=(18, 32, 32), mean=_SO2SAT_MEAN, std=_SO2SAT_STD, crop_pct=1.0,
        ),
        "channelvit_small_p8.camelyon_hcs": _official(
            "camelyon_channelvit_small_p8_with_hcs_supervised.pth", input_size=(3, 96, 96), crop_pct=1.0,
        ),
        "channelvit_base_p16.untrained": _cfg(),
        "channelvit_base_p8.untrained": _cfg(),
    }
)

_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)


@register_model
def channelvit_tiny_p16(pretrained: bool = False, **kwargs: Any) -> ChannelVisionTransformer:
    """ChannelViT-T/16 (5.43M backbone parameters at 3 channels, 224 px)."""
    return _create_channelvit("channelvit_tiny_p16", pretrained, **{**_TINY, "patch_size": 16, **kwargs})


@register_model
def channelvit_tiny_p8(pretrained: bool = False, **kwargs: Any) -> ChannelVisionTransformer:
    """ChannelViT-T/8 (5.50M backbone parameters at 3 channels, 224 px)."""
    return _create_channelvit("channelvit_tiny_p8", pretrained, **{**_TINY, "patch_size": 8, **kwargs})


@register_model
def channelvit_small_p16(pretrained: bool = False, **kwargs: Any) -> ChannelVisionTransformer:
    """ChannelViT-S/16 (21.47M backbone parameters at 3 channels, 224 px)."""
    return _create_channelvit("channelvit_small_p16", pretrained, **{**_SMALL, "patch_size": 16, **kwargs})


@register_model
def channelvit_small_p8(pretrained: bool = False, **kwargs: Any) -> ChannelVisionTransformer:
    """ChannelViT-S/8 (21.62M backbone parameters at 3 channels, 224 px)."""
    return _create_channelvit("channelvit_small_p8", pretrained, **{**_SMALL, "patch_size": 8, **kwargs})


@register_model
def channelvit_base_p16(pretrained: bool = False, **kwargs: Any) -> ChannelVisionTransformer:
    """ChannelViT-B/16 (85.41M backbone parameters at 3 channels, 224 px)."""
    return _create_channelvit("channelvit_base_p16", pretrained, **{**_BASE, "patch_size": 16, **kwargs})


@register_model
def channelvit_base_p8(pretrained: bool = False, **kwargs: Any) -> ChannelVisionTransformer:
    """ChannelViT-B/8 (85.71M backbone parameters at 3 channels, 224 px)."""
    return _create_channelvit("channelvit_base_p8", pretrained, **{**_BASE, "patch_size": 8, **kwargs})
