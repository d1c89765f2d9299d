"""Cross-scan: merging the four scans gives back four times the image; each scan visits pixels in its own order."""
from __future__ import annotations

import pytest
import torch
from skimage import data

from chanzoo.ops.cross_scan import REVERSED, cross_merge, cross_scan, merge_sources, scan_sources


def photo() -> torch.Tensor:
    """A real image: skimage's astronaut, 3 x 24 x 40 (non-square, so rows and columns differ)."""
    img = torch.from_numpy(data.astronaut()[::16, ::12][:24, :40].copy()).float() / 255
    return img.permute(2, 0, 1).unsqueeze(0)


def test_merge_of_scan_is_four_times_identity():
    x = photo()
    torch.testing.assert_close(cross_merge(cross_scan(x), *x.shape[-2:]), 4 * x)


def test_each_direction_order():
    height, width = 3, 4
    idx = torch.arange(height * width, dtype=torch.float32).view(1, 1, height, width)  # idx[r, c] = r * W + c
    seqs = cross_scan(idx)[0, :, 0].long().tolist()
    row_major = [r * width + c for r in range(height) for c in range(width)]
    col_major_from_top_right = [r * width + c for c in reversed(range(width)) for r in range(height)]
    assert seqs[0] == row_major  # top-left -> bottom-right, along rows
    assert seqs[1] == row_major[::-1]  # bottom-right -> top-left
    assert seqs[2] == col_major_from_top_right  # top-right -> bottom-left, along columns
    assert seqs[3] == col_major_from_top_right[::-1]  # bottom-left -> top-right
    assert seqs[2][0] == width - 1 and seqs[2][-1] == (height - 1) * width  # starts top-right, ends bottom-left


def test_directions_are_permutations_of_the_pixels():
    x = photo()
    scans = cross_scan(x)
    for k in range(4):
        torch.testing.assert_close(scans[:, k].sort(-1).values, x.flatten(2).sort(-1).values)


def test_bad_shapes():
    with pytest.raises(ValueError, match="cross_scan"):
        cross_scan(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="cross_merge"):
        cross_merge(torch.zeros(1, 4, 2, 10), 3, 4)


def test_sources_are_the_forward_orders_and_merge_like_cross_merge():
    """scan_sources holds orders 0 and 2; with REVERSED, they give all four orders; merge_sources of the two
    per-source sums equals cross_merge of the four."""
    x = photo()
    scans, sources = cross_scan(x), scan_sources(x)
    for k, backwards in enumerate(REVERSED):
        source = sources[:, k // 2]
        torch.testing.assert_close(scans[:, k], source.flip(-1) if backwards else source)
    y = torch.cos(torch.arange(scans.numel(), dtype=torch.float32)).view_as(scans) + scans  # four different outputs
    in_source_order = torch.stack([y[:, 0] + y[:, 1].flip(-1), y[:, 2] + y[:, 3].flip(-1)], dim=1)
    torch.testing.assert_close(merge_sources(in_source_order, *x.shape[-2:]), cross_merge(y, *x.shape[-2:]))
    with pytest.raises(ValueError, match="merge_sources"):
        merge_sources(torch.zeros(1, 4, 2, 12), 3, 4)
