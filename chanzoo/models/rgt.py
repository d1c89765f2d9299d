"""RGT: Recursive Generalization Transformer for image super-resolution.

Chen, Zhang, Gu, Kong, Yang, "Recursive Generalization Transformer for Image Super-Resolution", ICLR 2024
(arXiv:2303.06373; official BasicSR code and weights: https://github.com/zhengchen1999/RGT, Apache-2.0).

The body is a stack of residual groups; inside a group the blocks alternate between

* L-SA: local window self-attention, half of the heads in horizontal 8x32 windows and half in vertical 32x8
  windows (shifted in every other L-SA block, as in CAT), plus a depth-wise conv on V (locally-enhanced position),
* RG-SA: recursive-generalization self-attention: the features are recursively shrunk by a stride-4 depth-wise conv
  into a few representative tokens, which queries from every pixel cross-attend to, with the channels of Q and K
  scaled by ``c_ratio``,

each followed by a gated MLP (GELU, then a depth-wise-conv gate), and every block adds its input once more scaled by
a learned per-channel ``gamma`` (hybrid adaptive integration, HAI). The modules and their names mirror the official
code, so the released ``RGT_x2.pth`` ... load through ``checkpoint_filter_fn`` (which unwraps BasicSR's ``params``
and drops buffers that chanzoo recomputes); outputs equal the official model's for every input size it takes.

Inputs are RGB in [0, 1]; the output is ``scale`` times the input size. ``forward`` takes any size: it pads
(reflection) to the size the recursive generalization needs and crops the output back.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models import build_model_with_cfg, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from torch.utils.checkpoint import checkpoint

from chanzoo.hub import generate_default_cfgs
from chanzoo.ops.tiling import crop_output, pad_to_size

__all__ = ["RGT", "checkpoint_filter_fn"]

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)  # the RGB mean the official model subtracts (DIV2K's)


def _tokens_to_image(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


def _image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


MIN_SIZE = 16  # the smallest side RG-SA's recursive reduction takes (two stride-4 steps at test time)


def _rg_recursions(height: int, width: int, training: bool) -> int:
    """How many times RG-SA shrinks the features by 4 (official rule: 2 at test time, log4 of size/4 in training)."""
    if training:
        return max(int(math.log(height // 4, 4)), int(math.log(width // 4, 4)))
    return max(int(math.log(height // 16, 4)), int(math.log(width // 16, 4)), 2)


def rg_input_size(height: int, width: int, training: bool) -> tuple[int, int]:
    """The smallest (H, W) >= (height, width) that RG-SA's recursive stride-4 reduction can take."""
    height, width = max(height, MIN_SIZE), max(width, MIN_SIZE)
    while True:
        side = 4 ** _rg_recursions(height, width, training)
        if min(height, width) >= side:
            return height, width
        height, width = max(height, side), max(width, side)


# Under torch.fx tracing each of these is one node: they branch on the feature-map size.
@torch.fx.wrap
def _check_input(x: torch.Tensor, in_chans: int, training: bool, method: str = "") -> torch.Tensor:
    """``x`` unchanged if it is (B, in_chans, H, W) and, for ``method`` (which does not pad), of a size RG-SA takes."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != in_chans:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"RGT expects input of shape (B, {in_chans}, H, W), got {shape}")
    if method and tuple(x.shape[-2:]) != rg_input_size(x.shape[-2], x.shape[-1], training):
        raise ValueError(
            f"RGT.{method} needs H, W >= {rg_input_size(x.shape[-2], x.shape[-1], training)} for input "
            f"{tuple(x.shape)} (at least {MIN_SIZE}x{MIN_SIZE}); forward() pads any size"
        )
    return x


@torch.fx.wrap
def _pad_for_rg(x: torch.Tensor, training: bool) -> torch.Tensor:
    """``x`` padded on the bottom and right to the size RG-SA's recursive reduction takes."""
    return pad_to_size(x, *rg_input_size(x.shape[-2], x.shape[-1], training))


@torch.fx.wrap
def _recursive_reduction(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], training: bool
) -> torch.Tensor:
    """RG-SA's recursive generalization: the stride-4 depth-wise conv (``weight``, ``bias``) applied T times."""
    for _ in range(_rg_recursions(x.shape[-2], x.shape[-1], training)):
        x = F.conv2d(x, weight, bias, stride=4, groups=x.shape[1])
    return x


