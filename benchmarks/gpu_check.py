"""Every GPU check in one script, sized for at most ~8 minutes on one GPU; ``--smoke`` runs it on the CPU at tiny sizes.

    python benchmarks/gpu_check.py [--out runs/gpu_check] [--smoke] [--skip-compile]

1. **bf16 numerics**: one model of every family (timm's DaViT, InceptionNeXt and ResNet+ECA, chanzoo's SmallCNN,
   ChannelViT, ViM2, RGT and Histoformer) runs forward + backward under bf16 autocast, eager and compiled, in eval
   mode (no dropout, BatchNorm's running statistics: both runs compute the same function); its output
   and its parameters' gradients are compared with fp32 eager. The tolerance is per family (relative L2 error:
   attention and scans accumulate bf16 rounding over more steps than convolutions do) and printed beside the error.
2. **Training speed**: training steps (forward, cross-entropy, backward, SGD) of davit_tiny, inception_next_tiny,
   resnet50+ECA and vim2_tiny under bf16 autocast: timm eager AMP against chanzoo's compiled path (``prepare_model``
   with compile and channels-last as ``train.py`` uses them on CUDA), timed in turns, with model FLOP utilisation
   against the card's bf16 GEMM rate measured in the same run (an 8192^2 bf16 matmul).
3. **Selective scan**: the GPU path ``selective_scan`` picks (mamba_ssm's kernel when installed, else the chunked
   PyTorch scan, compiled) against the step-by-step reference, forward and gradients.

Writes ``gpu_check.json`` and ``gpu_check.md`` (the Markdown table for docs/benchmarks.md) into ``--out`` and exits
non-zero when a numerical check fails.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import chanzoo
from chanzoo.acceleration import prepare_model
from chanzoo.ops.selective_scan import selective_scan, selective_scan_ref
from chanzoo.profile import machine_name, time_interleaved

_logger = logging.getLogger("gpu_check")


@dataclass(frozen=True)
class FamilyCase:
    """One family's representative: model name, input (C, H, W), bf16 tolerance (relative L2 error), kwargs."""

    family: str
    name: str
    input_chw: tuple[int, int, int]
    tolerance: float
    kwargs: tuple[tuple[str, Any], ...] = ()


FULL_CASES = [
    FamilyCase("davit", "davit_tiny", (3, 224, 224), 0.05),
    FamilyCase("inception_next", "inception_next_tiny", (3, 224, 224), 0.05),
    FamilyCase("resnet+eca", "resnet50", (3, 224, 224), 0.05, (("attn", "eca"),)),
    FamilyCase("small_cnn", "small_cnn", (1, 28, 28), 0.05),
    FamilyCase("channelvit", "channelvit_small_p16", (3, 224, 224), 0.05),
    FamilyCase("vim2", "vim2_tiny", (3, 224, 224), 0.08),
    FamilyCase("rgt", "rgt_s_x2", (3, 64, 64), 0.05),
    FamilyCase("histoformer", "histoformer", (3, 128, 128), 0.08),
]
# Tiny CPU sizes: the same families, built small so the test suite can run the whole script.
SMOKE_CASES = [
    FamilyCase("davit", "davit_tiny", (3, 64, 64), 0.05, (("depths", (1, 1, 1, 1)),)),
    FamilyCase("inception_next", "inception_next_atto", (3, 64, 64), 0.05),
    FamilyCase("resnet+eca", "resnet18", (3, 64, 64), 0.05, (("attn", "eca"),)),
    FamilyCase("small_cnn", "small_cnn", (1, 28, 28), 0.05),
    FamilyCase("channelvit", "channelvit_tiny_p16", (3, 32, 32), 0.05, (("depth", 1),)),
    FamilyCase("vim2", "vim2_nano", (3, 64, 64), 0.08),
    FamilyCase("rgt", "rgt_s_x2", (3, 16, 16), 0.08, (("depth", (1,)), ("embed_dim", 24), ("num_heads", (2,)),
                                                       ("split_size", (4, 4)))),
    FamilyCase("histoformer", "histoformer", (3, 32, 32), 0.1, (("dim", 12), ("num_blocks", (1, 1, 1, 1)),
                                                                  ("num_refinement_blocks", 1))),
]
TRAIN_MODELS = ["davit_tiny", "inception_next_tiny", "resnet50+eca", "vim2_tiny"]


