"""One training step: timm eager against chanzoo's default training path (and the levers behind it), side by side.

    python benchmarks/train_step.py [--models davit_tiny inception_next_tiny resnet50+eca vim2_tiny]
                                    [--batch-size 8] [--img-size 224] [--repeats 5] [--optimizer sgd|adamw]
                                    [--levers] [--threads N] [--precision auto|32]

A step is forward, cross-entropy, backward and an optimizer step (SGD by default, as in timm's train loop), on the
CPU. For each model, in one process and timed in turns (``time_interleaved``, so load from other processes falls on
all paths alike):

- ``timm eager``: ``timm.create_model`` and plain PyTorch, NCHW, fp32 (timm's train loop without ``--amp``);
  ``resnet50+eca`` is timm's ResNet-50 with timm's ``EcaModule`` in its attention slot
  (``block_args=dict(attn_layer='eca')``); a chanzoo-only family (``vim2_*``) is its own eager model.
- ``chanzoo default``: ``chanzoo.create_model`` + ``prepare_model(compile='auto', channels_last='auto')`` as
  ``train.py`` calls it (the training table of ``chanzoo.acceleration``), the optimizer ``train.py`` builds (timm's
  ``create_optimizer_v2``) and ``train.py``'s precision: ``--precision auto`` (the default) resolves as
  ``trainer.precision=auto`` does, to bf16 autocast where the CPU computes bf16 natively, else fp32.
- ``timm eager bf16``: when the default runs under bf16 autocast, timm's eager model under the same autocast too, so
  that the speed of the path and that of the precision can be told apart.
- with ``--levers``: channels-last eager, whole-model compile, regional (per-block) compile and a fused/foreach
  optimizer, each alone and in fp32 (the ``auto`` table is decided from fp32 figures).

Prints img/s, the ratio to timm eager (fp32), the warm-up seconds (first two steps, where torch.compile compiles)
and the fraction of the fp32 GEMM rate (2048^2 matmul timed in the same turns) that the step's FLOPs reach.
"""
from __future__ import annotations

import argparse
import copy
import logging
import time
from typing import Callable

import timm
import torch
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import chanzoo
from chanzoo.acceleration import prepare_model, resolve_precision, to_input_format
from chanzoo.profile import machine_name, time_interleaved

GEMM_SIDE = 2048


def split_name(spec: str) -> tuple[str, str | None]:
    """'resnet50+eca' -> ('resnet50', 'eca'); 'davit_tiny' -> ('davit_tiny', None)."""
    name, _, attn = spec.partition("+")
    return name, attn or None


def timm_model(spec: str, num_classes: int, in_chans: int = 3) -> nn.Module:
    """The timm-eager reference for ``spec``: timm's own model and, for a ResNet, timm's module in the slot."""
    name, attn = split_name(spec)
    kwargs = {"block_args": {"attn_layer": attn}} if attn else {}
    return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)


