"""Channel gating from pooled features, with fused backwards: ``x * g(mean_HW(x))`` (SE, ECA, cSE) and
``x * g_h(mean_W(x)) * g_w(mean_H(x))`` (ELA's strips).

Eager PyTorch runs these modules as a handful of passes over the full (B, C, H, W) map: the pooling, the
multiplies, and in the backward full-size ``grad * x`` temporaries, their reductions, the multiplies by the gates
and the poolings' broadcast gradients added on top. ``pooled_channel_gate`` and ``strip_channel_gate`` cut that to
what the arithmetic needs:

- training (eager, gradients needed): an autograd function whose backward reads ``grad`` and ``x`` once for the
  gates' gradients (batched dot / matrix-vector products, no full-size temporaries where the layout allows) and
  writes the input gradient in one buffer, the poolings' gradients added in place; the small gate network (on the
  pooled vectors) keeps its own autograd graph from the forward, so nothing is recomputed;
- inference with ``inplace=True``: the gates are applied in place, no new full-size tensor;
- under ``torch.compile`` or autocast: the plain expression (the compiler fuses it itself; autocast picks dtypes
  op by op); ``torch.fx`` tracing records it too.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.autograd.function import once_differentiable

GateFn = Callable[[torch.Tensor], torch.Tensor]


def _spatial_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, C): the sum over H and W of ``a * b``; a batched dot product (no full-size temporary) for NCHW tensors."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.matmul(a.flatten(2)[:, :, None], b.flatten(2)[..., None])[:, :, 0, 0]
    return (a * b).sum((2, 3))


def needs_grad(x: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
    """Whether autograd records a module computing from ``x`` and ``params`` (if not, it may scale ``x`` in place)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


def _fused(x: torch.Tensor, recorded: bool) -> bool:
    """Use the fused autograd functions: gradients recorded, eager (the compiler fuses the plain expression
    itself) and no autocast (which picks dtypes op by op)."""
    return recorded and not torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type)


def _gate_network_grads(ctx, n_pooled: int, grad_gates: tuple[torch.Tensor, ...]) -> tuple[list, list]:
    """Back through the gate network kept in ``ctx.gate_graph`` (pooled inputs, then gates): the pooled inputs'
    gradients and one gradient (or None) per entry of ``ctx.params``."""
    pooled, gates = ctx.gate_graph[:n_pooled], ctx.gate_graph[n_pooled:]
    wanted = [i for i in range(len(ctx.params)) if ctx.needs_input_grad[2 + i]]
    # retain_graph: the outer graph may be walked again (retain_graph=True there), and this one is tiny.
    grads = torch.autograd.grad(gates, [*pooled] + [ctx.params[i] for i in wanted], grad_gates, retain_graph=True)
    param_grads: list[torch.Tensor | None] = [None] * len(ctx.params)
    for i, grad in zip(wanted, grads[n_pooled:]):
        param_grads[i] = grad
    return list(grads[:n_pooled]), param_grads


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
        gate = ctx.gate_graph[1].detach()
        (pooled_grad,), param_grads = _gate_network_grads(ctx, 1, (_spatial_dot(grad_out, x),))
        grad_x = None
        if ctx.needs_input_grad[0]:
            pooled_grad = pooled_grad / (x.shape[2] * x.shape[3])
            grad_x = torch.mul(grad_out, gate[:, :, None, None]).add_(pooled_grad[:, :, None, None])
        return (grad_x, None, *param_grads)


StripGateFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _StripGate(torch.autograd.Function):
    """``x * a_h[..., None] * a_w[:, :, None]`` with ``a_h, a_w = gate_fn(x.mean(3), x.mean(2))``, fused backward.

    The backward forms ``grad * x`` once, reduces it against each strip gate with a batched matrix-vector product
    (no full-size temporaries), and writes the input gradient with both strips' pooling gradients folded in.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate_fn: StripGateFn, *params: torch.Tensor) -> torch.Tensor:
        strip_h, strip_w = x.mean(3), x.mean(2)
        with torch.enable_grad():
            strip_h.requires_grad_()
            strip_w.requires_grad_()
            gate_h, gate_w = gate_fn(strip_h, strip_w)
        ctx.gate_graph = (strip_h, strip_w, gate_h, gate_w)
        ctx.params = params
        ctx.save_for_backward(x)
        return torch.mul(x, gate_h.detach()[..., None]).mul_(gate_w.detach()[:, :, None])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        a_h, a_w = (gate.detach() for gate in ctx.gate_graph[2:])
        weighted = grad_out * x
        grad_h = torch.matmul(weighted, a_w[..., None])[..., 0]  # sum over W of grad * x * a_w
        grad_w = torch.matmul(a_h[:, :, None], weighted)[:, :, 0]  # sum over H of grad * x * a_h
        (strip_h_grad, strip_w_grad), param_grads = _gate_network_grads(ctx, 2, (grad_h, grad_w))
        grad_x = None
        if ctx.needs_input_grad[0]:
            height, width = x.shape[2:]
            grad_x = torch.mul(grad_out, a_h[..., None]).mul_(a_w[:, :, None])  # in place: no second full-size buffer
            grad_x.add_((strip_h_grad / width)[..., None]).add_((strip_w_grad / height)[:, :, None])
        return (grad_x, None, *param_grads)


def strip_channel_gate(
    x: torch.Tensor, gate_fn: StripGateFn, params: Sequence[torch.Tensor], inplace: bool = False
) -> torch.Tensor:
    """``x * a_h * a_w`` with ``(a_h, a_w) = gate_fn(mean over W, mean over H)``: (B, C, H) and (B, C, W) gates.

    The strip form of ``pooled_channel_gate`` (ELA, coordinate-style attention); same arguments.
    """
    traced = isinstance(x, torch.fx.Proxy)  # torch.fx tracing records the plain expression
    recorded = traced or needs_grad(x, params)
    if not traced and _fused(x, recorded):
        return _StripGate.apply(x, gate_fn, *params)
    gate_h, gate_w = gate_fn(x.mean(3), x.mean(2))
    if inplace and not recorded:
        return x.mul_(gate_h[..., None]).mul_(gate_w[:, :, None])
    return x * gate_h[..., None] * gate_w[:, :, None]


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
    traced = isinstance(x, torch.fx.Proxy)  # torch.fx tracing records the plain expression
    recorded = traced or needs_grad(x, params)
    if not traced and _fused(x, recorded):
        return _PooledGate.apply(x, gate_fn, *params)
    gate = gate_fn(x.mean((2, 3)))[:, :, None, None]
    if inplace and not recorded:
        return x.mul_(gate)
    return x * gate