def _rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| (L2 over all elements)."""
    diff = (value.float() - reference.float()).norm()
    return float(diff / reference.float().norm().clamp_min(1e-12))


def _build(case: FamilyCase, device: torch.device) -> nn.Module:
    kwargs = dict(case.kwargs)
    model = chanzoo.create_model(case.name, attn=kwargs.pop("attn", None), in_chans=case.input_chw[0], **kwargs)
    return model.to(device)


def _forward_backward(model: nn.Module, x: torch.Tensor, amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and the gradients of all parameters (flattened into one vector) of ``out.float().square().mean()``."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    out.float().square().mean().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out.detach(), grads.float()


def numerics(cases: list[FamilyCase], device: torch.device, batch: int, compile_models: bool) -> list[dict]:
    """bf16 autocast (eager and compiled) against fp32 eager, per family."""
    rows = []
    for case in cases:
        torch.manual_seed(0)
        model = _build(case, device).eval()  # no dropout / batch statistics: both runs see the same function
        x = torch.rand(batch, *case.input_chw, device=device, generator=torch.Generator(device).manual_seed(0))
        ref_out, ref_grad = _forward_backward(model, x, amp=False)
        paths: dict[str, nn.Module] = {"eager": model}
        if compile_models:
            compiled, _ = prepare_model(copy.deepcopy(model), compile=True, channels_last=False, device=device,
                                        regional=False)
            paths["compiled"] = compiled
        for path, runner in paths.items():
            start = time.perf_counter()
            out, grad = _forward_backward(runner, x, amp=True)
            row = {
                "family": case.family, "model": case.name, "path": path, "tolerance": case.tolerance,
                "out_rel_err": _rel_err(out, ref_out), "grad_rel_err": _rel_err(grad, ref_grad),
                "seconds": round(time.perf_counter() - start, 2),
            }
            row["ok"] = bool(row["out_rel_err"] <= case.tolerance and row["grad_rel_err"] <= 2 * case.tolerance)
            rows.append(row)
            _logger.info("%-15s %-9s out %.2e grad %.2e (tolerance %.0e / %.0e) %s", case.family, path,
                         row["out_rel_err"], row["grad_rel_err"], case.tolerance, 2 * case.tolerance,
                         "ok" if row["ok"] else "FAIL")
        del paths, model
    return rows


def bf16_gemm_rate(device: torch.device, side: int) -> tuple[Callable[[], torch.Tensor], float]:
    """A bf16 matmul closure and its FLOPs."""
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    b = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    return (lambda: a @ b), 2.0 * side**3


def training_speed(specs: list[str], device: torch.device, batch: int, img: int, repeats: int, gemm_side: int,
                   compile_models: bool) -> list[dict]:
    """timm eager AMP against chanzoo's compiled bf16 training step, with model FLOP utilisation."""
    rows = []
    gemm, gemm_flops = bf16_gemm_rate(device, gemm_side)
    for spec in specs:
        name, _, attn = spec.partition("+")
        gen = torch.Generator(device).manual_seed(0)
        x = torch.rand(batch, 3, img, img, device=device, generator=gen)
        y = torch.randint(0, 1000, (batch,), device=device, generator=gen)
        kwargs = {"block_args": {"attn_layer": attn}} if attn else {}
        reference = timm.create_model(name, **kwargs).to(device).train()
        ours = chanzoo.create_model(name, attn=attn or None).to(device).train()
        if compile_models:
            ours, _ = prepare_model(ours, compile=True, channels_last="auto", device=device)
        steps, warmup = {}, {}
        ours_label = "chanzoo compiled bf16" if compile_models else "chanzoo eager bf16"
        for label, model in (("timm eager AMP", reference), (ours_label, ours)):
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            xin = x.contiguous(memory_format=torch.channels_last) if label.startswith("chanzoo") else x

            def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt, xin: torch.Tensor = xin,
                     y: torch.Tensor = y) -> Any:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = nn.functional.cross_entropy(model(xin), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            start = time.perf_counter()
            step(), step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            warmup[label] = time.perf_counter() - start
            steps[label] = step
        counter = FlopCounterMode(display=False)
        with counter:
            nn.functional.cross_entropy(reference(x), y).backward()
        reference.zero_grad(set_to_none=True)
        step_flops = counter.get_total_flops()
        steps["gemm"] = gemm
        timings = time_interleaved(steps, device, warmup=1, repeats=repeats)
        gemm_rate = gemm_flops / timings.pop("gemm").median
        base = timings["timm eager AMP"].median
        for label, timing in timings.items():
            rows.append({
                "model": spec, "path": label, "img_s": batch / timing.median, "vs_timm": base / timing.median,
                "warmup_s": round(warmup[label], 1), "mfu": step_flops / timing.median / gemm_rate,
                "bf16_gemm_tflops": gemm_rate / 1e12,
            })
            _logger.info("%-20s %-22s %8.1f img/s %5.2fx timm, MFU %.0f%%", spec, label, rows[-1]["img_s"],
                         rows[-1]["vs_timm"], 100 * rows[-1]["mfu"])
    return rows


def scan_check(device: torch.device, batch: int, dim: int, length: int, state: int, compile_scan: bool) -> dict:
    """``selective_scan(backend='auto')`` (compiled when it is the PyTorch path) against the reference."""
    gen = torch.Generator(device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=gen)

    u, delta, z = rand(batch, dim, length), rand(batch, dim, length), rand(batch, dim, length)
    A = -torch.rand(dim, state, device=device, generator=gen)
    B, C, D = rand(batch, state, length), rand(batch, state, length), rand(dim)
    inputs = [t.requires_grad_() for t in (u, delta, A, B, C, D, z)]

    def run(fn: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = fn(*inputs, delta_softplus=True)
        grads = torch.autograd.grad(out.square().mean(), inputs)
        return out.detach(), list(grads)

    fast = selective_scan
    if compile_scan and device.type == "cuda" and "mamba_ssm" not in chanzoo.ops.selective_scan.available_backends():
        fast = torch.compile(lambda *a, **k: selective_scan(*a, backend="eager", **k), fullgraph=True)
    ref_out, ref_grads = run(selective_scan_ref)
    out, grads = run(fast)
    row = {"shape": [batch, dim, length, state], "out_rel_err": _rel_err(out, ref_out),
           "grad_rel_err": max(_rel_err(g, r) for g, r in zip(grads, ref_grads)), "tolerance": 1e-4}
    row["ok"] = bool(row["out_rel_err"] <= 1e-4 and row["grad_rel_err"] <= 1e-3)
    _logger.info("selective scan %s: out %.1e grad %.1e %s", row["shape"], row["out_rel_err"], row["grad_rel_err"],
                 "ok" if row["ok"] else "FAIL")
    return row


def markdown(report: dict) -> str:
    lines = [f"GPU check on {report['machine']} (torch {report['torch']}), `python benchmarks/gpu_check.py`", "",
             "| family | model | path | out rel. err | grad rel. err | tolerance | ok |",
             "|---|---|---|---|---|---|---|"]
    for r in report["numerics"]:
        lines.append(f"| {r['family']} | {r['model']} | {r['path']} | {r['out_rel_err']:.1e} | "
                     f"{r['grad_rel_err']:.1e} | {r['tolerance']:.0e} | {'yes' if r['ok'] else 'NO'} |")
    lines += ["", "| model | path | img/s | vs timm eager AMP | warm-up s | MFU |", "|---|---|---|---|---|---|"]
    for r in report["training"]:
        lines.append(f"| {r['model']} | {r['path']} | {r['img_s']:.1f} | {r['vs_timm']:.2f}x | {r['warmup_s']} | "
                     f"{100 * r['mfu']:.0f}% |")
    scan = report["selective_scan"]
    lines += ["", f"Selective scan {scan['shape']}: output rel. err {scan['out_rel_err']:.1e}, gradients "
              f"{scan['grad_rel_err']:.1e} ({'ok' if scan['ok'] else 'FAIL'})."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (what the test suite runs)")
    parser.add_argument("--skip-compile", action="store_true", help="eager paths only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --smoke for the CPU check at tiny sizes")
    device = torch.device("cpu" if args.smoke else "cuda")
    compile_models = not args.skip_compile
    if args.smoke:
        # compile only the cheapest family on the CPU: the path stays exercised without minutes of inductor work
        cases, train_specs = SMOKE_CASES, ["resnet18+eca"]
        rows = numerics(cases[:3] + cases[4:], device, 2, False)
        rows += numerics([cases[3]], device, 2, compile_models)
        training = training_speed(train_specs, device, 2, 64, 2, 256, False)
        scan = scan_check(device, 1, 8, 64, 4, False)
    else:
        rows = numerics(FULL_CASES, device, 8, compile_models)
        training = training_speed(TRAIN_MODELS, device, 64, 224, 10, 8192, compile_models)
        scan = scan_check(device, 2, 384, 3136, 16, compile_models)
    report = {"machine": machine_name(device), "torch": torch.__version__, "smoke": args.smoke,
              "numerics": rows, "training": training, "selective_scan": scan}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    failed = [f"{r['family']}/{r['path']}" for r in rows if not r["ok"]] + ([] if scan["ok"] else ["selective_scan"])
    if failed:
        _logger.error("numerical checks failed: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
