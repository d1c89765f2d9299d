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
  state tensor at once), each block into chunks scanned in parallel and joined by a short scan over chunk ends.
  Used where the C++ kernel cannot be built.
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
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["selective_scan", "selective_scan_ref", "available_backends", "BACKENDS"]

_logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "eager", "cpp", "mamba_ssm")
_CSRC = Path(__file__).parent / "csrc" / "selective_scan.cpp"
_CPP_CHUNK = 64  # steps per saved state in the C++ forward (the backward recomputes one chunk at a time)
_EAGER_CHUNK = 32  # steps scanned in parallel per chunk by the eager path
_EAGER_BLOCK = 1024  # steps per block: the eager path holds (batch, dim, block, N) tensors at most
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
# Eager chunked path.


def _eager_block(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan one block: u, delta (b, d, S); B, C (b, G, N, S); h0 (b, d, N) -> (y (b, d, S), h_end)."""
    batch, dim, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    chunk = min(_EAGER_CHUNK, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:  # padded steps neither decay (delta = 0) nor drive the state (u = 0)
        u, delta, B, C = (F.pad(t, (0, pad)) for t in (u, delta, B, C))

    def steps_first(t: torch.Tensor) -> torch.Tensor:  # (b, d, S) -> contiguous (T, nc, b, d)
        return t.reshape(batch, dim, n_chunks, chunk).permute(3, 2, 0, 1).contiguous()

    def expand(t: torch.Tensor) -> torch.Tensor:  # (b, G, N, S) -> contiguous (T, nc, b, d, N)
        t = t.reshape(batch, groups, 1, n_state, n_chunks, chunk).permute(5, 4, 0, 1, 2, 3)
        return t.expand(chunk, n_chunks, batch, groups, dim // groups, n_state).reshape(
            chunk, n_chunks, batch, dim, n_state)

    delta_k, drive_k = steps_first(delta), steps_first(delta * u)
    # Decay from the chunk start to step k: exp(A * cumsum(delta)), the exponent is a sum of terms <= 0.
    prod = torch.exp(delta_k.cumsum(0)[..., None] * A)  # (T, nc, b, d, N), every entry in (0, 1]
    decay = torch.exp(delta_k[..., None] * A)
    drive = drive_k[..., None] * expand(B)
    # Level 1: every chunk from a zero state, all chunks at once; each step reads contiguous (nc, b, d, N) slabs.
    # (unbind, not indexing: the backward of one unbind is one stack, that of T indexings T full-size zero fills)
    drives, decays = drive.unbind(0), decay.unbind(0)
    local = [drives[0]]
    for k in range(1, chunk):
        local.append(torch.addcmul(drives[k], decays[k], local[-1]))
    local_h = torch.stack(local)
    # Level 2: the state entering each chunk (a short sequential scan over chunk ends).
    starts = [h0]
    for end_h, end_prod in zip(local[-1].unbind(0), prod[-1].unbind(0)):
        starts.append(torch.addcmul(end_h, end_prod, starts[-1]))
    h = torch.addcmul(local_h, prod, torch.stack(starts[:-1]))
    y = (h * expand(C)).sum(-1).permute(2, 3, 1, 0).reshape(batch, dim, n_chunks * chunk)
    return y[..., :length], starts[-1]


def _scan_eager(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Scan core y_t = <C_t, h_t> in eager PyTorch, block by block (checkpointed when gradients are needed)."""
    batch, dim, length = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C))
    for start in range(0, length, _EAGER_BLOCK):
        stop = min(start + _EAGER_BLOCK, length)
        args = (u[..., start:stop], delta[..., start:stop], A, B[..., start:stop], C[..., start:stop], h)
        y, h = checkpoint(_eager_block, *args, use_reentrant=False) if need_grad else _eager_block(*args)
        ys.append(y)
    return torch.cat(ys, dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# C++ path: built at first use, registered with torch.library.


def _build_library() -> ctypes.CDLL:
    """Compile csrc/selective_scan.cpp into torch's extensions cache (keyed by source and flags) and load it."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH")
    flags = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
    source = _CSRC.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    from torch.utils.cpp_extension import get_default_build_root

    build_dir = Path(get_default_build_root()) / f"chanzoo_selective_scan_{key}"
    target = build_dir / "selective_scan.so"
    if not target.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        tmp = build_dir / f"selective_scan.{os.getpid()}.so"
        result = subprocess.run([compiler, *flags, str(_CSRC), "-o", str(tmp)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {_CSRC.name} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, target)  # atomic: concurrent builders never load a half-written library
        _logger.info("selective_scan: built the C++ kernel into %s", target)
    lib = ctypes.CDLL(str(target))
    i64, fp = ctypes.c_int64, ctypes.c_void_p
    lib.chanzoo_scan_fwd.argtypes = [fp] * 7 + [i64] * 6 + [ctypes.c_int]
    lib.chanzoo_scan_bwd.argtypes = [fp] * 12 + [i64] * 6 + [ctypes.c_int]
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


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


@torch.library.custom_op("chanzoo::selective_scan_fwd", mutates_args=(), device_types="cpu")
def _cpp_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y (b, d, L) and the chunk-start states (b, d, n_chunks, N); B, C laid out (b, G, L, N)."""
    lib = _cpp_library()
    batch, dim, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
    y = torch.empty_like(u)
    hs = u.new_empty(batch, dim, -(-length // chunk), n_state)
    lib.chanzoo_scan_fwd(_ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(y), _ptr(hs), batch, dim, length,
                         n_state, groups, chunk, torch.get_num_threads())
    return y, hs


@_cpp_fwd.register_fake
def _(u, delta, A, B, C, chunk):
    return torch.empty_like(u), u.new_empty(u.shape[0], u.shape[1], -(-u.shape[2] // chunk), A.shape[1])


@torch.library.custom_op("chanzoo::selective_scan_bwd", mutates_args=(), device_types="cpu")
def _cpp_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             hs: torch.Tensor, dy: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor, torch.Tensor]:
    """Gradients (du, ddelta, dA, dB, dC) of the scan core by a reverse scan."""
    lib = _cpp_library()
    batch, dim, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    u, delta, A, B, C, hs, dy = (t.contiguous() for t in (u, delta, A, B, C, hs, dy))
    threads = torch.get_num_threads()
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dA = u.new_empty(batch, dim, n_state)
    dB = u.new_zeros(threads, *B.shape)
    dC = u.new_zeros(threads, *C.shape)
    lib.chanzoo_scan_bwd(_ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(hs), _ptr(dy), _ptr(du),
                         _ptr(ddelta), _ptr(dA), _ptr(dB), _ptr(dC), batch, dim, length, n_state, groups, chunk,
                         threads)
    return du, ddelta, dA.sum(0), dB.sum(0), dC.sum(0)


@_cpp_bwd.register_fake
def _(u, delta, A, B, C, hs, dy, chunk):
    return torch.empty_like(u), torch.empty_like(u), torch.empty_like(A), torch.empty_like(B), torch.empty_like(C)


def _cpp_setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, chunk = inputs
    ctx.save_for_backward(u, delta, A, B, C, output[1])
    ctx.chunk = chunk


def _cpp_backward(ctx, dy, dhs):
    u, delta, A, B, C, hs = ctx.saved_tensors
    du, ddelta, dA, dB, dC = _cpp_bwd(u, delta, A, B, C, hs, dy, ctx.chunk)
    return du, ddelta, dA, dB, dC, None


_cpp_fwd.register_autograd(_cpp_backward, setup_context=_cpp_setup_context)


def _scan_cpp(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Scan core through the C++ ops; B, C come in as (b, G, N, L)."""
    y, _ = _cpp_fwd(u, delta, A, B.transpose(-1, -2), C.transpose(-1, -2), _CPP_CHUNK)
    return y


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
    else the eager path, and logs the choice once. Computation is in float32; the result has ``u``'s dtype.
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    path = _resolve(backend, u)
    if path == "reference":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if path == "mamba_ssm":
        return _mamba_ssm_fn()(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dtype = u.dtype
    uf, deltaf = u.float(), delta.float()
    if delta_bias is not None:
        deltaf = deltaf + delta_bias.float()[:, None]
    if delta_softplus:
        deltaf = F.softplus(deltaf)
    core = _scan_cpp if path == "cpp" else _scan_eager
    y = core(uf, deltaf, A.float(), _grouped(B), _grouped(C))
    if D is not None:
        y = y + D.float()[:, None] * uf
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)
