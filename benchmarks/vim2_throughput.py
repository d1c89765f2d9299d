"""ViM2-T vs DaViT-T throughput on this machine, side by side in one run (training step or inference forward).

    python benchmarks/vim2_throughput.py [--mode train|infer --batch 8 --size 224 --steps 3 --rounds 2 --threads 2]
    python benchmarks/vim2_throughput.py --profile [--mode train|infer]   # torch.profiler table of one ViM2-T step

One training step = forward, cross-entropy, backward, AdamW update; one inference step = forward under
``torch.inference_mode``; both on real images (skimage's bundled photos resized to --size). The models are timed in
turns (--rounds rounds of --steps steps each), so a load that changes during the run affects both alike. Prints
images/s of each model per round and the ratio ViM2-T / DaViT-T of the summed times.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np
import timm
import torch
from skimage import data, transform

import chanzoo  # noqa: F401  (registers vim2_*)

MODELS = ("davit_tiny", "vim2_tiny")


def batch_of_photos(batch: int, size: int) -> torch.Tensor:
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    imgs = [transform.resize(photos[i % len(photos)], (size, size), anti_aliasing=True) for i in range(batch)]
    return torch.from_numpy(np.stack(imgs).astype(np.float32)).permute(0, 3, 1, 2)


def make_step(name: str, x: torch.Tensor, mode: str) -> Callable[[], None]:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000)
    if mode == "infer":
        model.eval()

        def infer() -> None:
            with torch.inference_mode():
                model(x)

        return infer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.arange(x.shape[0]) % 1000

    def train() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()

    return train


def profile(step: Callable[[], None], rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()  # warm-up (and the selective-scan kernel build)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print the top ops of one ViM2-T step and exit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = batch_of_photos(args.batch, args.size)
    print(f"{args.mode} step, batch {args.batch} at {args.size}px, {torch.get_num_threads()} threads")
    if args.profile:
        profile(make_step("vim2_tiny", x, args.mode), rows=20)
        return
    steps = {name: make_step(name, x, args.mode) for name in MODELS}
    for step in steps.values():
        step()  # warm-up (and the selective-scan kernel build)
    seconds = dict.fromkeys(MODELS, 0.0)
    for round_index in range(args.rounds):
        line = []
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            elapsed = time.perf_counter() - start
            seconds[name] += elapsed
            line.append(f"{name} {args.steps * args.batch / elapsed:7.2f} img/s")
        print(f"round {round_index}: " + ", ".join(line))
    ratio = seconds["davit_tiny"] / seconds["vim2_tiny"]
    print(f"vim2_tiny / davit_tiny ({args.mode}): {ratio:.2f}x")


if __name__ == "__main__":
    main()
