"""The S6 selective scan (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023).

``selective_scan`` has the signature and shapes of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``::

    u, delta, z: (batch, dim, L)    A: (dim, N)    B, C: (batch, N, L) or (batch, groups, N, L)
    D, delta_bias: (dim,)           returns (batch, dim, L)

    delta' = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t = exp(delta'_t A) * h_{t-1} + delta'_t * u_t * B_t          (h: (batch, dim, N), h_0 = 0)
    y_t = <C_t, h_t> + D * u_t;   out = y * silu(z)

Backends (the scan core ``y_t = <C_t, h_t>``; D, z and the delta transform are shared torch code):

- ``reference``: the step-by-step recurrence, written to be obviously right (used by the tests).
- ``cpp``: a small OpenMP C++ kernel (``csrc/selective_scan.cpp``) with its own reverse-scan backward, compiled with
  the system C++ compiler at first use into torch's extensions cache and registered as the ``chanzoo::`` ops of
  ``torch.library``; CPU float32 only. The default on the CPU.
- ``eager``: plain PyTorch ops on any device; the sequence is cut into blocks (never the whole (batch, dim, L, N)
  state tensor at once), each block into chunks scanned in parallel and joined by a short scan over chunk ends. Its
  hand-written backward recomputes one block's states at a time from the saved block-start states and runs the
  reverse scan the same way. Used where the C++ kernel cannot be built.
- ``mamba_ssm``: the fused CUDA kernel of the ``mamba_ssm`` package, used automatically for CUDA tensors when the
  package is installed.

Every path is numerically safe for delta' >= 0 and A <= 0: they only multiply decays exp(delta' A) <= 1 and never
take the exponential of a growing positive sum.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

__all__ = ["selective_scan", "selective_scan_directions", "selective_scan_projected", "selective_scan_ref",
           "available_backends", "BACKENDS"]

_logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "eager", "cpp", "mamba_ssm")
_CSRC = Path(__file__).parent / "csrc" / "selective_scan.cpp"
_CPP_CHUNK = 64  # steps per saved state in the C++ forward (the backward recomputes one chunk at a time)
# Eager path: steps per chunk (a block's chunks are scanned all at once) and per block (it holds (batch, dim, block, N)
# tensors at most). 32 x 128 is within 10% of the fastest choice on this 2-core CPU when it is quiet, and at the
# ViM2-T stage-1 size keeps the per-step slabs under torch's parallel grain size, so the scans' ~190 small ops per
# block (forward and backward) do not each wait for a second thread: several times faster than 16 x 128 while other
# jobs load the cores.
_EAGER_CHUNK = 32
_EAGER_BLOCK = 128
_LOG2E = 1.4426950408889634  # the eager path takes exp(x) as exp2(x log2 e): torch's exp2 is several times faster
_lib_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_lib_error: Optional[str] = None
_logged: set[str] = set()


# ----------------------------------------------------------------------------------------------------------------
# Argument checks and the shared pre/post-processing.


def _check(u, delta, A, B, C, D, z, delta_bias) -> int:
    """Validate shapes (ValueError/TypeError naming the argument); returns the number of B/C groups."""
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
    if u.ndim != 3:
        raise ValueError(f"selective_scan: u must have shape (batch, dim, L), got {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.ndim != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must have shape (dim={dim}, N), got {tuple(A.shape)}")
    n_state = A.shape[1]
    groups = 1
    for name, t in (("B", B), ("C", C)):
        if t.ndim == 3 and t.shape == (batch, n_state, length):
            continue
        if t.ndim == 4 and t.shape[0] == batch and t.shape[2:] == (n_state, length) and dim % t.shape[1] == 0:
            groups = t.shape[1]
            continue
        raise ValueError(
            f"selective_scan: {name} must have shape (batch={batch}, N={n_state}, L={length}) or "
            f"(batch, groups, N, L) with groups dividing dim={dim}, got {tuple(t.shape)}"
        )
    if B.ndim != C.ndim or (B.ndim == 4 and B.shape[1] != C.shape[1]):
        raise ValueError(f"selective_scan: B {tuple(B.shape)} and C {tuple(C.shape)} must have the same grouping")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"selective_scan: {name} must have shape (dim={dim},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    return groups


def _grouped(t: torch.Tensor) -> torch.Tensor:
    """B or C as (batch, groups, N, L) float32."""
    return (t.unsqueeze(1) if t.ndim == 3 else t).float()


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The selective scan as a plain step-by-step recurrence (slow; the definition the other paths are tested on)."""
    groups = _check(u, delta, A, B, C, D, z, delta_bias)
    dtype = u.dtype
    u, delta, A = u.float(), delta.float(), A.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    Bx = _grouped(B).repeat_interleave(dim // groups, dim=1)  # (batch, dim, N, L)
    Cx = _grouped(C).repeat_interleave(dim // groups, dim=1)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for dt, ut, bt, ct in zip(delta.unbind(-1), u.unbind(-1), Bx.unbind(-1), Cx.unbind(-1)):
        h = torch.exp(dt[..., None] * A) * h + (dt * ut)[..., None] * bt
        ys.append((h * ct).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Eager chunked path: an autograd.Function whose backward recomputes one block's states and runs the reverse scan.
#
# The sequence is cut into blocks of nc chunks of T steps and laid out (n_blocks, T, nc, ...): within a block, each
# scan step reads and writes one contiguous (nc, b, d, N) slab covering all the block's chunks at once, and a short
# scan over the chunk ends joins them. B and C stay per group, (T, nc, b, G, 1, N), broadcast over the group's
# K = d / G channels. Per-block tensors go into buffers allocated once per call (fresh multi-MiB allocations cost
# page faults on every block).


def _layout(length: int) -> tuple[int, int, int]:
    """(chunk, block, padded length): equal blocks of whole chunks, at most _EAGER_BLOCK steps each."""
    chunk = min(_EAGER_CHUNK, length)
    n_chunks = -(-length // chunk)
    n_blocks = -(-n_chunks * chunk // _EAGER_BLOCK)
    block = -(-n_chunks // n_blocks) * chunk
    return chunk, block, n_blocks * block


def _to_blocks(t: torch.Tensor, chunk: int, block: int, padded: int) -> torch.Tensor:
    """(..., L) -> contiguous (n_blocks, T, nc, ...), zero-padded to ``padded`` steps: padded steps neither decay
    (delta = 0) nor drive (u = 0) or read (C = 0) the state."""
    *lead, length = t.shape
    t = F.pad(t, (0, padded - length)).reshape(*lead, padded // block, block // chunk, chunk)
    return t.movedim((-3, -1, -2), (0, 1, 2)).contiguous()


def _from_blocks(t: torch.Tensor, length: int) -> torch.Tensor:
    """(n_blocks, T, nc, ...) -> (..., length), the inverse of ``_to_blocks``."""
    return t.movedim((0, 1, 2), (-3, -1, -2)).flatten(-3)[..., :length]


def _scan_block(delta: torch.Tensor, A2: torch.Tensor, h: torch.Tensor, h0: torch.Tensor,
                decay: torch.Tensor) -> torch.Tensor:
    """h_t = exp(delta_t A) h_{t-1} + x_t over one block, in place: ``h`` (T, nc, b, d, N) holds x, then the states.

    delta: (T, nc, b, d); A2 = A log2(e), (d, N); h0: (b, d, N), the state before the block. Writes the decays
    exp(delta A) into ``decay`` (T, nc, b, d, N) and returns the state before each chunk (nc + 1, b, d, N; the last
    is the block's final state). A first pass rolls each chunk from a zero state to its end, a scan over the chunk
    ends gives every chunk's true starting state, and a second pass rolls the chunks again from those.
    """
    torch.mul(delta[..., None], A2, out=decay).exp2_()
    states, decays = h.unbind(0), decay.unbind(0)
    end = states[0].clone()
    for k in range(1, len(states)):
        torch.addcmul(states[k], decays[k], end, out=end)
    chunk_decay = torch.exp2(delta.sum(0)[..., None] * A2)  # (nc, b, d, N): exp of A times a sum of deltas >= 0
    starts = h.new_empty(h.shape[1] + 1, *h0.shape)
    starts[0] = h0
    for c, (end_c, decay_c) in enumerate(zip(end.unbind(0), chunk_decay.unbind(0))):
        torch.addcmul(end_c, decay_c, starts[c], out=starts[c + 1])
    states[0].addcmul_(decays[0], starts[:-1])
    for k in range(1, len(states)):
        states[k].addcmul_(decays[k], states[k - 1])
    return starts


def _reverse_scan_block(delta: torch.Tensor, A2: torch.Tensor, decay: torch.Tensor, g: torch.Tensor,
                        carry: torch.Tensor) -> torch.Tensor:
    """dh_t = g_t + exp(delta_{t+1} A) dh_{t+1} over one block, in place: ``g`` (T, nc, b, d, N) holds g, then dh.

    ``carry`` (b, d, N) is exp(delta A) dh at the step after the block (zero after the last); returns the same
    product at the block's first step, the carry into the previous block. Two passes as in ``_scan_block``.
    """
    grads, decays = g.unbind(0), decay.unbind(0)
    begin = grads[-1].clone()
    for k in range(len(grads) - 2, -1, -1):
        torch.addcmul(grads[k], decays[k + 1], begin, out=begin)
    chunk_decay = torch.exp2(delta[1:].sum(0)[..., None] * A2)  # from each chunk's first step to its end
    carries = torch.empty_like(begin)
    for c in range(len(carries) - 1, -1, -1):
        carries[c] = carry
        carry = decays[0][c] * torch.addcmul(begin[c], chunk_decay[c], carry)
    grads[-1].add_(carries)
    for k in range(len(grads) - 2, -1, -1):
        grads[k].addcmul_(decays[k + 1], grads[k + 1])
    return carry


class _EagerScan(torch.autograd.Function):
    """Scan core y_t = <C_t, h_t> block by block; u, delta (b, d, L), A (d, N), B, C (b, G, N, L), all float32.

    The forward keeps only the state at each block start; the backward recomputes one block's states at a time and
    runs the reverse recurrence dh_t = C_t dy_t + exp(delta_{t+1} A) dh_{t+1} chunk-parallel like the forward, then
    reduces dh and the states to the input gradients with batched matrix products and sums.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                C: torch.Tensor) -> torch.Tensor:
        batch, dim, length = u.shape
        groups, n_state = B.shape[1], A.shape[1]
        layout = _layout(length)
        u, delta = (_to_blocks(t, *layout) for t in (u, delta))  # (n_blocks, T, nc, b, d)
        B, C = (_to_blocks(t, *layout).unsqueeze(-2) for t in (B, C))  # (n_blocks, T, nc, b, G, 1, N)
        grouped = (*u.shape[1:4], groups, dim // groups, 1)
        h = u.new_empty(*grouped[:-1], n_state)  # (T, nc, b, G, K, N)
        decay = u.new_empty(*u.shape[1:], n_state)
        y = u.new_empty(u.shape[0], *grouped)
        A2, h0, block_starts = A * _LOG2E, u.new_zeros(batch, dim, n_state), []
        for i in range(len(u)):
            block_starts.append(h0)
            torch.mul((delta[i] * u[i]).view(grouped), B[i], out=h)
            h0 = _scan_block(delta[i], A2, h.flatten(3, 4), h0, decay)[-1]
            torch.matmul(h, C[i].transpose(-1, -2), out=y[i])
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(block_starts))
        return _from_blocks(y.flatten(-3), length)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        u, delta, A, B, C, block_starts = ctx.saved_tensors
        length = dy.shape[-1]
        dy = _to_blocks(dy, *_layout(length))
        grouped = (*u.shape[1:4], B.shape[4], u.shape[-1] // B.shape[4], 1)
        du, ddelta, dB, dC = (torch.empty_like(t) for t in (u, delta, B, C))
        dA, A2 = torch.zeros_like(A), A * _LOG2E
        h, dh = u.new_empty(*grouped[:-1], A.shape[1]), u.new_empty(*grouped[:-1], A.shape[1])
        decay = u.new_empty(*u.shape[1:], A.shape[1])
        carry = torch.zeros_like(block_starts[0])
        for i in range(len(u) - 1, -1, -1):
            drive = (delta[i] * u[i]).view(grouped)  # (T, nc, b, G, K, 1)
            torch.mul(drive, B[i], out=h)
            starts = _scan_block(delta[i], A2, h.flatten(3, 4), block_starts[i], decay)
            torch.mul(dy[i].view(grouped), C[i], out=dh)
            carry = _reverse_scan_block(delta[i], A2, decay, dh.flatten(3, 4), carry)
            # Sums over the group's channels (dB, dC) and over the states (<dh_t, B_t>) as batched matrix products.
            torch.matmul(dy[i].view(grouped).transpose(-1, -2), h, out=dC[i])
            torch.matmul(drive.transpose(-1, -2), dh, out=dB[i])
            dh_b = torch.matmul(dh, B[i].transpose(-1, -2)).view_as(u[i])
            torch.mul(delta[i], dh_b, out=du[i])
            # dh_t exp(delta_t A) h_{t-1}: the gradient through the decay, for dA and the rest of ddelta.
            r = dh.flatten(3, 4).mul_(decay)
            r[1:].mul_(h.flatten(3, 4)[:-1])
            r[0].mul_(starts[:-1])
            torch.addcmul(torch.mul(r, A, out=decay).sum(-1), u[i], dh_b, out=ddelta[i])  # decay is free: scratch
            dA += r.mul_(delta[i][..., None]).sum((0, 1, 2))
        return (_from_blocks(du, length), _from_blocks(ddelta, length), dA, _from_blocks(dB.squeeze(-2), length),
                _from_blocks(dC.squeeze(-2), length))


def _scan_eager(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """Scan core through the eager autograd.Function; B, C come in as (b, G, N, L)."""
    return _EagerScan.apply(u, delta, A, B, C)


# ----------------------------------------------------------------------------------------------------------------
# C++ path: built at first use, registered with torch.library.


_BUILD_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared", "-std=c++17")


def _cpu_signature() -> str:
    """The CPU's model and instruction-set flags: what ``-march=native`` compiles for."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _build_dir(compiler: str) -> Path:
    """The library's folder in torch's extensions cache, keyed by source, compiler, flags and CPU: a cache shared by
    machines of different CPUs (a home directory on a cluster) never hands one a library built for another's
    instruction set."""
    from torch.utils.cpp_extension import get_default_build_root

    fingerprint = _CSRC.read_bytes() + " ".join([compiler, *_BUILD_FLAGS, _cpu_signature()]).encode()
    return Path(get_default_build_root()) / f"chanzoo_selective_scan_{hashlib.sha256(fingerprint).hexdigest()[:16]}"


def _build_library() -> ctypes.CDLL:
    """Compile csrc/selective_scan.cpp into torch's extensions cache (see ``_build_dir``) and load it."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH")
    build_dir = _build_dir(compiler)
    target = build_dir / "selective_scan.so"
    if not target.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        tmp = build_dir / f"selective_scan.{os.getpid()}.so"
        result = subprocess.run([compiler, *_BUILD_FLAGS, str(_CSRC), "-o", str(tmp)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {_CSRC.name} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, target)  # atomic: concurrent builders never load a half-written library
        _logger.info("selective_scan: built the C++ kernel into %s", target)
    lib = ctypes.CDLL(str(target))
    i64, fp = ctypes.c_int64, ctypes.c_void_p
    lib.chanzoo_scan_fwd.argtypes = [fp] * 9 + [i64] * 20 + [ctypes.c_int] * 2
    lib.chanzoo_scan_bwd.argtypes = [fp] * 16 + [i64] * 20 + [ctypes.c_int, i64, ctypes.c_int]
    lib.chanzoo_scan_proj_fwd.argtypes = [fp] * 8 + [i64] * 13 + [ctypes.c_int] * 2
    lib.chanzoo_scan_proj_bwd.argtypes = [fp] * 14 + [i64] * 13 + [ctypes.c_int] * 2
    lib.chanzoo_scan_proj_max_inner.restype = ctypes.c_int64
    return lib


def _cpp_library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None (with the reason kept) where it cannot be built."""
    global _lib, _lib_error
    with _lib_lock:
        if _lib is None and _lib_error is None:
            try:
                _lib = _build_library()
            except (OSError, RuntimeError) as err:
                _lib_error = str(err)
                _logger.warning("selective_scan: C++ kernel unavailable, using the eager path (%s)", err)
        return _lib


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return t.data_ptr() if t is not None else None


def _strides(t: torch.Tensor) -> list[int]:
    """All strides but the last: (batch, source, direction in source, position) of B or C, (batch, source, channel)
    of u."""
    return list(t.stride()[:-1])


def _sum_per_source(du: torch.Tensor, sources: int, inner: int) -> torch.Tensor:
    """Input gradients per direction, (batch, K * inner, L) or (batch, K, inner, L) -> per source, (batch, S, inner,
    L): the sums of the K / S directions that read each source, as plain adds (``sum`` would zero-fill its output)."""
    per_source = du.view(du.shape[0], sources, -1, inner, du.shape[-1]).unbind(2)
    total = per_source[0]
    for part in per_source[1:]:
        total = total + part
    return total


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` as given when its last axis is adjacent in memory, else a copy that makes it so."""
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("chanzoo::selective_scan_fwd", mutates_args=(), device_types="cpu")
def _cpp_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], softplus: bool, outputs: int, reverse: int,
             chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The directional scan (see ``selective_scan_directions``): y (b, outputs, inner, L), the D skip included, and
    the chunk-start states (b, K * inner, n_chunks, N). u (b, S, inner, L) and B, C (b, S, K / S, L, N) are read in place
    when their last axis is contiguous; delta (b, K * inner, L) is raw (the bias and softplus are applied inside)."""
    lib = _cpp_library()
    batch, sources, inner, length = u.shape
    directions, n_state = B.shape[1] * B.shape[2], A.shape[1]
    delta, A = delta.contiguous(), A.contiguous()
    u, B, C = (_last_contiguous(t) for t in (u, B, C))
    D, delta_bias = (t.contiguous() if t is not None else None for t in (D, delta_bias))
    y = u.new_empty(batch, outputs, inner, length)
    hs = u.new_empty(batch, directions * inner, -(-length // chunk), n_state)
    lib.chanzoo_scan_fwd(_ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(D), _ptr(delta_bias), _ptr(y),
                         _ptr(hs), batch, directions, sources, outputs, inner, length, n_state, *_strides(u),
                         *_strides(B), *_strides(C), chunk, reverse, int(softplus), torch.get_num_threads())
    return y, hs


@_cpp_fwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, softplus, outputs, reverse, chunk):
    batch, _, inner, length = u.shape
    return (u.new_empty(batch, outputs, inner, length),
            u.new_empty(batch, delta.shape[1], -(-length // chunk), A.shape[1]))


@torch.library.custom_op("chanzoo::selective_scan_bwd", mutates_args=(), device_types="cpu")
def _cpp_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], hs: torch.Tensor, dy: torch.Tensor,
             softplus: bool, reverse: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                torch.Tensor, torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    """Gradients (du, ddelta, dA, dB, dC, dD, ddelta_bias) of the directional scan by a reverse scan."""
    lib = _cpp_library()
    batch, sources, inner, length = u.shape
    directions, n_state, outputs = B.shape[1] * B.shape[2], A.shape[1], dy.shape[1]
    delta, A, hs, dy = (t.contiguous() for t in (delta, A, hs, dy))
    u, B, C = (_last_contiguous(t) for t in (u, B, C))
    D, delta_bias = (t.contiguous() if t is not None else None for t in (D, delta_bias))
    threads = torch.get_num_threads()
    # Work items are (split, batch, direction); split a direction's channels only when too few items to share.
    splits = max(1, min(inner, -(-4 * threads // (batch * directions))))
    du, ddelta = torch.empty_like(delta), torch.empty_like(delta)
    dA, dD, dbias = u.new_empty(*delta.shape[:2], n_state), u.new_empty(delta.shape[:2]), u.new_empty(delta.shape[:2])
    dB = u.new_empty(splits, batch, directions, length, n_state)
    dC = u.new_empty(splits, batch, directions, length, n_state)
    lib.chanzoo_scan_bwd(_ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(D), _ptr(delta_bias), _ptr(hs),
                         _ptr(dy), _ptr(du), _ptr(ddelta), _ptr(dA), _ptr(dD), _ptr(dbias), _ptr(dB), _ptr(dC),
                         batch, directions, sources, outputs, inner, length, n_state, *_strides(u), *_strides(B),
                         *_strides(C), chunk, reverse, int(softplus), splits, threads)
    dB, dC = ((t[0] if splits == 1 else t.sum(0)).view(B.shape) for t in (dB, dC))
    return _sum_per_source(du, sources, inner), ddelta, dA.sum(0), dB, dC, dD.sum(0), dbias.sum(0)


@_cpp_bwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, hs, dy, softplus, reverse, chunk):
    # Contiguous, as the kernel's gradients are, whatever the inputs' strides (B and C arrive as transposed views).
    return (u.new_empty(u.shape), delta.new_empty(delta.shape), A.new_empty(A.shape), B.new_empty(B.shape),
            C.new_empty(C.shape), u.new_empty(delta.shape[1]), u.new_empty(delta.shape[1]))


def _cpp_setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, delta_bias, softplus, outputs, reverse, chunk = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, output[1])
    ctx.mark_non_differentiable(output[1])  # the saved states: no zero-filled gradient for them in the backward
    ctx.softplus, ctx.reverse, ctx.chunk = softplus, reverse, chunk


def _cpp_backward(ctx, dy, dhs):
    u, delta, A, B, C, D, delta_bias, hs = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dbias = _cpp_bwd(u, delta, A, B, C, D, delta_bias, hs, dy, ctx.softplus,
                                                 ctx.reverse, ctx.chunk)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dbias if delta_bias is not None else None,
            None, None, None, None)


_cpp_fwd.register_autograd(_cpp_backward, setup_context=_cpp_setup_context)


# The scan with its input projections computed inside the kernel (``selective_scan_projected``).


@torch.library.custom_op("chanzoo::selective_scan_proj_fwd", mutates_args=(), device_types="cpu")
def _cpp_proj_fwd(u: torch.Tensor, WT: torch.Tensor, dtw: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
                  delta_bias: torch.Tensor, outputs: int, reverse: int,
                  chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y (b, outputs, inner, L) and the chunk-start states of ``selective_scan_projected``; WT (K, inner, R + 2N) is
    x_proj's weight transposed, dtw (K, inner, R) dt_proj's."""
    lib = _cpp_library()
    batch, sources, inner, length = u.shape
    directions, n_state, rank = WT.shape[0], A.shape[1], dtw.shape[2]
    u = _last_contiguous(u)
    WT, dtw, A, D, delta_bias = (t.contiguous() for t in (WT, dtw, A, D, delta_bias))
    y = u.new_empty(batch, outputs, inner, length)
    hs = u.new_empty(batch, directions * inner, -(-length // chunk), n_state)
    lib.chanzoo_scan_proj_fwd(_ptr(u), _ptr(WT), _ptr(dtw), _ptr(A), _ptr(D), _ptr(delta_bias), _ptr(y), _ptr(hs),
                              batch, directions, sources, outputs, inner, length, n_state, rank, *_strides(u), chunk,
                              reverse, 1, torch.get_num_threads())
    return y, hs


@_cpp_proj_fwd.register_fake
def _(u, WT, dtw, A, D, delta_bias, outputs, reverse, chunk):
    batch, _, inner, length = u.shape
    return (u.new_empty(batch, outputs, inner, length),
            u.new_empty(batch, WT.shape[0] * inner, -(-length // chunk), A.shape[1]))


@torch.library.custom_op("chanzoo::selective_scan_proj_bwd", mutates_args=(), device_types="cpu")
def _cpp_proj_bwd(u: torch.Tensor, WT: torch.Tensor, dtw: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
                  delta_bias: torch.Tensor, hs: torch.Tensor, dy: torch.Tensor, reverse: int,
                  chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor]:
    """Gradients (du, dWT, ddtw, dA, dD, ddelta_bias) of ``_cpp_proj_fwd``."""
    lib = _cpp_library()
    batch, sources, inner, length = u.shape
    directions, n_state, rank, width = WT.shape[0], A.shape[1], dtw.shape[2], WT.shape[2]
    u = _last_contiguous(u)
    WT, dtw, A, D, delta_bias, hs, dy = (t.contiguous() for t in (WT, dtw, A, D, delta_bias, hs, dy))
    du = u.new_empty(batch, directions, inner, length)
    dWT, ddtw = u.new_empty(batch, directions, inner, width), u.new_empty(batch, directions, inner, rank)
    dA = u.new_empty(batch, directions * inner, n_state)
    dD, dbias = u.new_empty(batch, directions * inner), u.new_empty(batch, directions * inner)
    lib.chanzoo_scan_proj_bwd(_ptr(u), _ptr(WT), _ptr(dtw), _ptr(A), _ptr(D), _ptr(delta_bias), _ptr(hs), _ptr(dy),
                              _ptr(du), _ptr(dWT), _ptr(ddtw), _ptr(dA), _ptr(dD), _ptr(dbias), batch, directions,
                              sources, dy.shape[1], inner, length, n_state, rank, *_strides(u), chunk, reverse, 1,
                              torch.get_num_threads())
    return _sum_per_source(du, sources, inner), dWT.sum(0), ddtw.sum(0), dA.sum(0), dD.sum(0), dbias.sum(0)


@_cpp_proj_bwd.register_fake
def _(u, WT, dtw, A, D, delta_bias, hs, dy, reverse, chunk):
    # Contiguous, as the kernel's gradients are, whatever the inputs' strides (WT arrives as a transposed view).
    return tuple(t.new_empty(t.shape) for t in (u, WT, dtw, A, D, delta_bias))


def _cpp_proj_setup_context(ctx, inputs, output) -> None:
    u, WT, dtw, A, D, delta_bias, outputs, reverse, chunk = inputs
    ctx.save_for_backward(u, WT, dtw, A, D, delta_bias, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.reverse, ctx.chunk = reverse, chunk


def _cpp_proj_backward(ctx, dy, dhs):
    u, WT, dtw, A, D, delta_bias, hs = ctx.saved_tensors
    return (*_cpp_proj_bwd(u, WT, dtw, A, D, delta_bias, hs, dy, ctx.reverse, ctx.chunk), None, None, None)


_cpp_proj_fwd.register_autograd(_cpp_proj_backward, setup_context=_cpp_proj_setup_context)


def _proj_flops(u_shape, WT_shape, dtw_shape) -> int:
    """The products the kernel does in place of x_proj and dt_proj: 2 b K L inner (R + 2N + R)."""
    batch, _, inner, length = u_shape
    directions, _, width = WT_shape
    return 2 * batch * directions * length * inner * (width + dtw_shape[2])


@register_flop_formula(torch.ops.chanzoo.selective_scan_proj_fwd)
def _(u_shape, WT_shape, dtw_shape, *args, **kwargs) -> int:
    return _proj_flops(u_shape, WT_shape, dtw_shape)


@register_flop_formula(torch.ops.chanzoo.selective_scan_proj_bwd)
def _(u_shape, WT_shape, dtw_shape, *args, **kwargs) -> int:
    return 2 * _proj_flops(u_shape, WT_shape, dtw_shape)  # the input and the weight gradients


def _scan_cpp(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], softplus: bool) -> torch.Tensor:
    """The plain scan as the directional kernel with one direction per B/C group; B, C come in as (b, G, N, L)."""
    batch, dim, length = u.shape
    groups = B.shape[1]
    y, _ = _cpp_fwd(u.reshape(batch, groups, dim // groups, length), delta, A, B.transpose(-1, -2).unsqueeze(2),
                    C.transpose(-1, -2).unsqueeze(2), D, delta_bias, softplus, groups, 0, _CPP_CHUNK)
    return y.view(batch, dim, length)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch.


@functools.cache  # a failed import is not remembered by Python: look once, not on every call
def _mamba_ssm_fn():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def available_backends() -> list[str]:
    """Backends usable in this process (``cpp`` triggers the one-time build)."""
    names = ["reference", "eager"]
    if _cpp_library() is not None:
        names.append("cpp")
    if _mamba_ssm_fn() is not None and torch.cuda.is_available():
        names.append("mamba_ssm")
    return names


def _log_once(choice: str, why: str) -> None:
    if choice not in _logged:
        _logged.add(choice)
        _logger.info("selective_scan: using the %s path (%s)", choice, why)


def _resolve(backend: str, u: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "mamba_ssm":
        if _mamba_ssm_fn() is None or not u.is_cuda:
            raise ValueError("selective_scan: backend='mamba_ssm' needs the mamba_ssm package and CUDA tensors")
        return backend
    if backend == "cpp":
        if u.device.type != "cpu":
            raise ValueError(f"selective_scan: backend='cpp' runs on the CPU, got tensors on {u.device}")
        if _cpp_library() is None:
            raise ValueError(f"selective_scan: backend='cpp' is unavailable ({_lib_error})")
        return backend
    if backend != "auto":
        return backend
    if u.is_meta:  # shapes only: the C++ op's fake kernel, so FLOP counts on meta equal those of the kernel paths
        return "cpp"
    if u.is_cuda and _mamba_ssm_fn() is not None:
        _log_once("mamba_ssm", "CUDA tensors and the mamba_ssm package is installed")
        return "mamba_ssm"
    if u.device.type == "cpu" and _cpp_library() is not None:
        _log_once("cpp", "CPU tensors, C++ kernel built")
        return "cpp"
    _log_once("eager", f"device {u.device.type}, C++ kernel {'unavailable' if _lib_error else 'not for this device'}")
    return "eager"


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """The S6 selective scan with mamba_ssm's ``selective_scan_fn`` signature (see the module docstring).

    ``backend='auto'`` picks mamba_ssm's CUDA kernel for CUDA tensors when installed, the C++ kernel on the CPU,
    else the eager path, and logs the choice once. Meta tensors go through the C++ op's shape function (no build
    needed), so ``FlopCounterMode`` counts the same on the meta device as with either kernel: the scan core is one
    opaque op, not the eager path's chunk products. Computation is in float32; the result has ``u``'s dtype.
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    path = _resolve(backend, u)
    if path == "reference":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if path == "mamba_ssm":
        return _mamba_ssm_fn()(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dtype = u.dtype
    uf, deltaf = u.float(), delta.float()
    if path == "cpp":
        y = _scan_cpp(uf, deltaf, A.float(), _grouped(B), _grouped(C), None if D is None else D.float(),
                      None if delta_bias is None else delta_bias.float(), delta_softplus)
    else:
        if delta_bias is not None:
            deltaf = deltaf + delta_bias.float()[:, None]
        if delta_softplus:
            deltaf = F.softplus(deltaf)
        y = _scan_eager(uf, deltaf, A.float(), _grouped(B), _grouped(C))
        if D is not None:
            y = y + D.float()[:, None] * uf
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def selective_scan_directions(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
    reverse: Sequence[bool],
    outputs: int,
    backend: str = "auto",
) -> torch.Tensor:
    """S6 scans of S sequences in K directions, summed into O outputs, with delta' = softplus(delta + delta_bias).

    u: (batch, S, inner, L), the source sequences; delta: (batch, K, inner, L); B, C: (batch, S, K / S, N, L), one
    group per direction (direction k = s * K / S + j); A: (K * inner, N); D, delta_bias: (K * inner,); ``reverse``: K flags. Direction k scans source
    k // (K / S) from its last position to its first when ``reverse[k]``; every direction's output is put back in
    position order and added into output k // (K / O). delta, B and C are given in position order too. Returns
    (batch, O, inner, L). The C++ kernel does this in one pass (no reversed, stacked or summed copies); the other
    backends run ``selective_scan`` on reversed and stacked copies, which is the definition the kernel is tested on.
    """
    batch, sources, inner, length = u.shape
    directions = len(reverse)
    if directions % sources or directions % outputs or delta.shape != (batch, directions, inner, length):
        raise ValueError(
            f"selective_scan_directions: {directions} directions (len(reverse)) must be a multiple of the sources "
            f"({sources}) and of outputs ({outputs}), and delta of shape {(batch, directions, inner, length)}; "
            f"got delta {tuple(delta.shape)}"
        )
    n_state = A.shape[-1]
    shapes = {"A": (A, (directions * inner, n_state)), "D": (D, (directions * inner,)),
              "delta_bias": (delta_bias, (directions * inner,)),
              "B": (B, (batch, sources, directions // sources, n_state, length)),
              "C": (C, (batch, sources, directions // sources, n_state, length))}
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"selective_scan_directions: {name} must have shape {shape}, got {tuple(t.shape)}")
    path = _resolve(backend, u)
    if path == "cpp":
        mask = sum(1 << k for k, flag in enumerate(reverse) if flag)
        y, _ = _cpp_fwd(u.float(), delta.float().flatten(1, 2), A.float(), B.float().transpose(-1, -2),
                        C.float().transpose(-1, -2), D.float(), delta_bias.float(), True, outputs, mask, _CPP_CHUNK)
        return y.to(u.dtype)

    def ordered(t: torch.Tensor) -> torch.Tensor:  # (batch, K, ..., L): reversed directions read last to first
        return torch.stack([x.flip(-1) if flag else x for x, flag in zip(t.unbind(1), reverse)], dim=1)

    u_dirs = u.repeat_interleave(directions // sources, dim=1)
    y = selective_scan(ordered(u_dirs).flatten(1, 2), ordered(delta).flatten(1, 2), A, ordered(B.flatten(1, 2)),
                       ordered(C.flatten(1, 2)), D=D,
                       delta_bias=delta_bias, delta_softplus=True, backend=path)
    y = ordered(y.view(batch, directions, inner, length))
    return y.view(batch, outputs, directions // outputs, inner, length).sum(2)


def selective_scan_projected(
    u: torch.Tensor,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
    reverse: Sequence[bool],
    outputs: int,
    backend: str = "auto",
) -> torch.Tensor:
    """``selective_scan_directions`` with Mamba's input projections: each direction's dt, B and C come from its source.

    u: (batch, S, inner, L); x_proj_weight: (K, R + 2N, inner), direction k's x_p = W_k u_p split into dt (R), B, C
    (N each); dt_proj_weight: (K, inner, R), delta = dt_proj_weight[k] dt; A, D, delta_bias as in
    ``selective_scan_directions``. With few channels per direction (inner <= 8, N = 16) the C++ kernel computes the
    projections per step itself (forward and backward), instead of products whose (batch, K, L, R + 2N) output is
    larger than everything else the layer touches; otherwise, and on other backends, the projections are matrix
    products and the scan is ``selective_scan_directions``. Returns (batch, outputs, inner, L).
    """
    batch, sources, inner, length = u.shape
    directions, width, _ = x_proj_weight.shape
    n_state, rank = A.shape[-1], dt_proj_weight.shape[-1]
    if width != rank + 2 * n_state or dt_proj_weight.shape != (directions, inner, rank) or len(reverse) != directions:
        raise ValueError(
            f"selective_scan_projected: x_proj_weight {tuple(x_proj_weight.shape)} must be (K, R + 2N, inner) and "
            f"dt_proj_weight {tuple(dt_proj_weight.shape)} (K, inner, R), with N = {n_state} (A's last axis) and "
            f"K = {len(reverse)} (len(reverse))"
        )
    path = _resolve(backend, u)
    # Meta tensors follow the choice real CPU tensors would get, so FLOP counts per op agree as well as in total.
    lib = _cpp_library() if path == "cpp" else None
    fused = lib is not None and n_state == 16 and inner <= lib.chanzoo_scan_proj_max_inner()
    if fused:
        mask = sum(1 << k for k, flag in enumerate(reverse) if flag)
        y, _ = _cpp_proj_fwd(u.float(), x_proj_weight.float().transpose(1, 2), dt_proj_weight.float(), A.float(),
                             D.float(), delta_bias.float(), outputs, mask, _CPP_CHUNK)
        return y.to(u.dtype)
    per_source = directions // sources
    weight = x_proj_weight.view(sources, per_source, width, inner)
    x_dbl = torch.matmul(u.transpose(-1, -2), weight.flatten(1, 2).transpose(-1, -2))  # (b, S, L, K/S x c)
    x_dbl = x_dbl.view(batch, sources, length, per_source, width).transpose(2, 3)  # (b, S, K/S, L, c), a view
    dts, Bs, Cs = torch.split(x_dbl, [rank, n_state, n_state], dim=-1)
    dts = torch.matmul(dt_proj_weight, dts.flatten(1, 2).transpose(-1, -2))  # (b, K, inner, L)
    return selective_scan_directions(u, dts, A, Bs.transpose(-1, -2), Cs.transpose(-1, -2), D, delta_bias, reverse,
                                     outputs, backend=backend)
