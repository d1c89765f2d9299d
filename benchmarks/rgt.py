"""RGT: parameters and FLOPs against the paper's, and CPU throughput against the official code, side by side.

    python benchmarks/rgt.py [--official path/to/basicsr/archs/rgt_arch.py] [--threads N] [--repeats 5]

FLOPs are counted by chanzoo's profiler (``FlopCounterMode``, 2 FLOPs per multiply-add; fvcore's multiply-add count
beside it) for a 3x512x512 output, as the RGT README counts them (x4: 128x128 input; x2: 256x256; x3: 171x171, i.e.
513x513 out). SR papers' "FLOPs" are multiply-adds, so the table sets GMACs beside the paper's figure.
Throughput: one 3x256x256 crop of scikit-image's astronaut photo (batch 1) in eval mode, timed alternately with the
official model when given; the official model's weights are loaded into chanzoo's (``checkpoint_filter_fn``), so the
table also gives the largest absolute difference between the two outputs.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import timm
import torch
from skimage import data

import chanzoo  # noqa: F401  (registers the models)
from chanzoo.models.rgt import checkpoint_filter_fn
from chanzoo.profile import count_flops, count_params, fvcore_macs, machine_name, time_interleaved

PAPER = {  # RGT README / paper: params (M), FLOPs (G, multiply-adds) at a 512x512 output (x4 rows)
    "rgt_s_x2": (10.05, None), "rgt_s_x3": (10.24, None), "rgt_s_x4": (10.20, 193.08),
    "rgt_x2": (13.22, None), "rgt_x3": (13.40, None), "rgt_x4": (13.37, 251.07),
}


def load_official(path: Path) -> types.ModuleType:
    """Import the official ``rgt_arch.py`` with a stand-in for BasicSR's registry (nothing else of BasicSR is needed)."""
    registry = types.ModuleType("basicsr.utils.registry")
    registry.ARCH_REGISTRY = types.SimpleNamespace(register=lambda: (lambda cls: cls))
    for name in ("basicsr", "basicsr.utils"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["basicsr.utils.registry"] = registry
    spec = importlib.util.spec_from_file_location("rgt_official", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_model(module: types.ModuleType, name: str) -> torch.nn.Module:
    groups = 6 if name.startswith("rgt_s") else 8
    return module.RGT(upscale=int(name[-1]), in_chans=3, img_size=64, img_range=1.0, depth=[6] * groups,
                      embed_dim=180, num_heads=[6] * groups, mlp_ratio=2, resi_connection="1conv",
                      split_size=[8, 32], c_ratio=0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, help="the official basicsr/archs/rgt_arch.py (zhengchen1999/RGT)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(PAPER))
    parser.add_argument("--no-fvcore", dest="fvcore", action="store_false", help="skip fvcore's cross-check count")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    official = load_official(args.official) if args.official else None
    device = torch.device("cpu")
    print(f"machine: {machine_name(device)}, {args.threads} threads, torch {torch.__version__}")
    print("| model | params (M) | paper params (M) | GMACs @512x512 out | fvcore GMACs | paper GFLOPs (MACs) |"
          " img/s 256x256 (chanzoo) | img/s (official) | chanzoo / official | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    photo = torch.from_numpy(data.astronaut()[100:356, 150:406]).permute(2, 0, 1)[None].float() / 255
    for name in args.models:
        model = timm.create_model(name).eval()
        scale = model.upscale
        side = -(-512 // scale)
        flops, _ = count_flops(model, torch.rand(1, 3, side, side))
        macs_fv = fvcore_macs(model, torch.rand(1, 3, side, side))[0] if args.fvcore else None
        params = count_params(model)[0]
        fns = {"chanzoo": lambda: model(photo)}
        diff = None
        if official is not None:
            ref = official_model(official, name).eval()
            model.load_state_dict(checkpoint_filter_fn(ref.state_dict(), model))
            fns["official"] = lambda: ref(photo)
            with torch.no_grad():
                diff = (model(photo) - ref(photo)).abs().max().item()
        with torch.no_grad():
            timing = time_interleaved(fns, device, warmup=0 if diff is not None else 1, repeats=args.repeats)
        ours = 1.0 / timing["chanzoo"].median
        theirs = 1.0 / timing["official"].median if "official" in timing else None
        paper_params, paper_flops = PAPER[name]
        print(
            f"| {name} | {params / 1e6:.2f} | {paper_params:.2f} | {flops / 2e9:.1f} | "
            f"{macs_fv / 1e9 if macs_fv else float('nan'):.1f} | {paper_flops if paper_flops else '-'} | {ours:.3f} | "
            f"{f'{theirs:.3f}' if theirs else '-'} | {f'{ours / theirs:.2f}' if theirs else '-'} | "
            f"{f'{diff:.1e}' if diff is not None else '-'} |"
        )


if __name__ == "__main__":
    main()
