"""Selective-scan paths side by side: forward and forward+backward time and peak memory vs the sequential reference.

    python benchmarks/selective_scan.py [--batch 2 --dim 192 --length 3136 --state 16 --repeats 3]

Default size: ViM2-tiny stage 1 (batch 2, 192 inner channels, 56x56 = 3136 tokens, 16 states). Times are the
median of ``--repeats`` runs after one warm-up; peak memory is the largest resident-set growth over the run's
baseline (CPU, Linux /proc), sampled by a background thread, so it counts every tensor the path allocates.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

import os

import torch

from chanzoo.ops.selective_scan import available_backends, selective_scan


class PeakRSS:
    """Peak resident-set growth (bytes) while the context runs."""

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.0005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def make_inputs(batch: int, dim: int, length: int, state: int, grad: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.randn(batch, dim, length, generator=g) * 0.5 - 2.0,
        "A": -torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1),  # S4D-real init, as in Mamba
        "B": torch.randn(batch, state, length, generator=g),
        "C": torch.randn(batch, state, length, generator=g),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": torch.rand(dim, generator=g),
    }
    return {k: v.requires_grad_(grad) for k, v in t.items()}


def run(backend: str, inputs: dict[str, torch.Tensor], backward: bool) -> None:
    y = selective_scan(**inputs, delta_softplus=True, backend=backend)
    if backward:
        y.sum().backward()


def measure(backend: str, args: argparse.Namespace, backward: bool) -> tuple[float, float]:
    inputs = make_inputs(args.batch, args.dim, args.length, args.state, backward)
    with torch.set_grad_enabled(backward):
        run(backend, inputs, backward)  # warm-up (and the C++ build)
        times = []
        for _ in range(args.repeats):
            for v in inputs.values():
                v.grad = None
            start = time.perf_counter()
            run(backend, inputs, backward)
            times.append(time.perf_counter() - start)
        for v in inputs.values():
            v.grad = None
        with PeakRSS() as mem:
            run(backend, inputs, backward)
    return statistics.median(times), mem.growth_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--length", type=int, default=3136)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    backends = [b for b in ("reference", "eager", "cpp") if b in available_backends()]
    print(f"selective scan B={args.batch} D={args.dim} L={args.length} N={args.state}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'path':<10} {'fwd ms':>9} {'x ref':>7} {'fwd MiB':>8} {'fwd+bwd ms':>11} {'x ref':>7} {'f+b MiB':>8}")
    ref = None
    for backend in backends:
        fwd, fwd_mem = measure(backend, args, backward=False)
        both, both_mem = measure(backend, args, backward=True)
        if ref is None:
            ref = (fwd, both)
        print(f"{backend:<10} {fwd * 1e3:9.1f} {ref[0] / fwd:7.1f} {fwd_mem:8.1f} {both * 1e3:11.1f} "
              f"{ref[1] / both:7.1f} {both_mem:8.1f}")


if __name__ == "__main__":
    main()