def step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one forward + backward (torch's counter; the optimizer's elementwise work is not counted)."""
    counter = FlopCounterMode(display=False)
    with counter:
        nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              bf16: bool = False) -> Callable[[], torch.Tensor]:
    """One training step; with ``bf16``, forward and loss under CPU bf16 autocast (Lightning's 'bf16-mixed')."""

    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def variants(spec: str, levers: bool) -> dict[str, dict]:
    """Name -> prepare_model/optimizer settings of each chanzoo path to time."""
    chosen = {"chanzoo default": {"compile": "auto", "channels_last": "auto"}}
    if levers:
        chosen.update({
            "eager+channels_last": {"compile": False, "channels_last": True},
            "compiled whole": {"compile": True, "channels_last": False, "regional": False},
            "compiled regional": {"compile": True, "channels_last": False, "regional": True},
            "eager+foreach optimizer": {"compile": False, "channels_last": False, "foreach": True},
        })
    return chosen


def rows_for(spec: str, batch_size: int, img_size: int, repeats: int, optimizer: str, levers: bool,
             in_chans: int = 3, bf16: bool = False) -> list[dict]:
    cpu = torch.device("cpu")
    num_classes = 1000
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, in_chans, img_size, img_size, generator=gen)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen)
    name, attn = split_name(spec)
    reference = timm_model(spec, num_classes, in_chans).train()  # a chanzoo-only family: its own eager model
    chanzoo_base = chanzoo.create_model(name, attn=attn, num_classes=num_classes, in_chans=in_chans).train()
    flops = step_flops(reference, x, y)

    steps: dict[str, Callable[[], torch.Tensor]] = {}
    warmup_s: dict[str, float] = {}
    applied_by: dict[str, dict] = {}
    timm_opt = create_optimizer_v2(reference, optimizer, lr=1e-3, foreach=False)
    steps["timm eager"] = make_step(reference, timm_opt, x, y)
    if bf16:
        reference_bf16 = copy.deepcopy(reference)
        steps["timm eager bf16"] = make_step(reference_bf16, create_optimizer_v2(reference_bf16, optimizer, lr=1e-3,
                                                                                   foreach=False), x, y, bf16=True)
    for label, settings in variants(spec, levers).items():
        model = copy.deepcopy(chanzoo_base)
        model, applied = prepare_model(model, settings["compile"], None, settings["channels_last"], cpu,
                                       regional=settings.get("regional", "auto"))
        opt = create_optimizer_v2(model, optimizer, lr=1e-3, foreach=settings.get("foreach"))
        step = make_step(model, opt, to_input_format(x, applied), y, bf16=bf16 and label == "chanzoo default")
        start = time.perf_counter()
        step(), step()
        warmup_s[label] = time.perf_counter() - start
        steps[label] = step
        applied_by[label] = applied
    for label in ("timm eager", "timm eager bf16"):
        if label in steps:
            start = time.perf_counter()
            steps[label](), steps[label]()
            warmup_s[label] = time.perf_counter() - start

    a, b = torch.randn(GEMM_SIDE, GEMM_SIDE), torch.randn(GEMM_SIDE, GEMM_SIDE)
    steps["gemm"] = lambda: torch.mm(a, b)
    timings = time_interleaved(steps, cpu, warmup=1, repeats=repeats)
    gemm_rate = 2 * GEMM_SIDE**3 / timings.pop("gemm").median
    base = timings["timm eager"].median
    rows = []
    for label, timing in timings.items():
        rows.append({
            "model": spec, "path": label, "img_s": batch_size / timing.median, "spread_pct": timing.spread_pct,
            "vs_timm": base / timing.median, "warmup_s": warmup_s[label],
            "of_gemm": flops / timing.median / gemm_rate,
            "applied": applied_by.get(label, {}),
        })
    logging.getLogger(__name__).info("%s: %.2f GFLOPs per step, fp32 GEMM %.1f GFLOP/s", spec, flops / 1e9,
                                     gemm_rate / 1e9)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'model':<22} {'path':<24} {'img/s':>7} {'spread':>7} {'vs timm':>8} {'warm-up':>8} {'of GEMM':>8}"]
    for r in rows:
        lines.append(f"{r['model']:<22} {r['path']:<24} {r['img_s']:7.2f} {r['spread_pct']:6.0f}% "
                     f"{r['vs_timm']:7.2f}x {r['warmup_s']:7.1f}s {100 * r['of_gemm']:7.0f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["davit_tiny", "inception_next_tiny", "resnet50+eca",
                                                         "vim2_tiny"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--in-chans", type=int, default=3, help="input channels (1 for small_cnn on Fashion-MNIST)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    parser.add_argument("--levers", action="store_true", help="also time each lever alone")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--precision", default="auto", choices=["auto", "32"],
                        help="chanzoo default's precision: auto as train.py resolves it (bf16 autocast where native)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    precision = resolve_precision("auto", "cpu") if args.precision == "auto" else "32-true"
    bf16 = precision == "bf16-mixed"
    rows = []
    for spec in args.models:
        rows += rows_for(spec, args.batch_size, args.img_size, args.repeats, args.optimizer, args.levers,
                         args.in_chans, bf16)
    print(f"training step, batch {args.batch_size}, {args.img_size}x{args.img_size}, chanzoo default in {precision} "
          f"(timm eager fp32{', and bf16 autocast' if bf16 else ''}), {args.optimizer}, "
          f"{machine_name(torch.device('cpu'))}")
    print(format_rows(rows))
    for r in rows:
        if r["path"] == "chanzoo default":
            print(f"{r['model']}: chanzoo default applied {r['applied']}")
    return rows


if __name__ == "__main__":
    main()
