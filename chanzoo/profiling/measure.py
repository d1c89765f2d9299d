"""Measuring a model's cost: parameters, FLOPs/MACs, throughput, latency and peak memory, eager or compiled.

Conventions: FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and
scaled-dot-product attention; a multiply-add is 2 FLOPs), MACs = FLOPs / 2 (the unit of the papers' "GFLOPs"
for CNNs such as ResNet-50's 4.1G). fvcore, which counts one multiply-add as one "flop" and also counts norms
but skips SDPA, is the cross-check.
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from chanzoo.acceleration import prepare_model, to_input_format

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("infer", "train", "all")
FLOP_DIFF_NOTE = 0.01  # relative FlopCounterMode/fvcore difference above which a row carries a note


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; shared parameters count once (``parameters()`` yields each once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any,
                             *args: Any, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one that SDPA dispatches to on CPU: same formula
CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward of ``model`` on ``x`` (``FlopCounterMode``: 2 per multiply-add) and FLOPs per aten op."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS)
    with torch.no_grad(), counter:
        model(x)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def fvcore_macs(model: nn.Module, x: torch.Tensor) -> tuple[Optional[int], dict[str, int], Optional[str]]:
    """fvcore's count (multiply-adds, norms included), the ops it skipped, and why it could not count, if so."""
    from fvcore.nn import FlopCountAnalysis

    try:
        analysis = FlopCountAnalysis(model, x)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        total = int(analysis.total())
        skipped = dict(analysis.unsupported_ops())
    except Exception as err:  # noqa: BLE001  (fvcore's jit trace fails in many ways; the report names it)
        return None, {}, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
    return total, skipped, None



