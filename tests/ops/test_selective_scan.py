"""The fast selective-scan paths equal the sequential reference in outputs and in the gradients of every input."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from chanzoo.ops import selective_scan as ss
from chanzoo.ops.selective_scan import (
    available_backends,
    selective_scan,
    selective_scan_directions,
    selective_scan_projected,
    selective_scan_ref,
)

FAST = [b for b in ("eager", "cpp") if b in available_backends()]
INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make(batch: int, dim: int, length: int, state: int, groups, with_d: bool, with_z: bool, with_bias: bool,
         seed: int, softplus: bool = True) -> dict:
    """Random inputs; without softplus, delta (and delta + delta_bias) is non-negative, as the scan requires."""
    g = torch.Generator().manual_seed(seed)
    bc_shape = (batch, state, length) if groups is None else (batch, groups, state, length)
    t = {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.randn(batch, dim, length, generator=g) - 1.0 if softplus else torch.rand(batch, dim, length, generator=g),
        "A": -torch.rand(dim, state, generator=g) * 4,
        "B": torch.randn(*bc_shape, generator=g),
        "C": torch.randn(*bc_shape, generator=g),
        "D": torch.randn(dim, generator=g) if with_d else None,
        "z": torch.randn(batch, dim, length, generator=g) if with_z else None,
        "delta_bias": (torch.randn(dim, generator=g) if softplus else torch.rand(dim, generator=g)) if with_bias else None,
    }
    return {k: (v.requires_grad_() if v is not None else None) for k, v in t.items()}


def outputs_and_grads(fn, inputs: dict, **kw) -> list[torch.Tensor]:
    """fn(**inputs, **kw) and the gradients of its given (non-None) inputs, in the order of ``inputs``."""
    for v in inputs.values():
        if v is not None:
            v.grad = None
    y = fn(**inputs, **kw)
    weight = torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view_as(y)  # a non-uniform upstream gradient
    (y * weight).sum().backward()
    return [y.detach()] + [v.grad.clone() for v in inputs.values() if v is not None]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm().clamp_min(1e-12)).item()


# (batch, dim, length, state, groups): length 1, lengths not divisible by the chunks (32 eager, 64 C++) or the
# eager block (128; 1100 steps make nine eager blocks), grouped B/C.
SHAPES = [(2, 3, 1, 4, None), (1, 4, 33, 16, None), (2, 6, 97, 5, 3), (1, 2, 1100, 8, None), (3, 4, 64, 1, 2)]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", [(True, True, True, True), (False, False, False, False), (True, False, True, False)])
def test_fast_path_matches_reference(backend, shape, options):
    with_d, with_z, with_bias, softplus = options
    inputs = make(*shape, with_d, with_z, with_bias, seed=sum(shape[:4]), softplus=softplus)
    ref = outputs_and_grads(selective_scan_ref, inputs, delta_softplus=softplus)
    got = outputs_and_grads(selective_scan, inputs, delta_softplus=softplus, backend=backend)
    names = ["out"] + [k for k in INPUTS if inputs[k] is not None]
    for name, x, r in zip(names, got, ref):
        assert x.shape == r.shape, name
        assert rel_err(x, r) <= 1e-4, f"{backend} {name}: relative error {rel_err(x, r):.2e}"


def test_reference_is_the_recurrence():
    """One state, one channel: the reference equals a hand-unrolled two-step recurrence."""
    u, delta = torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[0.5, 0.25]]])
    A, B, C = torch.tensor([[-2.0]]), torch.tensor([[[3.0, -1.0]]]), torch.tensor([[[0.5, 4.0]]])
    h1 = 0.5 * 1.0 * 3.0
    h2 = torch.exp(torch.tensor(0.25 * -2.0)) * h1 + 0.25 * 2.0 * -1.0
    expected = torch.tensor([[[0.5 * h1, 4.0 * h2.item()]]])
    torch.testing.assert_close(selective_scan_ref(u, delta, A, B, C), expected)


@pytest.mark.parametrize("backend", FAST)
def test_safe_for_large_decay(backend):
    """delta * |A| summing to ~1e5 over the sequence: no overflow in the outputs or the gradients (the backward's
    reverse scan decays too), and the state forgets the past completely."""
    inputs = make(1, 2, 200, 4, None, False, False, False, seed=0, softplus=False)
    with torch.no_grad():
        inputs["delta"].fill_(50.0)
        inputs["A"].fill_(-10.0)
    ref = outputs_and_grads(selective_scan_ref, inputs)
    got = outputs_and_grads(selective_scan, inputs, backend=backend)
    for name, x, r in zip(["out", "u", "delta", "A", "B", "C"], got, ref):
        assert torch.isfinite(x).all(), name
        assert rel_err(x, r) <= 1e-4, f"{backend} {name}: relative error {rel_err(x, r):.2e}"


def test_bfloat16_inputs_keep_their_dtype():
    inputs = make(1, 2, 40, 4, None, True, True, True, seed=1)
    with torch.no_grad():
        low = {k: (v.bfloat16() if k in ("u", "z") else v) for k, v in inputs.items()}
        y = selective_scan(**low, delta_softplus=True)
        ref = selective_scan_ref(**low, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), ref.float()) <= 1e-2


def test_auto_logs_choice_once(caplog):
    inputs = make(1, 2, 8, 4, None, False, False, False, seed=2)
    ss._logged.clear()
    with caplog.at_level(logging.INFO, logger="chanzoo.ops.selective_scan"), torch.no_grad():
        selective_scan(**inputs)
        selective_scan(**inputs)
    choices = [r.getMessage() for r in caplog.records if "using the" in r.getMessage()]
    assert len(choices) == 1
    assert ("cpp" if "cpp" in FAST else "eager") in choices[0]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(u=torch.zeros(2, 3)), "u must have shape"),
        (dict(delta=torch.zeros(1, 4, 9)), "delta must have u's shape"),
        (dict(A=torch.zeros(5, 4)), "A must have shape"),
        (dict(B=torch.zeros(1, 3, 8)), "B must have shape"),
        (dict(C=torch.zeros(1, 3, 4, 8)), "C must have shape"),
        (dict(D=torch.zeros(3)), "D must have shape"),
        (dict(z=torch.zeros(1, 4, 7)), "z must have u's shape"),
        (dict(delta_bias=torch.zeros(2)), "delta_bias must have shape"),
        (dict(backend="cuda_fast"), "backend must be one of"),
    ],
)
def test_bad_arguments_name_the_argument(change, message):
    inputs = {k: v for k, v in make(1, 4, 8, 4, None, False, False, False, seed=3).items() if v is not None}
    with pytest.raises(ValueError, match=message):
        selective_scan(**{**inputs, **change})


def test_mamba_ssm_backend_needs_cuda():
    inputs = {k: v for k, v in make(1, 2, 4, 2, None, False, False, False, seed=4).items() if v is not None}
    with pytest.raises(ValueError, match="mamba_ssm"):
        selective_scan(**inputs, backend="mamba_ssm")


def test_missing_compiler_falls_back_to_eager_with_a_log_line(monkeypatch, caplog):
    """No C++ compiler (CXX names none): the automatic choice is the eager path, said once in the log with the
    reason, with the reference's outputs and gradients; asking for ``backend='cpp'`` is an error naming the cause."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(ss, "_lib", None)  # as in a fresh process: nothing built or tried yet
    monkeypatch.setattr(ss, "_lib_error", None)
    monkeypatch.setattr(ss, "_logged", set())
    inputs = make(2, 4, 70, 8, None, True, True, True, seed=5)
    with caplog.at_level(logging.INFO, logger="chanzoo.ops.selective_scan"):
        got = outputs_and_grads(selective_scan, inputs, delta_softplus=True)
    assert available_backends() == ["reference", "eager"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("C++ kernel unavailable, using the eager path" in m and "/nonexistent/c++" in m for m in messages)
    assert any("using the eager path" in m and "C++ kernel unavailable" in m for m in messages), messages
    eager = outputs_and_grads(selective_scan, inputs, delta_softplus=True, backend="eager")
    reference = outputs_and_grads(selective_scan_ref, inputs, delta_softplus=True)
    for x, e, r in zip(got, eager, reference):
        assert torch.equal(x, e)  # the eager path itself, bit for bit
        assert rel_err(x, r) <= 1e-4
    with pytest.raises(ValueError, match=r"backend='cpp' is unavailable \(no C\+\+ compiler '/nonexistent/c\+\+'"):
        selective_scan(**inputs, backend="cpp")


# (batch, sources, directions, outputs, inner, length, reverse): ViM2's token mixer (two sources, each read both ways,
# summed per source; 7 channels run as blocks of 4 and 3 in the C++ backward) and channel mixer (two sources, the second
# backwards, summed into one), plain one-direction use.
DIRECTIONAL = [(2, 2, 4, 2, 7, 70, (False, True, False, True)), (3, 2, 2, 1, 2, 9, (False, True)),
               (1, 1, 1, 1, 4, 130, (True,))]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", DIRECTIONAL)
def test_directional_scan_matches_reversed_copies_on_the_reference(backend, case):
    """The kernel's reversal by indexing and its sums equal scanning reversed, stacked copies with the reference."""
    batch, sources, directions, outputs, inner, length, reverse = case
    g = torch.Generator().manual_seed(length)
    inputs = {
        "u": torch.randn(batch, sources, inner, length, generator=g),
        "delta": torch.randn(batch, directions, inner, length, generator=g) - 1.0,
        "A": -torch.rand(directions * inner, 16, generator=g) * 4,
        "B": torch.randn(batch, sources, directions // sources, 16, length, generator=g),
        "C": torch.randn(batch, sources, directions // sources, 16, length, generator=g),
        "D": torch.randn(directions * inner, generator=g),
        "delta_bias": torch.randn(directions * inner, generator=g),
    }
    inputs = {k: v.requires_grad_() for k, v in inputs.items()}
    ref, got = (outputs_and_grads(selective_scan_directions, inputs, reverse=reverse, outputs=outputs, backend=name)
                for name in ("reference", backend))
    assert got[0].shape == (batch, outputs, inner, length)
    for name, x, r in zip(["out", *inputs], got, ref):
        assert rel_err(x, r) <= 1e-4, f"{backend} {name}: relative error {rel_err(x, r):.2e}"


def test_directional_scan_checks_the_direction_count():
    u, delta = torch.zeros(1, 2, 3, 5), torch.zeros(1, 3, 3, 5)
    with pytest.raises(ValueError, match="multiple of the sources"):
        selective_scan_directions(u, delta, torch.zeros(9, 4), torch.zeros(1, 2, 1, 4, 5), torch.zeros(1, 2, 1, 4, 5),
                                  torch.zeros(9), torch.zeros(9), reverse=(False, True, False), outputs=1)
    with pytest.raises(ValueError, match=r"B must have shape \(1, 2, 1, 4, 5\)"):
        selective_scan_directions(u, delta[:, :2], torch.zeros(6, 4), torch.zeros(1, 2, 4, 5), torch.zeros(1, 2, 1, 4, 5),
                                  torch.zeros(6), torch.zeros(6), reverse=(False, True), outputs=1)


# (batch, sources, directions, outputs, inner, length, reverse, dt rank): ViM2's channel mixer (inner 2, fused in the
# C++ kernel), a token-mixer-like case with few channels (fused) and one with more channels than the kernel fuses.
PROJECTED = [(3, 2, 2, 1, 2, 70, (False, True), 1), (2, 2, 4, 2, 3, 130, (False, True, False, True), 2),
             (2, 1, 1, 1, 1, 5, (True,), 1), (1, 2, 4, 2, 10, 40, (False, True, False, True), 3)]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", PROJECTED)
def test_projected_scan_matches_projections_then_reference(backend, case):
    """The kernel's in-place projections (forward and backward) equal matrix products followed by the reference scan,
    in the output and in the gradients of u, both weights, A, D and the dt bias."""
    batch, sources, directions, outputs, inner, length, reverse, rank = case
    g = torch.Generator().manual_seed(inner)
    inputs = {
        "u": torch.randn(batch, sources, inner, length, generator=g),
        "x_proj_weight": torch.randn(directions, rank + 32, inner, generator=g) * 0.5,
        "dt_proj_weight": torch.randn(directions, inner, rank, generator=g),
        "A": -torch.rand(directions * inner, 16, generator=g) * 4,
        "D": torch.randn(directions * inner, generator=g),
        "delta_bias": torch.randn(directions * inner, generator=g),
    }
    inputs = {k: v.requires_grad_() for k, v in inputs.items()}
    ref, got = (outputs_and_grads(selective_scan_projected, inputs, reverse=reverse, outputs=outputs, backend=name)
                for name in ("reference", backend))
    assert got[0].shape == (batch, outputs, inner, length)
    for name, x, r in zip(["out", *inputs], got, ref):
        assert rel_err(x, r) <= 1e-5, f"{backend} {name}: relative error {rel_err(x, r):.2e}"


def test_projected_scan_fuses_few_channels_only():
    """With the C++ kernel, inner <= 8 runs as the fused op (no projection products); more channels use matrix
    products and the directional scan. FlopCounterMode counts the same products either way."""
    from torch.utils.flop_counter import FlopCounterMode

    if "cpp" not in FAST or ss._cpp_library().chanzoo_scan_proj_max_inner() < 2:
        pytest.skip("the fused kernel needs the C++ build with AVX-512 or AVX2 (this CPU or compiler has neither)")
    for inner, fused in ((2, True), (10, False)):
        u = torch.randn(2, 2, inner, 20)
        args = (torch.randn(2, 33, inner), torch.randn(2, inner, 1), -torch.rand(2 * inner, 16),
                torch.randn(2 * inner), torch.randn(2 * inner))
        counter = FlopCounterMode(display=False)
        with counter:
            selective_scan_projected(u, *args, reverse=(False, True), outputs=1)
        ops = {str(op) for op in counter.get_flop_counts()["Global"]}
        assert ("chanzoo.selective_scan_proj_fwd" in ops) == fused, ops
        assert counter.get_total_flops() == 2 * 2 * 2 * 20 * inner * (33 + 1)


def test_projected_scan_names_bad_weight_shapes():
    u = torch.zeros(1, 2, 2, 5)
    with pytest.raises(ValueError, match=r"x_proj_weight \(2, 30, 2\) must be \(K, R \+ 2N, inner\)"):
        selective_scan_projected(u, torch.zeros(2, 30, 2), torch.zeros(2, 2, 1), torch.zeros(4, 16), torch.zeros(4),
                                 torch.zeros(4), reverse=(False, True), outputs=1)


def test_scan_ops_fake_kernels_match_the_real_ones():
    """torch.library.opcheck on the directional scan ops with the views ViM2 passes (B and C transposed): the fake
    kernels that torch.compile traces must give the real outputs' shapes and strides, or inductor's compiled
    backward fails its stride assertions."""
    if "cpp" not in FAST:
        pytest.skip("no C++ compiler: the scan ops are not built")
    g = torch.Generator().manual_seed(0)
    batch, inner, length = 2, 2, 40
    u = torch.randn(batch, 2, inner, length, generator=g, requires_grad=True)
    delta = torch.randn(batch, 4 * inner, length, generator=g, requires_grad=True)
    B, C = (torch.randn(batch, 2, 2, 16, length, generator=g).requires_grad_() for _ in range(2))
    A, D, bias = (t.requires_grad_() for t in (-torch.rand(4 * inner, 16, generator=g),
                                               torch.randn(4 * inner, generator=g), torch.randn(4 * inner, generator=g)))
    scan_args = (u, delta, A, B.transpose(-1, -2), C.transpose(-1, -2), D, bias)
    torch.library.opcheck(torch.ops.chanzoo.selective_scan_fwd, (*scan_args, True, 2, 0b1010, 64))
    y, hs = torch.ops.chanzoo.selective_scan_fwd(*scan_args, True, 2, 0b1010, 64)
    bwd_args = (*(t.detach() for t in scan_args), hs, torch.randn_like(y))  # the backward ops have no backward
    torch.library.opcheck(torch.ops.chanzoo.selective_scan_bwd, (*bwd_args, True, 0b1010, 64))


def test_projected_scan_ops_fake_kernels_match_the_real_ones():
    """The same for the fused projected-scan ops, with x_proj's weight transposed as ViM2 passes it (the view whose
    gradient strides the fake kernel once got wrong)."""
    if "cpp" not in FAST or ss._cpp_library().chanzoo_scan_proj_max_inner() < 2:
        pytest.skip("the fused kernel needs the C++ build with AVX-512 or AVX2 (this CPU or compiler has neither)")
    g = torch.Generator().manual_seed(0)
    batch, inner, length = 2, 2, 40
    u = torch.randn(batch, 2, inner, length, generator=g, requires_grad=True)
    x_proj = torch.randn(2, 33, inner, generator=g).requires_grad_()
    params = [t.requires_grad_() for t in (torch.randn(2, inner, 1, generator=g), -torch.rand(2 * inner, 16, generator=g),
                                           torch.randn(2 * inner, generator=g), torch.randn(2 * inner, generator=g))]
    proj_args = (u, x_proj.transpose(1, 2), *params)
    torch.library.opcheck(torch.ops.chanzoo.selective_scan_proj_fwd, (*proj_args, 1, 2, 64))
    y, hs = torch.ops.chanzoo.selective_scan_proj_fwd(*proj_args, 1, 2, 64)
    bwd_args = (*(t.detach() for t in proj_args), hs, torch.randn_like(y))
    torch.library.opcheck(torch.ops.chanzoo.selective_scan_proj_bwd, (*bwd_args, 2, 64))


def test_kernel_cache_folder_is_per_cpu(monkeypatch):
    """-march=native builds for this CPU, so a cache shared with another CPU must not hand its library over."""
    signatures = {"avx2": "flags\t: fpu sse2 avx2 fma\n", "avx512": "flags\t: fpu sse2 avx2 fma avx512f\n"}
    folders = {}
    for name, signature in signatures.items():
        monkeypatch.setattr(ss, "_cpu_signature", lambda signature=signature: signature)
        folders[name] = ss._build_dir("c++")
        assert ss._build_dir("c++") == folders[name]  # stable for one CPU
    assert folders["avx2"] != folders["avx512"]
    assert folders["avx2"].parent == folders["avx512"].parent  # both in torch's extensions cache
    monkeypatch.undo()
    if Path("/proc/cpuinfo").exists():
        assert "flags" in ss._cpu_signature() or "Features" in ss._cpu_signature()
