"""Speed of chanzoo's channel modules, side by side in one run.

1. Forward+backward time of each module on (B, 256, 56, 56) and (B, 2048, 7, 7) feature maps, with timm's
   equivalent beside ours where timm has one (SE: ``SEModule`` with the same hidden width; ECA: ``EcaModule`` with
   the same kernel; ELA-B: ``EfficientLocalAttn`` with kernel 7, GroupNorm(16) and no activation, i.e. the same
   function with separate H/W convs).
2. ResNet-50 end-to-end inference (or, with ``--resnet-train``, forward+backward) throughput with each module in its
   native slot, relative to plain ResNet-50; rows ``timm:<name>`` put timm's equivalent module in the same slot.

All candidates of one table are timed in turn (A, B, C, A, B, C, ...; ``chanzoo.profile.time_interleaved``), so load
from other processes falls on all of them alike; figures are medians.

    python benchmarks/channel_modules.py [--batch 32] [--img-size 224] [--repeats 10] [--threads N]
        [--skip-modules | --skip-resnet] [--resnet-train] [--modules se eca ...]
"""
from __future__ import annotations

import argparse
from functools import partial
from typing import Callable

import torch
from timm.layers import EcaModule, SEModule
from timm.layers.coord_attn import EfficientLocalAttn
from torch import nn

import chanzoo
from chanzoo.profile import machine_name, time_interleaved

MODULES = ["se", "eca", "ela_t", "ela_b", "ela_s", "ela_l", "psa_p", "psa_s", "cse", "sse", "scse"]


# timm's module computing the same function as ours, built from our module and the channel count.
TIMM_EQUIVALENTS: dict[str, Callable[[nn.Module, int], nn.Module]] = {
    "se": lambda ours, channels: SEModule(channels, rd_channels=ours.fc1.out_channels),
    "eca": lambda ours, channels: EcaModule(None, kernel_size=ours.kernel_size),
    "ela_b": lambda ours, channels: EfficientLocalAttn(
        channels, kernel_size=7, act_layer=nn.Identity, norm_layer=partial(nn.GroupNorm, 16)),
}


def timm_equivalent(name: str, channels: int) -> nn.Module:
    """timm's counterpart of our module ``name`` at ``channels`` (a slot factory for ResNet-50)."""
    return TIMM_EQUIVALENTS[name](chanzoo.create_channel_module(name, channels), channels)


def fwd_bwd(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).sum().backward()

    return step


def inference(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()

    @torch.no_grad()
    def step() -> None:
        model(x)

    return step


def module_table(shape: tuple[int, int, int, int], repeats: int, names: list[str]) -> None:
    channels = shape[1]
    x = torch.randn(shape, requires_grad=True)  # timing only: values do not change the work done
    fns = {}
    for name in names:
        ours = chanzoo.create_channel_module(name, channels)
        fns[name] = fwd_bwd(ours, x)
        if name in TIMM_EQUIVALENTS:
            fns[f"timm:{name}"] = fwd_bwd(TIMM_EQUIVALENTS[name](ours, channels), x)
    timings = time_interleaved(fns, torch.device("cpu"), warmup=1, repeats=repeats)
    print(f"\nforward+backward on {tuple(shape)}, median of {repeats} (IQR %)")
    print(f"{'module':<8} {'ours ms':>10} {'timm ms':>10} {'ours vs timm':>13}")
    for name in names:
        ours_t = timings[name]
        line = f"{name:<8} {1e3 * ours_t.median:>10.2f}"
        if name in TIMM_EQUIVALENTS:
            theirs_t = timings[f"timm:{name}"]
            line += f" {1e3 * theirs_t.median:>10.2f} {theirs_t.median / ours_t.median:>12.2f}x"
        print(line + f"   (IQR {ours_t.spread_pct:.0f}%)")


def resnet50_table(batch: int, img_size: int, repeats: int, names: list[str], train: bool) -> None:
    x = torch.randn(batch, 3, img_size, img_size)
    models = {"plain": chanzoo.create_model("resnet50")}
    for name in names:
        models[name] = chanzoo.create_model("resnet50", attn=name)
        if name in TIMM_EQUIVALENTS:
            models[f"timm:{name}"] = chanzoo.create_model("resnet50", attn=partial(timm_equivalent, name))
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    if train:  # forward + backward in training mode (batch statistics), as one optimisation step computes it
        fns = {n: fwd_bwd(m.train(), x) for n, m in models.items()}
    else:
        fns = {n: inference(m, x) for n, m in models.items()}
    timings = time_interleaved(fns, torch.device("cpu"), warmup=1, repeats=repeats)
    base = timings["plain"].median
    mode = "forward+backward (train mode)" if train else "inference"
    print(f"\nResNet-50 {mode}, batch {batch} at {img_size}x{img_size}, median of {repeats}")
    print(f"{'module':<10} {'params':>12} {'img/s':>8} {'vs plain':>9}")
    for name, t in timings.items():
        print(f"{name:<10} {params[name] - params['plain']:>+12,d} {batch / t.median:>8.2f} {base / t.median:>8.3f}x"
              f"   (IQR {t.spread_pct:.0f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="batch of the module tables (the issue's 32)")
    parser.add_argument("--resnet-batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-modules", action="store_true", help="only the ResNet-50 table")
    parser.add_argument("--resnet-train", action="store_true", help="time ResNet-50 forward+backward, not inference")
    parser.add_argument("--skip-resnet", action="store_true", help="only the module tables")
    parser.add_argument("--modules", nargs="+", default=MODULES, choices=MODULES, metavar="NAME",
                        help=f"modules to time (default: all of {' '.join(MODULES)})")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{machine_name(torch.device('cpu'))}, {torch.get_num_threads()} torch threads")
    for shape in [] if args.skip_modules else [(args.batch, 256, 56, 56), (args.batch, 2048, 7, 7)]:
        module_table(shape, args.repeats, args.modules)
    if not args.skip_resnet:
        resnet50_table(args.resnet_batch, args.img_size, args.repeats, args.modules, args.resnet_train)


if __name__ == "__main__":
    main()