@dataclass
class Timing:
    """Seconds per call over repeated runs."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread_pct(self) -> float:
        """Interquartile range as a percentage of the median."""
        if len(self.samples) < 2:
            return 0.0
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return 100.0 * (q[2] - q[0]) / self.median


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int = 2, repeats: int = 10
) -> dict[str, Timing]:
    """Time each function ``repeats`` times, taking turns (A, B, C, A, B, C, ...) so that load from other
    processes falls on all of them alike; ``warmup`` untimed calls each first. CUDA: timed with CUDA events."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / 1000.0)
            else:
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {name: Timing(s) for name, s in samples.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory while ``fn`` runs: CUDA max allocated on GPU, RSS growth over the start (sampled) on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    if not Path("/proc/self/statm").exists():
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(0, max(peak[0], _rss_bytes()) - base) / 2**20


def machine_name(device: torch.device) -> str:
    """A short description of the hardware ``device`` is on, with the thread count and torch version."""
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        hw = platform.processor() or platform.machine()
        if Path("/proc/cpuinfo").exists():
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    hw = line.split(":", 1)[1].strip()
                    break
        hw = f"{hw}, {torch.get_num_threads()} threads"
    return f"{hw}, torch {torch.__version__.split('+')[0]}"


def sdpa_backends(device: torch.device) -> str:
    """The scaled-dot-product-attention backends enabled on CUDA (flash, mem-efficient, cuDNN, math)."""
    if device.type != "cuda":
        return "cpu (flash-attention CPU kernel / math)"
    cuda = torch.backends.cuda
    enabled = {
        "flash": cuda.flash_sdp_enabled(),
        "mem_efficient": cuda.mem_efficient_sdp_enabled(),
        "cudnn": cuda.cudnn_sdp_enabled(),
        "math": cuda.math_sdp_enabled(),
    }
    return ",".join(name for name, on in enabled.items() if on)


@dataclass
class ProfileRow:
    """One model in one execution variant."""

    model: str
    variant: str
    device: str
    batch_size: int
    img_size: int
    amp: str
    params_m: float
    trainable_m: float
    gflops: float
    gmacs: float
    fvcore_gmacs: Optional[float] = None
    flop_note: str = ""
    infer_img_s: Optional[float] = None
    infer_spread_pct: Optional[float] = None
    latency_ms: Optional[float] = None
    latency_spread_pct: Optional[float] = None
    train_img_s: Optional[float] = None
    train_spread_pct: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    compile_s: Optional[float] = None
    applied: dict[str, Any] = field(default_factory=dict)
    machine: str = ""


def flop_report(model: nn.Module, in_chans: int, img_size: int, fvcore: bool = True) -> dict[str, Any]:
    """Params, FLOPs/MACs per image (FlopCounterMode), fvcore's count beside it and a note where they differ."""
    total, trainable = count_params(model)
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    x = torch.zeros(1, in_chans, img_size, img_size, device=param.device if param is not None else "cpu")
    flops, by_op = count_flops(model, x)
    report: dict[str, Any] = {
        "params": total, "trainable": trainable, "flops": flops, "macs": flops / 2, "by_op": by_op,
    }
    note = ""
    if fvcore:
        fv_total, skipped, error = fvcore_macs(model, x)
        report["fvcore_macs"] = fv_total
        if error is not None:
            note = f"fvcore cannot count this model ({error})"
        else:
            diff = (fv_total - flops / 2) / max(flops / 2, 1)
            if abs(diff) > FLOP_DIFF_NOTE or skipped:
                note = f"fvcore differs by {100 * diff:+.1f}%"
                if skipped:
                    note += "; fvcore skipped " + ", ".join(f"{op} x{n}" for op, n in sorted(skipped.items()))
    report["note"] = note
    model.train(was_training)
    return report


@dataclass
class Variant:
    """How a model is run: the ``prepare_model`` switches and the autocast dtype."""

    name: str
    compile: Any
    channels_last: Any
    amp: str = "none"


def compare_variants(device: torch.device, amp: str) -> list[Variant]:
    """eager, channels-last, compiled, compiled + channels-last; on a GPU also the last with AMP."""
    variants = [
        Variant("eager", False, False),
        Variant("channels_last", False, True),
        Variant("compiled", True, False),
        Variant("compiled+channels_last", True, True),
    ]
    if device.type == "cuda":
        variants.append(Variant(f"compiled+channels_last+{amp if amp != 'none' else 'bf16'}", True, True,
                                amp if amp != "none" else "bf16"))
    return variants


def _autocast(device: torch.device, amp: str) -> Any:
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def profile_model(
    model_fn: Callable[[], nn.Module],
    name: str,
    batch_size: int = 8,
    img_size: Optional[int] = None,
    device: str = "cpu",
    variants: Optional[Iterable[Variant]] = None,
    compile_mode: Optional[str] = None,
    mode: str = "infer",
    warmup: int = 2,
    repeats: int = 10,
    fvcore: bool = True,
) -> list[ProfileRow]:
    """Profile a model (built by ``model_fn``, once per variant) in each variant, timed side by side.

    Throughput is ``batch_size`` over the median seconds per call; latency is batch 1; training is one
    forward + cross-entropy + backward + SGD step. Variants are timed in turns (see ``time_interleaved``).
    """
    check_choice("mode", mode, MODES)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here; use device=cpu")
        torch.backends.cudnn.benchmark = True
    variants = list(variants or [Variant("default", "auto", "auto")])
    for variant in variants:
        check_choice("amp", variant.amp, tuple(AMP_DTYPES))

    base = model_fn()
    cfg = getattr(base, "pretrained_cfg", {}) or {}
    in_chans = int(getattr(base, "in_chans", None) or cfg.get("input_size", (3,))[0])
    if img_size is None:
        img_size = int(cfg.get("input_size", (3, 224, 224))[-1])
    if not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
    flops = flop_report(base, in_chans, img_size, fvcore=fvcore)
    num_classes = int(getattr(base, "num_classes", 0) or 0)
    machine = machine_name(dev)
    # pixels in [0, 1) normalised like the model's data: the figures do not depend on them, only on the shape
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, in_chans, img_size, img_size, generator=gen)
    labels = torch.randint(0, max(num_classes, 1), (batch_size,), generator=gen)

    rows, infer_fns, latency_fns, train_fns, memory_fns = [], {}, {}, {}, {}
    for variant in variants:
        model = copy.deepcopy(base)
        train_model = copy.deepcopy(base) if mode in ("train", "all") else None
        model.eval()
        start = time.perf_counter()
        model, applied = prepare_model(model, variant.compile, compile_mode, variant.channels_last, dev, inference=True)
        x = to_input_format(images, applied)
        x1 = x[:1].contiguous(memory_format=torch.channels_last) if applied["channels_last"] else x[:1]
        if mode in ("infer", "all"):

            def infer(model: nn.Module = model, x: torch.Tensor = x, amp: str = variant.amp) -> Any:
                with torch.inference_mode(), _autocast(dev, amp):
                    return model(x)

            def latency(model: nn.Module = model, x1: torch.Tensor = x1, amp: str = variant.amp) -> Any:
                with torch.inference_mode(), _autocast(dev, amp):
                    return model(x1)

            infer()  # the first call compiles: its time is the compile time
            _sync(dev)
            infer_fns[variant.name], latency_fns[variant.name], memory_fns[variant.name] = infer, latency, infer
        compile_s = time.perf_counter() - start if applied["compile"] != "off" else None
        if train_model is not None:
            train_model.train()
            train_model, train_applied = prepare_model(
                train_model, variant.compile, compile_mode, variant.channels_last, dev, inference=False
            )
            applied["train"] = {k: v for k, v in train_applied.items() if k in ("compile", "block", "channels_last")}
            optimizer = torch.optim.SGD(train_model.parameters(), lr=1e-4, momentum=0.9)
            y = labels.to(dev)

            def train_step(model: nn.Module = train_model, x: torch.Tensor = x, amp: str = variant.amp,
                           optimizer: torch.optim.Optimizer = optimizer, y: torch.Tensor = y) -> None:
                with _autocast(dev, amp):
                    out = model(x)
                    loss = nn.functional.cross_entropy(out.float(), y) if out.dim() == 2 else out.float().mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            train_fns[variant.name] = train_step
            memory_fns.setdefault(variant.name, train_step)
        rows.append(ProfileRow(
            model=name, variant=variant.name, device=str(dev), batch_size=batch_size, img_size=img_size,
            amp=variant.amp, params_m=flops["params"] / 1e6, trainable_m=flops["trainable"] / 1e6,
            gflops=flops["flops"] / 1e9, gmacs=flops["macs"] / 1e9,
            fvcore_gmacs=None if flops.get("fvcore_macs") is None else flops["fvcore_macs"] / 1e9,
            flop_note=flops["note"], compile_s=compile_s, applied=applied, machine=machine,
        ))
    by_name = {row.variant: row for row in rows}
    for variant_name, fn in memory_fns.items():
        by_name[variant_name].peak_mem_mb = peak_memory_mb(fn, dev)
    if infer_fns:
        for variant_name, timing in time_interleaved(infer_fns, dev, warmup, repeats).items():
            by_name[variant_name].infer_img_s = batch_size / timing.median
            by_name[variant_name].infer_spread_pct = timing.spread_pct
        for variant_name, timing in time_interleaved(latency_fns, dev, warmup, repeats).items():
            by_name[variant_name].latency_ms = 1000 * timing.median
            by_name[variant_name].latency_spread_pct = timing.spread_pct
    if train_fns:
        for variant_name, timing in time_interleaved(train_fns, dev, warmup, repeats).items():
            by_name[variant_name].train_img_s = batch_size / timing.median
            by_name[variant_name].train_spread_pct = timing.spread_pct
    return rows


def fastest(rows: Sequence[ProfileRow]) -> Optional[ProfileRow]:
    """The row with the highest inference throughput (training throughput when only that was measured)."""
    key = "infer_img_s" if any(r.infer_img_s for r in rows) else "train_img_s"
    timed = [r for r in rows if getattr(r, key)]
    return max(timed, key=lambda r: getattr(r, key)) if timed else None

