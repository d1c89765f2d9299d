"""Any-size inference for image-to-image models: pad to what a model needs and crop back, and tiled inference.

``pad_to_multiple`` / ``pad_to_size`` pad an NCHW batch on the right and bottom (reflection where the image is large
enough, else edge replication) so that a model whose windows or down-sampling need sizes divisible by ``multiple``
(or at least ``min_size``) can take any image; ``crop_output`` cuts the result back to ``scale`` x the input size.

``tiled_forward`` runs a model on overlapping tiles and blends the outputs with a weight that is 1 inside each tile
and falls off linearly across the overlap, so that images larger than memory allows can be restored. For a model
whose receptive field is smaller than the overlap the result equals the untiled output; for a model with global
context (RGT's recursive-generalization attention, Histoformer's histogram attention) it is close to it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["pad_to_multiple", "pad_to_size", "crop_output", "tiled_forward", "tile_starts"]


def _check_image(x: torch.Tensor, argument: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{argument} must be an NCHW tensor, got {shape}")


def pad_to_size(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad ``x`` (N, C, H, W) on the bottom and right to at least ``height`` x ``width``.

    Reflection padding is used where the image is large enough for it (it keeps image statistics at the border),
    edge replication otherwise.
    """
    _check_image(x)
    pad_h, pad_w = max(0, height - x.shape[-2]), max(0, width - x.shape[-1])
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < x.shape[-2] and pad_w < x.shape[-1] else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def pad_to_multiple(x: torch.Tensor, multiple: int | tuple[int, int], min_size: int = 1) -> torch.Tensor:
    """Pad ``x`` (N, C, H, W) on the bottom and right so that H and W are multiples of ``multiple`` and >= ``min_size``.

    ``multiple`` is one int or an (H, W) pair. The output of the model is cut back with ``crop_output``.
    """
    mult_h, mult_w = (multiple, multiple) if isinstance(multiple, int) else tuple(multiple)
    if mult_h < 1 or mult_w < 1:
        raise ValueError(f"multiple must be positive, got {multiple!r}")
    height, width = max(x.shape[-2], min_size), max(x.shape[-1], min_size)
    return pad_to_size(x, -(-height // mult_h) * mult_h, -(-width // mult_w) * mult_w)


def crop_output(y: torch.Tensor, height: int, width: int, scale: int = 1) -> torch.Tensor:
    """The top-left ``scale*height`` x ``scale*width`` of ``y``: undoes ``pad_to_*`` on a model's output."""
    return y[..., : height * scale, : width * scale]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap`` pixels shared."""
    if tile >= length:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _blend_ramp(length: int, overlap: int, at_start: bool, at_end: bool, device: torch.device) -> torch.Tensor:
    """1-D weight: 1 inside, a linear ramp over ``overlap`` pixels at the tile's inner edges, never exactly 0."""
    ramp = torch.ones(length, device=device)
    if overlap > 0:
        up = torch.arange(1, overlap + 1, device=device, dtype=torch.float32) / (overlap + 1)
        if not at_start:
            ramp[:overlap] = up
        if not at_end:
            ramp[length - overlap :] = torch.minimum(ramp[length - overlap :], up.flip(0))
    return ramp


@torch.no_grad()
def tiled_forward(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    tile_overlap: int = 32,
    scale: int = 1,
    progress: Optional[Callable[[int, int], None]] = None,
) -> torch.Tensor:
    """Run ``model`` on overlapping ``tile`` x ``tile`` crops of ``x`` and blend the outputs.

    Args:
        model: image-to-image callable whose output is ``scale`` x its input size.
        x: (N, C, H, W) input.
        tile: tile side in input pixels; an image no larger than a tile is run in one piece.
        tile_overlap: input pixels shared by neighbouring tiles (blended linearly in the output).
        scale: output/input size ratio of ``model``.
        progress: called as ``progress(done, total)`` after each tile.
    """
    _check_image(x)
    if not isinstance(tile, int) or isinstance(tile, bool) or tile <= 0:
        raise ValueError(f"tile must be a positive int (input pixels), got {tile!r}")
    if not isinstance(tile_overlap, int) or not 0 <= tile_overlap < tile:
        raise ValueError(f"tile_overlap must be an int in [0, tile={tile}), got {tile_overlap!r}")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    height, width = x.shape[-2:]
    rows, cols = tile_starts(height, tile, tile_overlap), tile_starts(width, tile, tile_overlap)
    out: Optional[torch.Tensor] = None
    weight = torch.zeros(1, 1, height * scale, width * scale, device=x.device)
    total, done = len(rows) * len(cols), 0
    for top in rows:
        for left in cols:
            crop = x[..., top : top + tile, left : left + tile]
            y = model(crop)
            th, tw = crop.shape[-2] * scale, crop.shape[-1] * scale
            if y.shape[-2:] != (th, tw):
                raise ValueError(f"model output {tuple(y.shape)} is not scale={scale} x its input {tuple(crop.shape)}")
            if out is None:
                out = torch.zeros(*y.shape[:2], height * scale, width * scale, device=y.device, dtype=torch.float32)
            ov = tile_overlap * scale
            wh = _blend_ramp(th, ov, top == 0, top + tile >= height, y.device)
            ww = _blend_ramp(tw, ov, left == 0, left + tile >= width, y.device)
            w = wh[:, None] * ww[None, :]
            ys, xs = slice(top * scale, top * scale + th), slice(left * scale, left * scale + tw)
            out[..., ys, xs] += y.float() * w
            weight[..., ys, xs] += w
            done += 1
            if progress is not None:
                progress(done, total)
    assert out is not None
    return (out / weight).to(x.dtype)
