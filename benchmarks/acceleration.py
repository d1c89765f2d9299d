"""chanzoo's default inference path against timm's own eager forward, and against the machine's fp32 GEMM peak.

    python benchmarks/acceleration.py [--models davit_tiny inception_next_tiny] [--batch-size 8] [--img-size 224]
                                      [--repeats 10] [--threads N] [--regional]

For each model, in one process and timed in turns (so load from other processes falls on all alike):
timm eager (``torch.no_grad``, NCHW, as timm's benchmark runs it), each ``prepare_model`` variant (eager or
compiled with freezing, NCHW or channels-last, all under ``torch.inference_mode``), chanzoo's default
(``prepare_model`` with compile='auto', channels_last='auto') and a 2048^2 fp32 matmul. Prints img/s, the ratio to
timm eager and the model's achieved FLOP/s as a fraction of the matmul's, from the median and from the best
(minimum) time: on a machine shared with other jobs the minimum is the steadier estimate. ``--regional`` also times the first
training step (forward + backward, where torch.compile compiles) with whole-model against per-block compilation.
"""
from __future__ import annotations

import argparse
import copy
import logging
import time

import torch
from torch import nn

import chanzoo
from chanzoo.acceleration import prepare_model, repeated_blocks, to_input_format
from chanzoo.profile import count_flops, machine_name, time_interleaved

VARIANTS = {  # name: (compile, channels_last)
    "eager": (False, False),
    "eager+channels_last": (False, True),
    "compiled": (True, False),
    "compiled+channels_last": (True, True),
    "chanzoo default": ("auto", "auto"),
}


def inference_rows(name: str, batch_size: int, img_size: int, repeats: int) -> None:
    cpu = torch.device("cpu")
    base = chanzoo.create_model(name).eval()
    x = torch.rand(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    flops, _ = count_flops(base, x[:1])
    with torch.no_grad():
        reference = base(x)
    fns, compile_s, applied_default = {}, {}, {}

    def timm_eager() -> torch.Tensor:
        with torch.no_grad():
            return base(x)

    fns["timm eager"] = timm_eager
    for variant, (compile_, channels_last) in VARIANTS.items():
        model, applied = prepare_model(copy.deepcopy(base), compile_, None, channels_last, cpu, inference=True)
        xv = to_input_format(x, applied)

        def run(model: nn.Module = model, xv: torch.Tensor = xv) -> torch.Tensor:
            with torch.inference_mode():
                return model(xv)

        start = time.perf_counter()
        out = run()
        compile_s[variant] = time.perf_counter() - start
        err = (out - reference).abs().max().item()
        print(f"{name} {variant}: applied {applied}, first call {compile_s[variant]:.1f}s, max |diff| {err:.2e}")
        if variant == "chanzoo default":
            applied_default = applied
        fns[variant] = run
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    fns["gemm 2048"] = lambda: torch.mm(a, b)
    timings = time_interleaved(fns, cpu, warmup=2, repeats=repeats)
    gemm_timing = timings.pop("gemm 2048")
    gemm = 2 * 2048**3 / gemm_timing.median
    base_s = timings["timm eager"].median
    print(f"\n{name}: batch {batch_size}, {img_size}x{img_size}, fp32, {machine_name(cpu)}; "
          f"{flops / 1e9:.2f} GFLOPs/image; fp32 GEMM {gemm / 1e9:.1f} GFLOP/s (median), "
          f"{2 * 2048**3 / min(gemm_timing.samples) / 1e9:.1f} GFLOP/s (best)")
    gemm_best = 2 * 2048**3 / min(gemm_timing.samples)
    base_best = min(timings["timm eager"].samples)
    print(f"{'path':<24} {'img/s':>7} {'spread':>7} {'vs timm':>8} {'GFLOP/s':>8} {'of GEMM':>8}   "
          f"{'best img/s':>10} {'vs timm':>8} {'of GEMM':>8}")
    for variant, timing in timings.items():
        rate = batch_size * flops / timing.median
        best = min(timing.samples)
        print(f"{variant:<24} {batch_size / timing.median:7.2f} {timing.spread_pct:6.0f}% "
              f"{base_s / timing.median:7.2f}x {rate / 1e9:8.1f} {100 * rate / gemm:7.0f}%   "
              f"{batch_size / best:10.2f} {base_best / best:7.2f}x {100 * batch_size * flops / best / gemm_best:7.0f}%")
    print(f"chanzoo default applied: {applied_default}\n")


def regional_rows(name: str, batch_size: int, img_size: int) -> None:
    """Compile time of the first training step: whole model against each repeated block."""
    cpu = torch.device("cpu")
    base = chanzoo.create_model(name).train()
    x = torch.rand(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    blocks = repeated_blocks(base)
    if not blocks:
        print(f"{name}: repeats no block; regional compilation does not apply")
        return
    for regional in (False, True):
        torch._dynamo.reset()
        model, applied = prepare_model(copy.deepcopy(base), True, None, False, cpu, regional=regional)
        start = time.perf_counter()
        model(x).float().mean().backward()
        first = time.perf_counter() - start
        start = time.perf_counter()
        model(x).float().mean().backward()
        step = time.perf_counter() - start
        print(f"{name} train step, compile={applied['compile']} ({applied['compiled_modules']} module(s), "
              f"block {type(blocks[0]).__name__}): first step {first:.1f}s, next step {step:.2f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["davit_tiny", "inception_next_tiny"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--regional", action="store_true", help="also time whole-model vs regional compilation")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for name in args.models:
        inference_rows(name, args.batch_size, args.img_size, args.repeats)
        if args.regional:
            regional_rows(name, args.batch_size, args.img_size)


if __name__ == "__main__":
    main()
