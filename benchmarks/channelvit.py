"""ChannelViT cost versus the number of input channels: params, FLOPs (chanzoo.profile counters) and throughput.

FLOPs are counted at 224 px, batch 1, on the meta device (no compute), for every variant at 3 and 8 channels;
ChannelViT has C x HW/p^2 tokens, so the linear layers grow ~linearly in C and attention quadratically.
Throughput (images/s, forward, batch 1) is timed side by side on the current machine at ``--size`` px for the
variants named by ``--time`` (interleaved runs, so the 3- and 8-channel models see the same load).

    python benchmarks/channelvit.py [--size 112] [--time channelvit_tiny_p16 channelvit_small_p16 ...]
"""
from __future__ import annotations

import argparse

import timm
import torch

import chanzoo  # noqa: F401  (registers the ChannelViT variants)
from chanzoo.profile import count_flops, count_params, machine_name, time_interleaved

VARIANTS = [f"channelvit_{s}_p{p}" for s in ("tiny", "small", "base") for p in (16, 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=112, help="image size for the throughput runs")
    parser.add_argument("--time", nargs="*", default=["channelvit_tiny_p16", "channelvit_tiny_p8", "channelvit_small_p16"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"machine: {machine_name(torch.device('cpu'))}, torch threads {torch.get_num_threads()}")
    print("| model | C | params (M) | GFLOPs @224 | FLOPs ratio 8/3 | token ratio 8/3 |")
    print("|---|---|---|---|---|---|")
    for name in VARIANTS:
        flops = {}
        for chans in (3, 8):
            with torch.device("meta"):
                model = timm.create_model(name, in_chans=chans, num_classes=0).eval()
                flops[chans], _ = count_flops(model, torch.empty(1, chans, 224, 224))
            params = count_params(model)[0]
            ratio = f"{flops[8] / flops[3]:.2f}" if chans == 8 else ""
            tokens = f"{(1 + 8 * model.patch_embed.num_patches) / (1 + 3 * model.patch_embed.num_patches):.2f}" if chans == 8 else ""
            print(f"| {name} | {chans} | {params / 1e6:.2f} | {flops[chans] / 1e9:.1f} | {ratio} | {tokens} |")
    print(f"\nforward throughput, batch 1, {args.size} px, CPU (img/s; median of {args.repeats}, interleaved)")
    print("| model | C=3 | C=8 | ratio 3/8 |")
    print("|---|---|---|---|")
    for name in args.time:
        fns = {}
        for chans in (3, 8):
            model = timm.create_model(name, in_chans=chans, num_classes=0, img_size=args.size).eval()
            x = torch.randn(1, chans, args.size, args.size)
            fns[chans] = (lambda m=model, x=x: m(x))
        with torch.no_grad():
            timings = time_interleaved(fns, torch.device("cpu"), warmup=1, repeats=args.repeats)
        ips = {c: 1.0 / t.median for c, t in timings.items()}
        print(f"| {name} | {ips[3]:.1f} | {ips[8]:.1f} | {ips[3] / ips[8]:.2f} |")


if __name__ == "__main__":
    main()
