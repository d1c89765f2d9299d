"""The channel-module contract, checked on every registered module (``list_channel_modules()``).

Each module maps an NCHW map to one of the same shape and dtype, in any memory format, back-propagates to its
input and every parameter, and has the parameter count its paper defines: ``PARAMETER_COUNTS`` holds one formula
per name, so a new module fails here until its count is written down. A module file that the package does not
import would never register; the last test rules that out.
"""
from __future__ import annotations

import math
import pkgutil
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

import chanzoo
import chanzoo.channel

CHANNELS = 64  # divisible by every GroupNorm/group count the modules use (ELA: 32, 16, 8-channel conv groups)


def _eca_kernel(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """ECA-Net's adaptive kernel size: |log2(C)/gamma + beta/gamma|, to the nearest odd number at or above."""
    t = int(abs((math.log2(channels) + beta) / gamma))
    return t if t % 2 else t + 1


def _cse(c: int, r: int = 2) -> int:
    """cSE (Roy et al. 2018): FC C -> C/r and C/r -> C, with biases."""
    return c * (c // r) + c // r + (c // r) * c + c


def _psa_channel_and_spatial_branches(c: int) -> int:
    """PSA's two branches: W_q of the channel branch (C -> 1) and three C -> C/2 1x1 convs, no biases."""
    return c + 3 * c * (c // 2)


def _psa_s_bottleneck(c: int, ratio: int = 4) -> int:
    """PSA_s's W_z: 1x1 conv C/2 -> C/8 (bias), LayerNorm over C/8 (weight, bias), 1x1 conv C/8 -> C (bias)."""
    hidden = c // 2 // ratio
    return (c // 2) * hidden + hidden + 2 * hidden + hidden * c + c


# Parameters of each registered module at C channels, from its paper's definition.
PARAMETER_COUNTS: dict[str, Callable[[int], int]] = {
    # SE (Hu et al. 2018), r = 16: FC C -> C/16 and C/16 -> C with biases.
    "se": lambda c: c * (c // 16) + c // 16 + (c // 16) * c + c,
    # ECA (Wang et al. 2020): one 1-D conv of the adaptive size k across channels, no bias.
    "eca": _eca_kernel,
    # ELA (Xu & Wan 2024): one Conv1d of kernel k shared by both strips (depthwise for T/B, 8 input channels per
    # group for S/L), no bias, then GroupNorm's weight and bias.
    "ela_t": lambda c: c * 5 + 2 * c,
    "ela_b": lambda c: c * 7 + 2 * c,
    "ela_s": lambda c: c * 8 * 5 + 2 * c,
    "ela_l": lambda c: c * 8 * 7 + 2 * c,
    # scSE (Roy et al. 2018): cSE with r = 2, sSE a 1x1 conv C -> 1 with bias, and both together.
    "cse": _cse,
    "sse": lambda c: c + 1,
    "scse": lambda c: _cse(c) + c + 1,
    # PSA (Liu et al. 2021), the released layouts: W_z is a C/2 -> C 1x1 conv (parallel) or a bottleneck (sequential).
    "psa_p": lambda c: _psa_channel_and_spatial_branches(c) + (c // 2) * c,
    "psa_s": lambda c: _psa_channel_and_spatial_branches(c) + _psa_s_bottleneck(c),
}


@pytest.mark.parametrize("name", chanzoo.list_channel_modules())
def test_channel_module_contract(features, name: str) -> None:
    torch.manual_seed(0)
    module = chanzoo.create_channel_module(name, CHANNELS)
    assert name in PARAMETER_COUNTS, f"write the parameter count of {name!r} from its paper into PARAMETER_COUNTS"
    assert sum(p.numel() for p in module.parameters()) == PARAMETER_COUNTS[name](CHANNELS)

    # shape and gradients: to the input and to every parameter
    x = features(CHANNELS, 9).requires_grad_(True)  # odd side: no accidental reliance on even sizes
    y = module(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for param_name, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name

    module.eval()
    x = x.detach()
    with torch.no_grad():
        reference = module(x)
        # channels-last input: the same values
        torch.testing.assert_close(module(x.to(memory_format=torch.channels_last)), reference)
        # other dtypes: module and input converted together, output in that dtype and close to float32
        for dtype, tolerance in ((torch.float64, 1e-5), (torch.bfloat16, 0.08)):
            converted = module.to(dtype)(x.to(dtype))
            assert converted.dtype == dtype and converted.shape == x.shape
            torch.testing.assert_close(converted.float(), reference, atol=tolerance, rtol=tolerance)
            module.float()


def test_every_module_file_is_imported_by_the_package() -> None:
    """A channel-module file is registered by ``import chanzoo`` without being listed anywhere."""
    files = {info.name for info in pkgutil.iter_modules(chanzoo.channel.__path__)}
    assert {path.stem for path in Path(chanzoo.channel.__path__[0]).glob("[!_]*.py")} == files
    assert all(f"chanzoo.channel.{name}" in sys.modules for name in files)
    registered_in = {
        getattr(chanzoo.channel.get_channel_module(name), "module_class", chanzoo.channel.get_channel_module(name))
        .__module__ for name in chanzoo.list_channel_modules()
    }
    assert registered_in <= {f"chanzoo.channel.{name}" for name in files}
