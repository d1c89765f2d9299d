"""Histoformer cost: params and FLOPs (chanzoo.profile counters) beside the official figures, and CPU throughput.

FLOPs are counted by ``FlopCounterMode`` (2 per multiply-add; GMACs = FLOPs / 2) at batch 1 on the meta device,
split into convolutions and DHSA's attention matmuls; sorting, gathers and element-wise ops are not FLOPs there.
Throughput (forward, batch 1, images/s) is timed at 256x256 and at 128x128 side by side (interleaved runs, so both
see the same load); the ratio of megapixels/s shows how the cost scales with the image (DHSA attends between
(channel, bin) tokens, so its matmuls grow linearly with the pixels and only the sorts grow as N log N).

    python benchmarks/histoformer.py [--repeats 5]
"""
from __future__ import annotations

import argparse

import timm
import torch

import chanzoo  # noqa: F401  (registers histoformer)
from chanzoo.profile import count_flops, count_params, machine_name, time_interleaved

OFFICIAL_PARAMS = 16_615_100  # official histoformer_arch.py with Allweather_Histoformer.yml, counted on CPU
PAPER_PARAMS_M = 16.6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"machine: {machine_name(torch.device('cpu'))}, torch threads {torch.get_num_threads()}")
    with torch.device("meta"):
        meta = timm.create_model("histoformer").eval()
        flops, by_op = count_flops(meta, torch.empty(1, 3, 256, 256))
    params = count_params(meta)[0]
    conv = sum(n for op, n in by_op.items() if "convolution" in op)
    print(f"params: {params:,} (official code {OFFICIAL_PARAMS:,}, ratio {params / OFFICIAL_PARAMS:.6f}; "
          f"paper {PAPER_PARAMS_M}M)")
    print(f"GMACs @256x256: {flops / 2e9:.2f} (convolutions {conv / flops:.1%}, attention matmuls "
          f"{(flops - conv) / flops:.1%}); by op: " + ", ".join(f"{op} {n / 2e9:.2f}" for op, n in sorted(by_op.items())))

    model = timm.create_model("histoformer").eval()
    inputs = {size: torch.rand(1, 3, size, size) for size in (256, 128)}
    fns = {size: (lambda x=x: model(x)) for size, x in inputs.items()}
    with torch.inference_mode():
        timings = time_interleaved(fns, torch.device("cpu"), warmup=1, repeats=args.repeats)
    print(f"\nforward, batch 1, CPU (median of {args.repeats}, interleaved)")
    print("| input | s/image | images/s | Mpixel/s | spread (IQR % of median) |")
    print("|---|---|---|---|---|")
    mpix = {}
    for size, timing in timings.items():
        mpix[size] = size * size / 1e6 / timing.median
        print(f"| {size}x{size} | {timing.median:.3f} | {1 / timing.median:.2f} | {mpix[size]:.3f} | "
              f"{timing.spread_pct:.0f} |")
    print(f"Mpixel/s ratio 256/128: {mpix[256] / mpix[128]:.2f} (1.00 = cost proportional to the pixels)")


if __name__ == "__main__":
    main()
