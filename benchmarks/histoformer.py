"""Histoformer cost: params and FLOPs (chanzoo.profile counters) beside the official figures, and CPU throughput.

FLOPs are counted by ``FlopCounterMode`` (2 per multiply-add; GMACs = FLOPs / 2) at batch 1 on the meta device,
split into convolutions and DHSA's attention matmuls; sorting, gathers and element-wise ops are not FLOPs there.
Throughput (forward, batch 1, images/s) is timed at 256x256 and at 128x128 side by side (interleaved runs, so both
see the same load); the ratio of megapixels/s shows how the cost scales with the image (DHSA attends between
(channel, bin) tokens, so its matmuls grow linearly with the pixels and only the sorts grow as N log N).

With ``--official path/to/histoformer_arch.py`` (sunshangquan/Histoformer; needs einops) the official model's weights
(seeded, temperatures drawn from U(0.5, 2)) are loaded into chanzoo's and, on a 128x128 crop of scikit-image's astronaut
photo, the script prints how far chanzoo's output is from the official one, and how far the official output itself
moves when only the arithmetic changes (one thread instead of several; channels-last convolutions); then it times
both models at 256x256 in turns.

    python benchmarks/histoformer.py [--repeats 5] [--official path/to/histoformer_arch.py]
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import timm
import torch
from skimage import data

import chanzoo  # noqa: F401  (registers histoformer)
from chanzoo.models.histoformer import checkpoint_filter_fn
from chanzoo.profile import count_flops, count_params, machine_name, time_interleaved

OFFICIAL_PARAMS = 16_615_100  # official histoformer_arch.py with Allweather_Histoformer.yml, counted on CPU
PAPER_PARAMS_M = 16.6


def compare_with_official(path: Path, repeats: int) -> None:
    """Output agreement and side-by-side speed against the official ``Histoformer`` with the same weights."""
    spec = importlib.util.spec_from_file_location("histoformer_official", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    official = module.Histoformer(inp_channels=3, out_channels=3, dim=36, num_blocks=[4, 4, 6, 8],
                                  num_refinement_blocks=4, heads=[1, 2, 4, 8], ffn_expansion_factor=2.667,
                                  bias=False, LayerNorm_type="WithBias").eval()
    for name, param in official.named_parameters():
        if name.endswith("temperature"):
            param.data.uniform_(0.5, 2.0)
    ours = timm.create_model("histoformer").eval()
    ours.load_state_dict(checkpoint_filter_fn(official.state_dict(), ours))
    photo = torch.from_numpy(data.astronaut()[100:356, 150:406]).permute(2, 0, 1)[None].float() / 255
    crop = photo[..., :128, :128]
    threads = torch.get_num_threads()
    with torch.inference_mode():
        reference = official(crop)
        print(f"\nmax abs difference, 128x128 astronaut crop, {threads} threads:")
        print(f"  chanzoo vs official: {(ours(crop) - reference).abs().max().item():.2e}")
        torch.set_num_threads(1)
        print(f"  official, 1 thread vs {threads}: {(official(crop) - reference).abs().max().item():.2e}")
        torch.set_num_threads(threads)
        channels_last = official.to(memory_format=torch.channels_last)
        moved = channels_last(crop.contiguous(memory_format=torch.channels_last))
        official = official.to(memory_format=torch.contiguous_format)
        print(f"  official, channels-last vs contiguous convolutions: {(moved - reference).abs().max().item():.2e}")
        timings = time_interleaved({"chanzoo": lambda: ours(photo), "official": lambda: official(photo)},
                                   torch.device("cpu"), warmup=1, repeats=repeats)
    ratio = timings["official"].median / timings["chanzoo"].median
    print(f"256x256 forward (median of {repeats}, in turns): chanzoo {timings['chanzoo'].median:.2f} s, official "
          f"{timings['official'].median:.2f} s, chanzoo / official speed {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--official", type=Path, help="the official basicsr/models/archs/histoformer_arch.py")
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
    if args.official:
        compare_with_official(args.official, args.repeats)


if __name__ == "__main__":
    main()
