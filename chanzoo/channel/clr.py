"""Channel-wise Lightweight Reprogramming (Ge et al., "CLR: Channel-wise Lightweight Reprogramming for Continual
Learning", ICCV 2023).

A pretrained network is kept as a frozen, task-agnostic *anchor*; each of its k x k convolutions is followed by a
depthwise (channel-wise) k x k convolution initialised to the identity, which together with the normalisation
layers and a task head is all that a new task trains. Each task's parameters are a small file; swapping files
switches tasks with no forgetting, because the shared anchor never changes.

The official code's three variants (gyhandy/Channel-wise-Lightweight-Reprogramming, ``add_ghostnet``):

* ``reduced_v1`` (the paper's): every Conv2d but the 1x1 ones gets a k x k reprogramming conv;
* ``reduced_v2``: as ``reduced_v1``, and every 1x1 conv gets a 1x1 depthwise one (a per-channel scale);
* ``base``: every Conv2d, 1x1 ones included, gets a k x k reprogramming conv.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Optional, Union

import safetensors.torch
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from chanzoo.io import write_bytes_atomic

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
CLR_VARIANTS = ("reduced_v1", "reduced_v2", "base")
OFFICIAL_REGULARIZER_WEIGHT = 1e-5  # the official training script's lambda


class CLRConv2d(nn.Module):
    """A frozen ``anchor`` convolution followed by a trainable depthwise ``reprogram`` convolution (Dirac init).

    Args:
        anchor: the pretrained convolution; its parameters are frozen.
        kernel_size: odd kernel size of the depthwise reprogramming conv (3 in the paper).
    """

    def __init__(self, anchor: nn.Conv2d, kernel_size: int = 3) -> None:
        super().__init__()
        if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"CLR kernel_size must be a positive odd int, got {kernel_size!r}")
        channels = anchor.out_channels
        self.anchor = anchor.requires_grad_(False)
        self.reprogram = nn.Conv2d(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False,
            device=anchor.weight.device, dtype=anchor.weight.dtype,
        )
        nn.init.dirac_(self.reprogram.weight, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reprogram(self.anchor(x))


def _classifier(model: nn.Module) -> Optional[nn.Module]:
    get_classifier = getattr(model, "get_classifier", None)
    return get_classifier() if callable(get_classifier) else None


def classifier_name(model: nn.Module) -> Optional[str]:
    """Module path of ``model.get_classifier()`` (e.g. 'fc', 'head.fc2'); ``None`` without one."""
    head = _classifier(model)
    return next((name for name, m in model.named_modules() if head is not None and m is head), None)


def reprogram_kernel_size(conv: nn.Conv2d, variant: str, kernel_size: int = 3) -> Optional[int]:
    """Kernel size of the reprogramming conv ``variant`` puts after ``conv``; ``None``: the conv stays as it is."""
    if variant not in CLR_VARIANTS:
        raise ValueError(f"CLR variant must be one of {list(CLR_VARIANTS)}, got {variant!r}")
    if conv.kernel_size != (1, 1) or variant == "base":
        return kernel_size
    return 1 if variant == "reduced_v2" else None


def reprogram(
    model: nn.Module, kernel_size: int = 3, variant: str = "reduced_v1", num_classes: Optional[int] = None
) -> nn.Module:
    """Turn ``model`` (in place) into a CLR model: frozen anchor convs, trainable reprogramming convs, norms and head.

    Right after this call the model computes exactly what it computed before (the reprogramming convs start as the
    identity). What stays trainable: every ``reprogram`` conv, every BatchNorm layer and the classifier
    (``model.get_classifier()``, timm's contract), which ``num_classes`` replaces by a new head first. Convolutions
    of other types (the Conv1d of ECA and ELA) stay frozen parts of the anchor, as in the official code.

    Args:
        model: a timm-style model (pretrained weights already loaded).
        kernel_size: odd kernel size of the depthwise reprogramming convs.
        variant: which convs are reprogrammed: 'reduced_v1' (not the 1x1 ones; the paper's), 'reduced_v2' (1x1
            convs get a 1x1 depthwise conv) or 'base' (all, with ``kernel_size``).
        num_classes: if given, a new classifier for this many classes (``model.reset_classifier``).

    Returns:
        ``model``.
    """
    if variant not in CLR_VARIANTS:
        raise ValueError(f"CLR variant must be one of {list(CLR_VARIANTS)}, got {variant!r}")
    if any(isinstance(m, CLRConv2d) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already reprogrammed (it holds CLRConv2d layers)")
    if num_classes is not None:
        if not hasattr(model, "reset_classifier"):
            raise TypeError(
                f"num_classes={num_classes} needs a model with reset_classifier, not {type(model).__name__}"
            )
        model.reset_classifier(num_classes)
    head = _classifier(model)
    head_modules = set(head.modules()) if head is not None else set()
    targets = [
        (name, m, reprogram_kernel_size(m, variant, kernel_size))
        for name, m in model.named_modules()
        if type(m) is nn.Conv2d and m not in head_modules
    ]
    targets = [(name, m, k) for name, m, k in targets if k is not None]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no Conv2d to reprogram (variant={variant!r})")
    model.requires_grad_(False)
    for name, conv, k in targets:
        model.set_submodule(name, CLRConv2d(conv, k))
    for m in model.modules():
        if isinstance(m, CLRConv2d):
            m.reprogram.requires_grad_(True)
        elif isinstance(m, _BatchNorm):
            m.requires_grad_(True)
    if head is not None:
        head.requires_grad_(True)
    _logger.info("CLR: reprogrammed %d convolutions of %s", len(targets), type(model).__name__)
    return model


def task_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """One task's state of a reprogrammed model: reprogramming convs, BatchNorm params and statistics, classifier."""
    reprogrammed = [f"{name}.reprogram" for name, m in model.named_modules() if isinstance(m, CLRConv2d)]
    if not reprogrammed:
        raise ValueError(f"{type(model).__name__} is not reprogrammed: call chanzoo.channel.clr.reprogram(model) first")
    norms = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    head = classifier_name(model)
    task_modules = set(reprogrammed + norms + ([head] if head else []))
    state = model.state_dict()
    return {
        key: value
        for key, value in state.items()
        if any(key.startswith(prefix + ".") for prefix in task_modules)
    }


def task_parameter_count(model: nn.Module, include_head: bool = False) -> int:
    """Trainable parameters one task adds to the anchor (reprogramming convs and norms; the head if asked)."""
    head = _classifier(model)
    head_params = {id(p) for p in head.parameters()} if head is not None and not include_head else set()
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in head_params)


