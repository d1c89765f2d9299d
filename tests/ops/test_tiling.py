"""Padding/cropping and tiled inference (chanzoo.ops.tiling) on real photos."""
from __future__ import annotations

import pytest
import torch
from skimage import data
from torch import nn

from chanzoo.models.rgt import RGT
from chanzoo.ops.tiling import crop_output, pad_to_multiple, pad_to_size, tile_starts, tiled_forward


def _photo(height: int, width: int) -> torch.Tensor:
    return torch.from_numpy(data.coffee()[50 : 50 + height, 100 : 100 + width]).permute(2, 0, 1)[None].float() / 255


def _local_sr(scale: int) -> nn.Module:
    """A conv SR net whose output pixel sees input pixels within 2 px (two 3x3 convs, then pixel shuffle)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale)
    ).eval()


def test_pad_to_multiple_reflects_and_crop_inverts() -> None:
    x = _photo(21, 30)
    padded = pad_to_multiple(x, 8)
    assert padded.shape[-2:] == (24, 32)
    torch.testing.assert_close(padded[..., :21, :30], x)
    torch.testing.assert_close(padded[..., 21, :30], x[..., 19, :])  # reflection about the last row
    assert pad_to_multiple(x, (1, 1), min_size=40).shape[-2:] == (40, 40)  # too small to reflect: replicated
    torch.testing.assert_close(crop_output(torch.zeros(1, 3, 96, 128), 21, 30, scale=4), torch.zeros(1, 3, 84, 120))
    assert pad_to_size(x, 10, 10) is x


def test_tile_starts_cover_with_overlap() -> None:
    assert tile_starts(100, 40, 8) == [0, 32, 60]
    assert tile_starts(30, 40, 8) == [0]
    for length, tile, overlap in [(100, 40, 8), (257, 64, 16), (64, 64, 8)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[-1] + tile == max(length, tile) and all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_tiled_equals_untiled_for_a_local_model(scale: int) -> None:
    model = _local_sr(scale)
    x = _photo(70, 95)
    with torch.no_grad():
        full = model(x)
    calls = []
    tiled = tiled_forward(model, x, tile=32, tile_overlap=8, scale=scale, progress=lambda d, t: calls.append((d, t)))
    torch.testing.assert_close(tiled, full, rtol=1e-5, atol=1e-5)
    assert calls[-1] == (12, 12)  # 3 rows x 4 columns of tiles


def test_one_tile_is_the_plain_forward() -> None:
    model = RGT(upscale=2, embed_dim=32, num_heads=2, depth=(2,), drop_path_rate=0.0).eval()
    x = _photo(20, 28)
    with torch.no_grad():
        torch.testing.assert_close(tiled_forward(model, x, tile=64, scale=2), model(x), rtol=0, atol=0)


def test_tiled_rgt_is_close_to_untiled() -> None:
    """RG-SA attends globally, so tiles differ slightly from the whole image; with overlap the blend stays close."""
    torch.manual_seed(0)
    model = RGT(upscale=2, embed_dim=32, num_heads=2, depth=(2, 2), drop_path_rate=0.0).eval()
    x = _photo(48, 64)
    with torch.no_grad():
        full = model(x)
    tiled = tiled_forward(model, x, tile=32, tile_overlap=16, scale=2)
    assert tiled.shape == full.shape
    mse = (tiled - full).pow(2).mean()
    assert 10 * torch.log10(full.var() / mse) > 40  # the tiled output is within 40 dB SNR of the untiled one


def test_bad_tiling_arguments_are_named() -> None:
    model, x = _local_sr(1), _photo(16, 16)
    with pytest.raises(ValueError, match="tile must be a positive int.*got 0"):
        tiled_forward(model, x, tile=0)
    with pytest.raises(ValueError, match=r"tile_overlap must be an int in \[0, tile=16\), got 16"):
        tiled_forward(model, x, tile=16, tile_overlap=16)
    with pytest.raises(ValueError, match="not scale=2 x its input"):
        tiled_forward(model, x, tile=8, tile_overlap=2, scale=2)
    with pytest.raises(ValueError, match="NCHW"):
        pad_to_multiple(torch.zeros(3, 4, 4), 8)
