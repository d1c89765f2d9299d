"""Any-size inference for image-to-image models: pad to what a model needs and crop back, and tiled inference.

``pad_to_multiple`` / ``pad_to_size`` pad an NCHW batch on the right and bottom (reflection where the image is large
enough, else edge replication) so that a model whose windows or down-sampling need sizes divisible by ``multiple``
(or at least ``min_size``) can take any image; ``crop_output`` cuts the result back to ``scale`` x the input size.

``tiled_forward`` runs a model on overlapping tiles, so that images larger than memory allows can be restored; each
output pixel is taken from the tile whose centre is nearest along each axis (seams halfway through each overlap, so
every kept pixel is at least ``tile_overlap / 2`` input pixels from a tile edge, as in BasicSR's chopped testing). For
a model whose receptive field reaches less than ``tile_overlap / 2`` pixels the result equals the untiled output; for
a model with global context (RGT's recursive-generalization attention, Histoformer's histogram attention) it is
close to it.
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


def _owned_ranges(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """The [lo, hi) part of the axis each tile writes: boundaries halfway through each overlap."""
    bounds = [(a + b + tile) // 2 for a, b in zip(starts, starts[1:])]
    return list(zip([0] + bounds, bounds + [length]))


@torch.no_grad()
def tiled_forward(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    tile_overlap: int = 32,
    scale: int = 1,
    progress: Optional[Callable[[int, int], None]] = None,
) -> torch.Tensor:
    """Run ``model`` on overlapping ``tile`` x ``tile`` crops of ``x`` and stitch the outputs (seams mid-overlap).

    Args:
        model: image-to-image callable whose output is ``scale`` x its input size.
        x: (N, C, H, W) input.
        tile: tile side in input pixels; an image no larger than a tile is run in one piece.
        tile_overlap: input pixels shared by neighbouring tiles (at least; the last tile may share more).
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
    row_parts, col_parts = _owned_ranges(rows, tile, height), _owned_ranges(cols, tile, width)
    out: Optional[torch.Tensor] = None
    total, done = len(rows) * len(cols), 0
    for top, (row_lo, row_hi) in zip(rows, row_parts):
        for left, (col_lo, col_hi) in zip(cols, col_parts):
            crop = x[..., top : top + tile, left : left + tile]
            y = model(crop)
            if y.shape[-2:] != (crop.shape[-2] * scale, crop.shape[-1] * scale):
                raise ValueError(f"model output {tuple(y.shape)} is not scale={scale} x its input {tuple(crop.shape)}")
            if out is None:
                out = y.new_zeros(*y.shape[:2], height * scale, width * scale)
            out[..., row_lo * scale : row_hi * scale, col_lo * scale : col_hi * scale] = y[
                ..., (row_lo - top) * scale : (row_hi - top) * scale, (col_lo - left) * scale : (col_hi - left) * scale
            ]
            done += 1
            if progress is not None:
                progress(done, total)
    assert out is not None
    return out
