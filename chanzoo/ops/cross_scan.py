"""Four-direction cross-scan of a feature map and its merge (the Cross-Scan Module of VMamba, Liu et al. 2024).

MambaMixer (Behrouz et al. 2024, Sec. 4.1) scans each image "in four directions: top-left to bottom-right,
bottom-right to top-left, top-right to bottom-left, and bottom-left to top-right", horizontally and vertically.
chanzoo reads this as (index k of the stacked output):

0. row-major from the top-left corner (rows top to bottom, each left to right), ending bottom-right;
1. the reverse of 0: from the bottom-right corner to the top-left;
2. column-major from the top-right corner (columns right to left, each top to bottom), ending bottom-left;
3. the reverse of 2: from the bottom-left corner to the top-right.

``cross_merge`` maps every direction's sequence back to the pixel it came from and sums the four, so
``cross_merge(cross_scan(x)) == 4 * x``.

Orders 1 and 3 are 0 and 2 read backwards. ``scan_sources`` gives only the two forward orders (REVERSED marks which
of the four directions read their source backwards), for a scan that reverses by indexing
(``chanzoo.ops.selective_scan.selective_scan_directions``) and adds each pair of outputs itself; ``merge_sources``
puts the two summed outputs back in pixel order.
"""
from __future__ import annotations

import torch

__all__ = ["cross_scan", "cross_merge", "scan_sources", "merge_sources", "NUM_DIRECTIONS", "REVERSED"]

NUM_DIRECTIONS = 4
REVERSED = (False, True, False, True)  # direction k of cross_scan reads source k // 2 of scan_sources backwards


def _check(x: torch.Tensor, ndim: int, name: str, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected a {layout} tensor, got shape {tuple(x.shape)}")


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, H*W): the four scan orders of the feature map, stacked."""
    _check(x, 4, "cross_scan", "(B, C, H, W)")
    rows = x.flatten(2)  # 0: row-major from the top-left
    cols = x.flip(-1).transpose(-1, -2).flatten(2)  # 2: column-major from the top-right
    return torch.stack([rows, rows.flip(-1), cols, cols.flip(-1)], dim=1)


def cross_merge(y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 4, C, H*W) -> (B, C, H, W): each direction put back in pixel order, then summed."""
    _check(y, 4, "cross_merge", f"(B, {NUM_DIRECTIONS}, C, H*W)")
    batch, directions, channels, length = y.shape
    if directions != NUM_DIRECTIONS or length != height * width:
        raise ValueError(
            f"cross_merge: expected shape (B, {NUM_DIRECTIONS}, C, {height}*{width}), got {tuple(y.shape)}"
        )
    rows = y[:, 0] + y[:, 1].flip(-1)
    cols = (y[:, 2] + y[:, 3].flip(-1)).view(batch, channels, width, height).transpose(-1, -2).flip(-1)
    return rows.view(batch, channels, height, width) + cols


def scan_sources(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2, C, H*W): scan orders 0 and 2 (row-major from the top-left, column-major from the
    top-right), of which orders 1 and 3 are the reverses."""
    _check(x, 4, "scan_sources", "(B, C, H, W)")
    return torch.stack([x.flatten(2), x.flip(-1).transpose(-1, -2).flatten(2)], dim=1)


def merge_sources(y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 2, C, H*W) in the orders of ``scan_sources`` -> (B, C, H, W): both put back in pixel order and summed."""
    _check(y, 4, "merge_sources", "(B, 2, C, H*W)")
    batch, sources, channels, length = y.shape
    if sources != 2 or length != height * width:
        raise ValueError(f"merge_sources: expected shape (B, 2, C, {height}*{width}), got {tuple(y.shape)}")
    rows, cols = y.unbind(1)  # not y[:, 0], y[:, 1]: each select's backward would zero-fill a tensor of y's size
    cols = cols.reshape(batch, channels, width, height).transpose(-1, -2).flip(-1)
    return rows.reshape(batch, channels, height, width) + cols