@torch.fx.wrap  # one node under torch.fx tracing (it branches on the feature-map size)
def _pad_bottom_right(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Zero-pad a (..., H, W, C) tensor at the bottom and right; no copy when nothing is padded."""
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x


@torch.fx.wrap  # one node under torch.fx tracing: it picks its formulation at run time, as eager code does
def _window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, mask: Optional[torch.Tensor],
    batch: int, columns: int, dropout: float, scale: float,
) -> torch.Tensor:
    """Window attention of (B * windows, heads, N, d) inputs with a (1, heads, N, N) position ``bias`` and an optional
    (windows, N, N) shifted-window ``mask`` (windows in row-major order, ``columns`` per row).

    For CPU's fused kernel, all windows first attend with the bias alone (the mask is zero for every window off the
    last window row and column, see ``_build_shift_mask``), then only the border windows are recomputed with
    bias + mask, so the (windows, heads, N, N) sum is never formed for the whole image.
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    if not _cpu_fused_attention(q):  # the plain formulation: bias + mask for every window
        return F.scaled_dot_product_attention(
            *(t.unflatten(0, (batch, -1)) for t in (q, k, v)),
            attn_mask=bias + mask.unsqueeze(1).to(q.dtype), dropout_p=dropout, scale=scale,
        ).flatten(0, 1)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    windows = mask.shape[0]
    grid = torch.arange(windows, device=q.device).view(windows // columns, columns)
    border = torch.cat([grid[:-1, -1], grid[-1]])
    border = (torch.arange(batch, device=q.device)[:, None] * windows + border).flatten()
    x_border = F.scaled_dot_product_attention(
        q[border], k[border], v[border], attn_mask=bias + mask[border % windows].unsqueeze(1).to(q.dtype),
        dropout_p=dropout, scale=scale,
    )
    return x.index_copy(0, border, x_border)


@torch.fx.wrap  # one node under torch.fx tracing: it picks its formulation at run time, as eager code does
def _cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, scale: float) -> torch.Tensor:
    """SDPA whose q/k and v may differ in head size. CPU's fused kernel needs one size, so there the narrower side is
    zero-padded, which leaves every dot product and so the result unchanged (the unfused path ran 2.8x slower at
    256x256)."""
    if not _cpu_fused_attention(q):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)
    qk_dim, v_dim = q.shape[-1], v.shape[-1]
    if qk_dim < v_dim:
        q, k = F.pad(q, (0, v_dim - qk_dim)), F.pad(k, (0, v_dim - qk_dim))
    elif v_dim < qk_dim:
        v = F.pad(v, (0, qk_dim - v_dim))
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)[..., :v_dim]


def _cpu_fused_attention(t: torch.Tensor) -> bool:
    """Whether attention is rearranged for CPU's fused SDPA kernel (4-D inputs, one head size; see ``WindowAttention``
    and ``RG_SA``). Not on other devices, nor while the model is compiled, exported, traced or counted (FLOP counters
    and fake-tensor modes are dispatch modes): those see the model's own formulation and its FLOPs."""
    if isinstance(t, torch.fx.Proxy) or t.device.type != "cpu":
        return False
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    return not is_in_torch_dispatch_mode()


class ImageToTokens(nn.Module):
    """(B, C, H, W) -> (B, H*W, C) as a module (the official ``Rearrange('b c h w -> b (h w) c')``; fx-traceable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _image_to_tokens(x)


class Gate(nn.Module):
    """Spatial gate of the MLP: the second half of the channels, layer-normed and depth-wise convolved, gates the
    first."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        x2 = _image_to_tokens(self.conv(_tokens_to_image(self.norm(x2), height, width)))
        return x1 * x2