def l2_norm_penalty(parameters: Iterable[torch.Tensor], weight: float = OFFICIAL_REGULARIZER_WEIGHT) -> torch.Tensor:
    """The official CLR training regulariser: ``weight`` x the sum over tensors of each tensor's L2 norm.

    The norm is taken per tensor (not squared, not per element), over every trainable tensor of the task: head,
    BatchNorm and reprogramming convs. The official code leaves out tensors whose norm is zero; here they add 0 with
    a zero gradient (torch's norm backward at 0), which is the same.
    """
    norms = [torch.linalg.vector_norm(p) for p in parameters if p.requires_grad]
    if not norms:
        raise ValueError("l2_norm_penalty got no trainable tensor")
    return weight * torch.stack(norms).sum()


def save_tensors(state: dict[str, torch.Tensor], path: PathLike) -> Path:
    """Write tensors to a safetensors file atomically (a temporary file renamed into place)."""
    path = Path(path)
    tensors = {key: value.detach().contiguous().cpu() for key, value in state.items()}
    return write_bytes_atomic(path, safetensors.torch.save(tensors))


def save_task(model: nn.Module, path: PathLike) -> Path:
    """Write the current task's state (``task_state_dict``) to a safetensors file, atomically."""
    return save_tensors(task_state_dict(model), path)


def load_task(model: nn.Module, path: PathLike) -> nn.Module:
    """Restore a task saved by ``save_task`` into the reprogrammed ``model`` (a head of another width is rebuilt)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"task file {str(path)!r} does not exist")
    return load_task_state(model, load_file(str(path)), source=f"task file {str(path)!r}")


def load_task_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "task state") -> nn.Module:
    """Load one task's state (``task_state_dict``'s keys) into the reprogrammed ``model``; the head is resized to
    the state's width if it differs."""
    expected = task_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit {type(model).__name__}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}"
        )
    resize_classifier(model, state)
    expected = task_state_dict(model)
    wrong = [k for k in expected if expected[k].shape != state[k].shape]
    if wrong:
        raise ValueError(
            f"{source} does not fit {type(model).__name__}: shapes differ for {wrong[:5]} "
            f"(file {tuple(state[wrong[0]].shape)}, model {tuple(expected[wrong[0]].shape)})"
        )
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    return model


def resize_classifier(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give ``model`` a new (trainable) classifier of the width of ``state``'s classifier weight, if it differs."""
    head = classifier_name(model)
    key = f"{head}.weight" if head else None
    if key is None or key not in state or not hasattr(model, "reset_classifier"):
        return
    if state[key].shape != model.get_parameter(key).shape:
        model.reset_classifier(int(state[key].shape[0]))
        model.get_classifier().requires_grad_(True)
