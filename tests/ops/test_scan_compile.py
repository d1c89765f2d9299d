"""The chunked PyTorch selective scan traces as one graph (``fullgraph=True``), forward and hand-written backward:
on CUDA without mamba_ssm it is the path inductor turns into fused GPU kernels, so a graph break there costs speed."""
from __future__ import annotations

import pytest
import torch

from chanzoo.ops.selective_scan import selective_scan, selective_scan_ref


@pytest.mark.slow
def test_eager_scan_compiles_with_fullgraph_and_matches_the_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    batch, dim, length, state = 1, 4, 100, 3  # 100 steps: several chunks and a partial block
    u, delta, z = (torch.randn(batch, dim, length, generator=gen) for _ in range(3))
    A = -torch.rand(dim, state, generator=gen)
    B, C = torch.randn(batch, state, length, generator=gen), torch.randn(batch, state, length, generator=gen)
    D = torch.randn(dim, generator=gen)
    inputs = [t.requires_grad_() for t in (u, delta, A, B, C, D, z)]
    torch._dynamo.reset()
    # aot_eager traces forward and backward exactly as inductor would see them, without its code generation time
    compiled = torch.compile(lambda *args: selective_scan(*args, delta_softplus=True, backend="eager"),
                             fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    ref = selective_scan_ref(*inputs, delta_softplus=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4)
