"""One switch for fast execution: ``torch.compile`` (whole model or its repeated blocks) and channels-last.

``prepare_model`` is what ``train.py``, ``eval.py`` and ``python -m chanzoo.profile`` call. Each option takes
``'auto'``, which turns it on only where it was measured to pay on the current device, for inference and for
training separately (``CPU_MEASURED_INFERENCE``, ``CPU_MEASURED_TRAINING`` and docs/benchmarks.md); the returned
``applied`` dict, also logged, says what was done and why.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional, Union

import torch
from torch import nn

from chanzoo.factory import model_family

_logger = logging.getLogger(__name__)

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# What 'auto' turns on for a model family (its timm module) on CPU, measured separately for inference and for
# training, since compilation pays differently for the two. Families not listed run eager and contiguous on CPU:
# neither switch was shown to pay for them.
# Inference: ``python benchmarks/acceleration.py`` at batch 8, 224x224, fp32 (figures in docs/benchmarks.md).
CPU_MEASURED_INFERENCE: dict[str, dict[str, bool]] = {
    "davit": {"channels_last": False, "compile": True},
    "inception_next": {"channels_last": True, "compile": True},
}
# Training: ``python benchmarks/train_step.py --levers`` at batch 8, 224x224, fp32, SGD. DaViT-T's regional compile
# trained at 0.99x timm eager after about a minute of compilation, so DaViT trains eager; InceptionNeXt-T's compiled
# channels-last step was 1.11x timm eager.
# SmallCNN (the default run's model, batch 128 at 28x28, AdamW): channels-last eager 1.19x its contiguous step, whole
# compile 1.30x after 14 s of compilation (not worth it for the few-minute runs it serves), regional compile 0.83x.
CPU_MEASURED_TRAINING: dict[str, dict[str, bool]] = {
    "inception_next": {"channels_last": True, "compile": True},
    "small_cnn": {"channels_last": True, "compile": False},
}

BoolOrAuto = Union[bool, str]


def native_bf16(accelerator: str = "auto") -> bool:
    """Whether a run on ``accelerator`` computes bf16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16
    or AMX (torch's CPU capability checks). Elsewhere bf16 autocast is emulated and slower than fp32."""
    if torch.cuda.is_available() and str(accelerator) in ("auto", "gpu", "cuda"):
        return torch.cuda.is_bf16_supported()
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_precision(precision: Any, accelerator: str = "auto", task: Optional[nn.Module] = None,
                      trained: Optional[str] = None) -> Any:
    """Lightning's ``precision`` for ``trainer.precision``: 'auto' is ``trained`` where given (the precision a
    checkpoint was trained in, for its evaluation), else 'bf16-mixed' where the device computes bf16 natively and
    the task trains well under autocast (its ``auto_bf16`` attribute, default true), else '32-true'; any other value
    is returned as given."""
    if str(precision) != "auto":
        return precision
    if trained is not None:
        _logger.info("trainer.precision=auto: %s (the precision the checkpoint was trained in)", trained)
        return trained
    task_ok = bool(getattr(task, "auto_bf16", True))
    native = native_bf16(accelerator)
    chosen = "bf16-mixed" if task_ok and native else "32-true"
    reason = ("the device computes bf16 natively" if native else "the device has no native bf16") if task_ok else (
        f"{type(task).__name__} keeps fp32 (auto_bf16=False)")
    _logger.info("trainer.precision=auto: %s (%s)", chosen, reason)
    return chosen


def _check_switch(name: str, value: Any) -> BoolOrAuto:
    """``True``/``False``/'auto' (also the strings 'true'/'false' from a command line)."""
    if isinstance(value, str) and value.lower() in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[value.lower()]
    if isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be true, false or 'auto', got {value!r}")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """Every instance of the model's repeated block(s): the model-defined classes (not ``torch.nn``'s) that appear
    most often as elements of an ``nn.Sequential``/``nn.ModuleList``, e.g. timm's ``Bottleneck`` in ResNet, or both
    ``SpatialBlock`` and ``ChannelBlock`` in DaViT; empty if no such class repeats."""
    members: dict[type, list[nn.Module]] = {}
    for container in model.modules():
        if isinstance(container, (nn.Sequential, nn.ModuleList)):
            for child in container.children():
                own_class = not type(child).__module__.startswith("torch.")
                if own_class and any(True for _ in child.parameters()):
                    members.setdefault(type(child), []).append(child)
    most = max((len(mods) for mods in members.values()), default=0)
    if most < 2:
        return []
    blocks = [m for mods in members.values() if len(mods) == most for m in mods]
    # a block nested inside another repeated block is compiled with its parent
    inner = {id(m) for b in blocks for m in b.modules() if m is not b}
    return [b for b in blocks if id(b) not in inner]


def _resolve_device(device: Optional[Union[str, torch.device]], model: nn.Module) -> torch.device:
    if device is None:
        param = next(model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from err


def prepare_model(
    model: nn.Module,
    compile: BoolOrAuto = "auto",  # noqa: A002  (the config key's name)
    compile_mode: Optional[str] = None,
    channels_last: BoolOrAuto = "auto",
    device: Optional[Union[str, torch.device]] = None,
    regional: BoolOrAuto = "auto",
    inference: bool = False,
    move: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Move ``model`` to ``device``, set its memory format and compile it in place; returns it and what was applied.

    Args:
        model: any ``nn.Module``; it is changed in place (``nn.Module.compile``), so its state-dict keys stay.
        compile: compile with ``torch.compile``; 'auto' = on CUDA always, on CPU where it was measured to pay for
            this use (``CPU_MEASURED_INFERENCE`` or ``CPU_MEASURED_TRAINING``).
        compile_mode: ``torch.compile``'s mode (one of ``COMPILE_MODES``).
        channels_last: store 4-D weights (and expect inputs) as NHWC; 'auto' = on CUDA always, on CPU where
            measured faster for the family.
        device: where the model runs (default: where its parameters are).
        regional: compile each repeated block (``repeated_blocks``) instead of the whole model; 'auto' = when the
            model repeats a block and is trained (each block is compiled once per shape, which cuts compile time),
            whole-model for inference, where it was measured faster to run.
        move: move the model to ``device``; ``False`` only decides for ``device`` (Lightning moves the model later).
        inference: the model only runs under ``torch.inference_mode``/``no_grad``: lets inductor freeze the weights
            into the graph (constant folding, oneDNN weight prepacking on CPU). Never for a model being trained.
    """
    compile = _check_switch("compile", compile)
    channels_last = _check_switch("channels_last", channels_last)
    regional = _check_switch("regional", regional)
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
    dev = _resolve_device(device, model)
    family = model_family(model)
    table_name = "CPU_MEASURED_INFERENCE" if inference else "CPU_MEASURED_TRAINING"
    table = CPU_MEASURED_INFERENCE if inference else CPU_MEASURED_TRAINING
    measured = table.get(family, {"channels_last": False, "compile": False})
    on_cuda = dev.type == "cuda"
    applied: dict[str, Any] = {"device": str(dev), "family": family, "use": "inference" if inference else "training"}
    if on_cuda:
        reason = "auto: on for CUDA"
    elif family in table:
        reason = f"auto: {table_name}[{family!r}]"
    else:
        reason = f"auto: {family!r} not in {table_name}, so off"

    if channels_last == "auto":
        channels_last = on_cuda or measured["channels_last"]
        applied["channels_last_reason"] = reason
    if move:
        model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    applied["channels_last"] = bool(channels_last)

    if compile == "auto":
        compile = on_cuda or measured["compile"]
        applied["compile_reason"] = reason
    applied["compile"] = "off"
    if compile:
        blocks = repeated_blocks(model)
        if regional == "auto":
            regional = bool(blocks) and not inference
        if regional and not blocks:
            raise ValueError(f"regional=True but {type(model).__name__} repeats no block; use regional=false")
        freezing = inference and not on_cuda
        # torch.compile takes a mode or options, not both: spell the mode out as its options to add freezing
        kwargs: dict[str, Any] = {"mode": compile_mode}
        if freezing:
            from torch._inductor import list_mode_options

            kwargs = {"options": {**list_mode_options(compile_mode or "default"), "freezing": True}}
        start = time.perf_counter()
        targets = blocks if regional else [model]
        for target in targets:
            target.compile(dynamic=False, **kwargs)
        applied.update(
            compile="regional" if regional else "whole",
            compiled_modules=len(targets),
            block=",".join(sorted({type(b).__name__ for b in blocks})) if regional else None,
            compile_mode=compile_mode or "default",
            freezing=freezing,
            wrap_seconds=round(time.perf_counter() - start, 3),
        )
    _logger.info("prepare_model(%s): %s", type(model).__name__, applied)
    return model, applied


def prepare_from_config(model: nn.Module, accel_cfg: dict[str, Any], accelerator: str, inference: bool) -> nn.Module:
    """``prepare_model`` with the ``accel`` config group's ``compile``/``compile_mode``/``channels_last`` keys, for
    a Lightning run on ``accelerator`` ('auto'/'gpu'/'cuda' use CUDA when present); the trainer moves the model."""
    on_cuda = torch.cuda.is_available() and str(accelerator) in ("auto", "gpu", "cuda")
    model, _ = prepare_model(
        model,
        compile=accel_cfg.get("compile", False),
        compile_mode=accel_cfg.get("compile_mode"),
        channels_last=accel_cfg.get("channels_last", "auto"),
        device="cuda" if on_cuda else "cpu",
        inference=inference,
        move=False,
    )
    return model


def to_input_format(x: torch.Tensor, applied: dict[str, Any]) -> torch.Tensor:
    """``x`` on the prepared model's device, in its memory format."""
    x = x.to(applied["device"])
    return x.contiguous(memory_format=torch.channels_last) if applied["channels_last"] and x.dim() == 4 else x
