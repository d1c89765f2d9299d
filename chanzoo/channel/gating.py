"""``x * gate(mean_HW(x))``: the pooled channel gating of SE, ECA and cSE, with a fused backward.

Eager PyTorch runs these modules as a handful of passes over the full (B, C, H, W) map: the pooling, the
multiply, and in the backward a full-size ``grad * x`` temporary, its reduction, the multiply by the gate and the
pooling's broadcast gradient added on top. ``pooled_channel_gate`` cuts that to what the arithmetic needs:

- training (eager, gradients needed): an autograd function whose backward reads ``grad`` and ``x`` once for the
  gate's gradient and writes the input gradient in one ``addcmul`` (the pooling gradient folded in); the small
  gate network (``gate_fn`` on the (B, C) pooled vector) keeps its own autograd graph from the forward;
- inference with ``inplace=True``: the gate is applied in place, no new full-size tensor;
- under ``torch.compile`` or autocast: the plain expression (the compiler fuses it itself; autocast picks dtypes
  op by op).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.autograd.function import once_differentiable

GateFn = Callable[[torch.Tensor], torch.Tensor]


class _PooledGate(torch.autograd.Function):
    """``x * gate_fn(x.mean((2, 3)))[..., None, None]`` with a fused backward (``params``: gate_fn's tensors).

    The small gate network is recorded by autograd inside the forward, on a detached copy of the pooled vector, and
    differentiated from there in the backward, so nothing is recomputed.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate_fn: GateFn, *params: torch.Tensor) -> torch.Tensor:
        pooled = x.mean((2, 3))
        with torch.enable_grad():
            pooled.requires_grad_()
            gate = gate_fn(pooled)
        ctx.gate_graph = (pooled, gate)
        ctx.params = params
        ctx.save_for_backward(x)
        return x * gate.detach()[:, :, None, None]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        pooled, gate = ctx.gate_graph
        grad_gate = (grad_out * x).sum((2, 3))
        wanted = [i for i in range(len(ctx.params)) if ctx.needs_input_grad[2 + i]]
        # retain_graph: the outer graph may be walked again (retain_graph=True there), and this one is tiny.
        grads = torch.autograd.grad(gate, [pooled] + [ctx.params[i] for i in wanted], grad_gate, retain_graph=True)
        param_grads: list[torch.Tensor | None] = [None] * len(ctx.params)
        for i, grad in zip(wanted, grads[1:]):
            param_grads[i] = grad
        grad_x = None
        if ctx.needs_input_grad[0]:
            pooled_grad = grads[0] / (x.shape[2] * x.shape[3])
            grad_x = torch.addcmul(pooled_grad[:, :, None, None], grad_out, gate.detach()[:, :, None, None])
        return (grad_x, None, *param_grads)


def needs_grad(x: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
    """Whether autograd records a module computing from ``x`` and ``params`` (if not, it may scale ``x`` in place)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


def pooled_channel_gate(
    x: torch.Tensor, gate_fn: GateFn, params: Sequence[torch.Tensor], inplace: bool = False
) -> torch.Tensor:
    """``x * gate_fn(x.mean((2, 3)))`` broadcast over H and W.

    Args:
        x: (B, C, H, W) features, any memory format.
        gate_fn: maps the pooled (B, C) vector to the (B, C) gate; it may only use ``params`` as weights.
        params: every tensor ``gate_fn`` reads that may need a gradient (the module's parameters).
        inplace: write the result into ``x`` when no gradient is needed (inference); ignored otherwise. Only for
            callers that do not read ``x`` again, like the attention slot of a ResNet block.
    """
    recorded = needs_grad(x, params)
    if recorded and not torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type):
        return _PooledGate.apply(x, gate_fn, *params)
    gate = gate_fn(x.mean((2, 3)))[:, :, None, None]
    if inplace and not recorded:
        return x.mul_(gate)
    return x * gate
