"""ViM2-T vs DaViT-T training-step throughput on this machine, side by side in one run.

    python benchmarks/vim2_throughput.py [--batch 8 --size 224 --steps 3]

One step = forward, cross-entropy, backward, AdamW update, on real images (skimage's bundled photos resized to
--size). Prints images/s of each model and the ratio ViM2-T / DaViT-T.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import timm
import torch
from skimage import data, transform

import chanzoo  # noqa: F401  (registers vim2_*)


def batch_of_photos(batch: int, size: int) -> torch.Tensor:
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    imgs = [transform.resize(photos[i % len(photos)], (size, size), anti_aliasing=True) for i in range(batch)]
    return torch.from_numpy(np.stack(imgs).astype(np.float32)).permute(0, 3, 1, 2)


def throughput(name: str, x: torch.Tensor, steps: int) -> float:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.arange(x.shape[0]) % 1000

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()

    step()  # warm-up (and the selective-scan kernel build)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    x = batch_of_photos(args.batch, args.size)
    print(f"training step, batch {args.batch} at {args.size}px, {torch.get_num_threads()} threads")
    results = {name: throughput(name, x, args.steps) for name in ("davit_tiny", "vim2_tiny")}
    for name, ips in results.items():
        print(f"{name:<12} {ips:8.2f} img/s")
    print(f"vim2_tiny / davit_tiny: {results['vim2_tiny'] / results['davit_tiny']:.2f}x")


if __name__ == "__main__":
    main()