class MLP(nn.Module):
    """fc1 -> GELU -> gate (halves the width) -> fc2."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.sg = Gate(hidden_features // 2)
        self.fc2 = nn.Linear(hidden_features // 2, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        x = self.drop(self.sg(x, height, width))
        return self.drop(self.fc2(x))


class DynamicPosBias(nn.Module):
    """Relative position bias predicted from the (dy, dx) offsets by a small MLP (CrossFormer's DPB, no residual)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.pos_dim = dim // 4
        self.pos_proj = nn.Linear(2, self.pos_dim)

        def norm_relu_linear(out_dim: int) -> nn.Sequential:
            return nn.Sequential(nn.LayerNorm(self.pos_dim), nn.ReLU(inplace=True), nn.Linear(self.pos_dim, out_dim))

        self.pos1 = norm_relu_linear(self.pos_dim)
        self.pos2 = norm_relu_linear(self.pos_dim)
        self.pos3 = norm_relu_linear(num_heads)

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


class WindowAttention(nn.Module):
    """Multi-head attention inside non-overlapping ``window_h`` x ``window_w`` windows with a dynamic position bias."""

    def __init__(self, dim: int, num_heads: int, window_h: int, window_w: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_h, self.window_w = window_h, window_w
        self.scale = (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.pos = DynamicPosBias(dim // 4, num_heads)
        dy = torch.arange(1 - window_h, window_h)
        dx = torch.arange(1 - window_w, window_w)
        offsets = torch.stack(torch.meshgrid(dy, dx, indexing="ij")).flatten(1).T.float()
        self.register_buffer("rpe_biases", offsets, False)
        coords = torch.stack(torch.meshgrid(torch.arange(window_h), torch.arange(window_w), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        index = (rel[..., 0] + window_h - 1) * (2 * window_w - 1) + rel[..., 1] + window_w - 1
        self.register_buffer("relative_position_index", index, persistent=False)

    def _partition(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, H*W, C) -> (B * windows, heads, window tokens, C/heads), windows in row-major order per image.

        Four dimensions, not five: on CPU, ``scaled_dot_product_attention`` runs its fused (flash) kernel only for 4-D
        inputs with a 4-D mask and otherwise falls back to the unfused matmul-softmax-matmul path (4-5x slower here).
        """
        batch, _, channels = x.shape
        wh, ww = self.window_h, self.window_w
        x = x.view(batch, height // wh, wh, width // ww, ww, self.num_heads, channels // self.num_heads)
        x = x.permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(-1, self.num_heads, wh * ww, channels // self.num_heads)

    def forward(self, qkv: torch.Tensor, height: int, width: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``qkv``: (3, B, H*W, C), H and W multiples of the window; ``mask``: (windows, N, N); returns (B, H, W, C)."""
        batch, _, channels = qkv.shape[1:]
        q, k, v = (self._partition(qkv[i], height, width) for i in range(3))
        tokens = self.window_h * self.window_w
        bias = self.pos(self.rpe_biases)[self.relative_position_index.view(-1)].view(tokens, tokens, -1)
        bias = bias.permute(2, 0, 1).unsqueeze(0).to(q.dtype)  # 1, heads, N, N
        dropout = self.attn_drop if self.training else 0.0
        x = _window_attention(q, k, v, bias, mask, batch, width // self.window_w, dropout, self.scale)
        wh, ww = self.window_h, self.window_w
        x = x.view(batch, height // wh, width // ww, self.num_heads, wh, ww, channels // self.num_heads)
        return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, height, width, channels)


def _build_shift_mask(
    height: int, width: int, window_h: int, window_w: int, shift_h: int, shift_w: int,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Swin-style mask (-100 between tokens from different regions) for cyclically shifted windows; (windows, N, N)."""
    regions = torch.zeros(height, width, device=device)
    label = 0
    for hs in (slice(0, -window_h), slice(-window_h, -shift_h), slice(-shift_h, None)):
        for ws in (slice(0, -window_w), slice(-window_w, -shift_w), slice(-shift_w, None)):
            regions[hs, ws] = label
            label += 1
    windows = regions.view(height // window_h, window_h, width // window_w, window_w).permute(0, 2, 1, 3)
    windows = windows.reshape(-1, window_h * window_w)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0)


_cached_shift_mask = functools.lru_cache(maxsize=32)(_build_shift_mask)


@torch.fx.wrap  # one node under torch.fx tracing (the mask depends on the feature-map size)
def _shift_mask(
    height: int, width: int, window_h: int, window_w: int, shift_h: int, shift_w: int,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """The shifted-window mask, built once per size and device in eager mode (so no forward copies it between host
    and device); under torch.export / torch.compile it is built in the graph, so no traced tensor enters the cache."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return _build_shift_mask(height, width, window_h, window_w, shift_h, shift_w, device)
    return _cached_shift_mask(height, width, window_h, window_w, shift_h, shift_w, device)


class L_SA(nn.Module):
    """Local self-attention: half the heads in ``split_size`` windows, half in the transposed windows (CAT's Rwin).

    ``shifted`` blocks roll the features by half a window first (with the matching attention mask). Features are
    zero-padded on the right/bottom to a multiple of the larger window side, as in the official code.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        split_size: Sequence[int] = (8, 32),
        shifted: bool = False,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.split_size = tuple(split_size)
        self.shift_size = (split_size[0] // 2, split_size[1] // 2)
        self.shifted = shifted
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        short, long = self.split_size
        self.attns = nn.ModuleList(
            [
                WindowAttention(dim // 2, num_heads // 2, short, long, attn_drop),  # horizontal windows
                WindowAttention(dim // 2, num_heads // 2, long, short, attn_drop),  # vertical windows
            ]
        )
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, length, channels = x.shape
        half = channels // 2
        qkv = self.qkv(x).reshape(batch, length, 3, channels).permute(2, 0, 1, 3)  # 3, B, L, C
        lcm = _image_to_tokens(self.get_v(_tokens_to_image(qkv[2], height, width)))

        multiple = max(self.split_size)
        pad_h, pad_w = (-height) % multiple, (-width) % multiple
        ph, pw = height + pad_h, width + pad_w
        qkv = qkv.reshape(3, batch, height, width, channels)
        qkv = _pad_bottom_right(qkv, pad_h, pad_w)
        sh, sw = self.shift_size
        short, long = self.split_size
        if self.shifted:
            qkv0 = torch.roll(qkv[..., :half], shifts=(-sh, -sw), dims=(2, 3)).reshape(3, batch, ph * pw, half)
            qkv1 = torch.roll(qkv[..., half:], shifts=(-sw, -sh), dims=(2, 3)).reshape(3, batch, ph * pw, half)
            mask0 = _shift_mask(ph, pw, short, long, sh, sw, x.device)
            mask1 = _shift_mask(ph, pw, long, short, sw, sh, x.device)
            x0 = torch.roll(self.attns[0](qkv0, ph, pw, mask0), shifts=(sh, sw), dims=(1, 2))
            x1 = torch.roll(self.attns[1](qkv1, ph, pw, mask1), shifts=(sw, sh), dims=(1, 2))
        else:
            x0 = self.attns[0](qkv[..., :half].reshape(3, batch, ph * pw, half), ph, pw)
            x1 = self.attns[1](qkv[..., half:].reshape(3, batch, ph * pw, half), ph, pw)
        x0 = x0[:, :height, :width].reshape(batch, length, half)
        x1 = x1[:, :height, :width].reshape(batch, length, half)
        x = torch.cat([x0, x1], dim=2) + lcm
        return self.proj_drop(self.proj(x))


class RG_SA(nn.Module):
    """Recursive-generalization self-attention (paper Sec. 3.2).

    The recursive generalization module (RGM) applies a stride-4 depth-wise conv ``reduction1`` T times (T from the
    input size, at least 2 at test time), then a 3x3 depth-wise and a 1x1 conv to ``c_ratio * dim`` channels; every
    pixel's query cross-attends to these representative tokens (K with ``c_ratio * dim`` channels, V with ``dim``),
    with a depth-wise conv position encoding added to V.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        c_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.cr = int(dim * c_ratio)
        self.scale = (dim // num_heads * c_ratio) ** -0.5
        self.attn_drop = attn_drop
        self.reduction1 = nn.Conv2d(dim, dim, kernel_size=4, stride=4, groups=dim)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.conv = nn.Conv2d(dim, self.cr, kernel_size=1)
        self.norm_act = nn.Sequential(nn.LayerNorm(self.cr), nn.GELU())
        self.q = nn.Linear(dim, self.cr, bias=qkv_bias)
        self.k = nn.Linear(self.cr, self.cr, bias=qkv_bias)
        self.v = nn.Linear(self.cr, dim, bias=qkv_bias)
        self.cpe = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, length, channels = x.shape
        heads = self.num_heads
        reduced = _recursive_reduction(
            _tokens_to_image(x, height, width), self.reduction1.weight, self.reduction1.bias, self.training
        )
        rh, rw = reduced.shape[-2:]
        reduced = self.norm_act(_image_to_tokens(self.conv(self.dwconv(reduced))))  # B, N', cr

        q = self.q(x).reshape(batch, length, heads, -1).transpose(1, 2)
        k = self.k(reduced).reshape(batch, -1, heads, self.cr // heads).transpose(1, 2)
        v = self.v(reduced)  # B, N', C
        v = v + _image_to_tokens(self.cpe(_tokens_to_image(v, rh, rw)))
        v = v.reshape(batch, -1, heads, channels // heads).transpose(1, 2)
        dropout = self.attn_drop if self.training else 0.0
        x = _cross_attention(q, k, v, dropout, self.scale)
        x = x.transpose(1, 2).reshape(batch, length, channels)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm attention (L-SA or RG-SA) + gated MLP, with HAI: the block input is added again, scaled by ``gamma``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        local: bool,
        shifted: bool,
        split_size: Sequence[int],
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        c_ratio: float = 0.5,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layerscale_value: float = 1e-4,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if local:
            self.attn: nn.Module = L_SA(dim, num_heads, split_size, shifted, qkv_bias, drop, attn_drop)
        else:
            self.attn = RG_SA(dim, num_heads, qkv_bias, attn_drop, drop, c_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = MLP(dim, int(dim * mlp_ratio), drop)
        self.norm2 = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(layerscale_value * torch.ones(dim))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        shortcut = x
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        x = x + self.drop_path(self.mlp(self.norm2(x), height, width))
        return x + shortcut * self.gamma


def _is_shifted(group: int, block: int) -> bool:
    """Which L-SA blocks use shifted windows (official rule): blocks 2, 6, ... of even groups, 0, 4, ... of odd ones."""
    if group % 2 == 0:
        return block > 0 and (block - 2) % 4 == 0
    return block % 4 == 0


class ResidualGroup(nn.Module):
    """``depth`` blocks alternating L-SA (even index) and RG-SA (odd index), a 3x3 conv and a residual connection."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        group_idx: int,
        split_size: Sequence[int],
        drop_paths: Sequence[float],
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim,
                    num_heads,
                    local=i % 2 == 0,
                    shifted=_is_shifted(group_idx, i),
                    split_size=split_size,
                    drop_path=drop_paths[i],
                    **block_kwargs,
                )
                for i in range(depth)
            ]
        )
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        shortcut = x
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, height, width, use_reentrant=False)
            else:
                x = blk(x, height, width)
        return shortcut + _image_to_tokens(self.conv(_tokens_to_image(x, height, width)))


class Upsample(nn.Sequential):
    """Sub-pixel up-sampling: (conv to 4C, pixel shuffle 2) per factor of 2, or (conv to 9C, pixel shuffle 3)."""

    def __init__(self, scale: int, num_feat: int) -> None:
        layers: list[nn.Module] = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, padding=1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, padding=1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"upscale must be a power of 2 or 3, got {scale}")
        super().__init__(*layers)


class RGT(nn.Module):
    """Recursive Generalization Transformer (Chen et al., ICLR 2024) for x2/x3/x4 super-resolution.

    Args:
        upscale: super-resolution factor (a power of 2, or 3).
        in_chans: image channels (the output has as many).
        embed_dim: feature width.
        depth: blocks per residual group (RGT-S: 6 groups of 6; RGT: 8 groups of 6).
        num_heads: attention heads per group.
        mlp_ratio: MLP hidden width / embed_dim.
        qkv_bias: biases in the Q/K/V projections.
        split_size: L-SA window (short, long) sides.
        c_ratio: channel scaling of Q/K in RG-SA.
        img_range: the model works on ``(x - mean) * img_range``.
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout and stochastic depth (linearly rising).
        num_classes: must be 0 (image-to-image model; accepted for timm's interface).
        img_size: accepted for the official constructor's signature; any input size works.
    """

    def __init__(
        self,
        upscale: int = 2,
        in_chans: int = 3,
        embed_dim: int = 180,
        depth: Sequence[int] = (6, 6, 6, 6, 6, 6),
        num_heads: Union[int, Sequence[int]] = 6,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        split_size: Sequence[int] = (8, 32),
        c_ratio: float = 0.5,
        img_range: float = 1.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        num_classes: int = 0,
        img_size: int = 64,
    ) -> None:
        super().__init__()
        if num_classes != 0:
            raise ValueError(f"num_classes must be 0 for RGT (an image-to-image model), got {num_classes}")
        if not isinstance(upscale, int) or upscale < 1 or not (upscale & (upscale - 1) == 0 or upscale == 3):
            raise ValueError(f"upscale must be 1, 2, 4, 8, ... or 3, got {upscale!r}")
        depth = tuple(depth)
        heads = (num_heads,) * len(depth) if isinstance(num_heads, int) else tuple(num_heads)
        if len(heads) != len(depth):
            raise ValueError(f"num_heads {heads} must have one entry per residual group of depth {depth}")
        for h in heads:
            if embed_dim % h or h % 2 or (embed_dim // 2) % (h // 2):
                raise ValueError(f"embed_dim={embed_dim} must split evenly over num_heads={h} (an even number)")
        if len(split_size) != 2 or min(split_size) < 2:
            raise ValueError(f"split_size must be two window sides >= 2, got {tuple(split_size)}")
        self.num_classes = 0
        self.in_chans = in_chans
        self.upscale = self.scale = upscale
        self.img_range = img_range
        self.split_size = tuple(split_size)
        self.num_features = self.embed_dim = embed_dim
        num_feat = 64
        self.head_hidden_size = num_feat  # forward_head(pre_logits=True): the up-sampled features
        mean = DIV2K_RGB_MEAN if in_chans == 3 else (0.0,) * in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, padding=1)
        self.before_RG = nn.Sequential(ImageToTokens(), nn.LayerNorm(embed_dim))
        dpr = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i, (d, h) in enumerate(zip(depth, heads)):
            self.layers.append(
                ResidualGroup(
                    embed_dim,
                    d,
                    h,
                    group_idx=i,
                    split_size=split_size,
                    drop_paths=dpr[sum(depth[:i]) : sum(depth[: i + 1])],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    c_ratio=c_ratio,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                )
            )
            self.feature_info.append(dict(num_chs=embed_dim, reduction=1, module=f"layers.{i}"))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, padding=1)
        self.conv_before_upsample = nn.Sequential(
            nn.Conv2d(embed_dim, num_feat, 3, padding=1), nn.LeakyReLU(inplace=True)
        )
        self.upsample = Upsample(upscale, num_feat)
        self.conv_last = nn.Conv2d(num_feat, in_chans, 3, padding=1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The reconstruction conv producing the image (RGT has no classifier)."""
        return self.conv_last

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if num_classes != 0:
            raise ValueError(f"RGT is an image-to-image model; num_classes must stay 0, got {num_classes}")

    def min_input_size(self, height: int, width: int) -> tuple[int, int]:
        """The smallest (H, W) >= (height, width) that RG-SA's recursive stride-4 reduction can take."""
        return rg_input_size(height, width, self.training)

    def _body(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        height, width = x.shape[-2:]
        tokens = self.before_RG(x)
        intermediates = []
        for layer in self.layers:
            tokens = layer(tokens, height, width)
            intermediates.append(tokens)
        return _tokens_to_image(self.norm(tokens), height, width), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Deep features (B, embed_dim, H, W) of an image whose size the model takes (see ``min_input_size``)."""
        x = _check_input(x, self.in_chans, self.training, "forward_features")
        x = self.conv_first((x - self.mean) * self.img_range)
        return self.conv_after_body(self._body(x)[0]) + x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Reconstruction: conv + LeakyReLU, pixel-shuffle up-sampling, conv to the image (``pre_logits``: not the
        last conv)."""
        x = self.upsample(self.conv_before_upsample(x))
        if pre_logits:
            return x
        return self.conv_last(x) / self.img_range + self.mean

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Residual-group outputs (B, embed_dim, H, W) at ``indices`` for an image the model takes unpadded."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' for RGT, got {output_fmt!r}")
        take_indices, _ = feature_take_indices(len(self.layers), indices)
        x = _check_input(x, self.in_chans, self.training, "forward_intermediates")
        height, width = x.shape[-2:]
        shallow = self.conv_first((x - self.mean) * self.img_range)
        final, groups = self._body(shallow)
        intermediates = [_tokens_to_image(groups[i], height, width) for i in take_indices]
        if intermediates_only:
            return intermediates
        return self.conv_after_body(final) + shallow, intermediates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Super-resolve ``x`` (B, C, H, W) in [0, 1] to (B, C, scale*H, scale*W); any H, W >= 1."""
        x = _check_input(x, self.in_chans, self.training)
        height, width = x.shape[-2:]
        padded = _pad_for_rg(x, self.training)
        return crop_output(self.forward_head(self.forward_features(padded)), height, width, self.upscale)


_BUFFER_SUFFIXES = (".attn_mask_0", ".attn_mask_1", ".rpe_biases", ".relative_position_index")


def checkpoint_filter_fn(state_dict: dict[str, Any], model: RGT) -> dict[str, torch.Tensor]:
    """Convert an official RGT checkpoint (BasicSR: weights under ``params``) to chanzoo's RGT.

    Parameter names are the official ones; the buffers the official code saves (window masks, position-bias
    tables) are recomputed by chanzoo and dropped here. Plain chanzoo state dicts pass through.
    """
    for key in ("params", "params_ema"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    out = {}
    for key, value in state_dict.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if key.endswith(_BUFFER_SUFFIXES):
            continue
        out[key] = value
    return out


def _create_rgt(variant: str, pretrained: bool = False, **kwargs: Any) -> RGT:
    return build_model_with_cfg(
        RGT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=tuple(range(len(kwargs.get("depth", (6,) * 6)))), feature_cls="getter"),
        **kwargs,
    )


_GDRIVE = {
    "rgt_s": "https://drive.google.com/drive/folders/1j46WHs1Gvyif1SsZXKy1Y1IrQH0gfIQ1",
    "rgt": "https://drive.google.com/drive/folders/1zxrr31Kp2D_N9a-OUAPaJEn_yTaSXTfZ",
}


def _cfg(arch: str, scale: int, **kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 0,
        "input_size": (3, 64, 64),
        "min_input_size": (3, MIN_SIZE, MIN_SIZE),  # forward_features' smallest; forward() pads any size
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "first_conv": "conv_first",
        "classifier": "conv_last",
        "license": "apache-2.0",
        "origin_url": _GDRIVE[arch],
        "paper_ids": "arXiv:2303.06373",
        "paper_name": "Recursive Generalization Transformer for Image Super-Resolution",
        "description": f"x{scale} super-resolution: RGB in [0, 1], output {scale}x the input size",
        "notes": (f"scale={scale}", "value range [0, 1]", "trained on DF2K with bicubic (MATLAB imresize) LR"),
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {f"{arch}_x{s}.df2k": _cfg(arch, s) for arch in ("rgt_s", "rgt") for s in (2, 3, 4)}
)

_RGT_S = dict(embed_dim=180, depth=(6,) * 6, num_heads=6, mlp_ratio=2.0, split_size=(8, 32), c_ratio=0.5)
_RGT = dict(embed_dim=180, depth=(6,) * 8, num_heads=6, mlp_ratio=2.0, split_size=(8, 32), c_ratio=0.5)


@register_model
def rgt_s_x2(pretrained: bool = False, **kwargs: Any) -> RGT:
    """RGT-S x2 (6 residual groups of 6 blocks; 10.05M parameters)."""
    return _create_rgt("rgt_s_x2", pretrained, **dict(_RGT_S, upscale=2, **kwargs))


@register_model
def rgt_s_x3(pretrained: bool = False, **kwargs: Any) -> RGT:
    """RGT-S x3 (6 residual groups of 6 blocks; 10.24M parameters)."""
    return _create_rgt("rgt_s_x3", pretrained, **dict(_RGT_S, upscale=3, **kwargs))


@register_model
def rgt_s_x4(pretrained: bool = False, **kwargs: Any) -> RGT:
    """RGT-S x4 (6 residual groups of 6 blocks; 10.20M parameters)."""
    return _create_rgt("rgt_s_x4", pretrained, **dict(_RGT_S, upscale=4, **kwargs))


@register_model
def rgt_x2(pretrained: bool = False, **kwargs: Any) -> RGT:
    """RGT x2 (8 residual groups of 6 blocks; 13.22M parameters)."""
    return _create_rgt("rgt_x2", pretrained, **dict(_RGT, upscale=2, **kwargs))


@register_model
def rgt_x3(pretrained: bool = False, **kwargs: Any) -> RGT:
    """RGT x3 (8 residual groups of 6 blocks; 13.40M parameters)."""
    return _create_rgt("rgt_x3", pretrained, **dict(_RGT, upscale=3, **kwargs))


@register_model
def rgt_x4(pretrained: bool = False, **kwargs: Any) -> RGT:
    """RGT x4 (8 residual groups of 6 blocks; 13.37M parameters)."""
    return _create_rgt("rgt_x4", pretrained, **dict(_RGT, upscale=4, **kwargs))
