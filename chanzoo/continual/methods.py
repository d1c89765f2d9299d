"""Ways of learning a task sequence on one anchor network, all with a head per task (task-incremental).

* ``clr``: CLR (Ge et al., ICCV 2023): the anchor stays frozen; each task trains fresh reprogramming convs, the
  BatchNorm layers and its head, and keeps exactly those.
* ``finetune``: one network fine-tuned on task after task; each task keeps only its head, so the shared backbone
  drifts away from earlier tasks (the forgetting baseline).
* ``linear_probe``: the anchor frozen (BatchNorm statistics included); each task trains and keeps a head.
* ``independent``: each task fine-tunes its own copy of the anchor and keeps all of it (the parameter-hungry bound).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from chanzoo.channel.clr import (
    CLRConv2d,
    classifier_name,
    load_task_state,
    reprogram,
    resize_classifier,
    task_state_dict,
)


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


class ContinualMethod:
    """A model shared across tasks plus what each task trains and keeps.

    ``start_task`` readies ``model`` for training a new task (its ``requires_grad`` flags say what trains,
    ``frozen_modules`` what stays in eval mode meanwhile); ``task_state`` is what the task keeps (the parameters
    it adds); ``use_task`` puts a kept state back for prediction.
    """

    name = ""

    def __init__(self, anchor: nn.Module) -> None:
        if not callable(getattr(anchor, "reset_classifier", None)) or classifier_name(anchor) is None:
            raise TypeError(
                f"continual methods need a timm-style classifier (reset_classifier), not {type(anchor).__name__}"
            )
        self.model = copy.deepcopy(anchor)
        self.backbone_params = sum(p.numel() for n, p in anchor.named_parameters() if not self._is_head(n, anchor))

    @staticmethod
    def _is_head(key: str, model: nn.Module) -> bool:
        return key.startswith(f"{classifier_name(model)}.")

    def start_task(self, num_classes: int) -> nn.Module:
        self.model.reset_classifier(num_classes)
        return self.model

    def frozen_modules(self) -> list[nn.Module]:
        return []

    def task_state(self) -> dict[str, torch.Tensor]:
        return _clone({k: v for k, v in self.model.state_dict().items() if self._is_head(k, self.model)})

    def use_task(self, state: dict[str, torch.Tensor]) -> nn.Module:
        resize_classifier(self.model, state)
        unexpected = sorted(set(state) - set(self.model.state_dict()))
        if unexpected:
            raise ValueError(f"task state does not fit the {self.name} model: unexpected keys {unexpected[:5]}")
        self.model.load_state_dict(state, strict=False)
        return self.model

    def added_parameters(self, state: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(parameters a task adds besides its head, head parameters); buffers such as BN statistics not counted."""
        params = dict(self.model.named_parameters())
        head = sum(v.numel() for k, v in state.items() if k in params and self._is_head(k, self.model))
        return sum(v.numel() for k, v in state.items() if k in params) - head, head


class CLRMethod(ContinualMethod):
    """CLR: frozen anchor, per-task reprogramming convs, BatchNorm and head; every task starts from the identity."""

    name = "clr"

    def __init__(self, anchor: nn.Module, variant: str = "reduced_v1", kernel_size: int = 3) -> None:
        super().__init__(anchor)
        reprogram(self.model, kernel_size=kernel_size, variant=variant)
        self.variant = variant
        self.initial_state = _clone(task_state_dict(self.model))  # identity kernels, the anchor's BatchNorm

    def start_task(self, num_classes: int) -> nn.Module:
        load_task_state(self.model, self.initial_state, source="CLR initial state")
        self.model.reset_classifier(num_classes)
        self.model.get_classifier().requires_grad_(True)
        return self.model

    def task_state(self) -> dict[str, torch.Tensor]:
        return _clone(task_state_dict(self.model))

    def use_task(self, state: dict[str, torch.Tensor]) -> nn.Module:
        return load_task_state(self.model, state)

    def reprogrammed_convs(self) -> int:
        return sum(isinstance(m, CLRConv2d) for m in self.model.modules())


class FinetuneMethod(ContinualMethod):
    """Sequential fine-tuning of one shared network; each task keeps its head."""

    name = "finetune"

    def start_task(self, num_classes: int) -> nn.Module:
        super().start_task(num_classes)
        return self.model.requires_grad_(True)


class LinearProbeMethod(ContinualMethod):
    """A frozen anchor (weights and BatchNorm statistics); each task trains its head."""

    name = "linear_probe"

    def start_task(self, num_classes: int) -> nn.Module:
        self.model.requires_grad_(False)
        super().start_task(num_classes)
        self.model.get_classifier().requires_grad_(True)
        return self.model

    def frozen_modules(self) -> list[nn.Module]:
        return [self.model]


class IndependentMethod(ContinualMethod):
    """One model per task: each task fine-tunes a fresh copy of the anchor and keeps all of it."""

    name = "independent"

    def __init__(self, anchor: nn.Module) -> None:
        super().__init__(anchor)
        self.anchor_state = _clone(self.model.state_dict())

    def start_task(self, num_classes: int) -> nn.Module:
        resize_classifier(self.model, self.anchor_state)
        self.model.load_state_dict(self.anchor_state)
        super().start_task(num_classes)
        return self.model.requires_grad_(True)

    def task_state(self) -> dict[str, torch.Tensor]:
        return _clone(self.model.state_dict())


METHODS: dict[str, type[ContinualMethod]] = {
    m.name: m for m in (CLRMethod, FinetuneMethod, LinearProbeMethod, IndependentMethod)
}


def create_method(
    name: str, anchor: nn.Module, clr_variant: str = "reduced_v1", clr_kernel_size: int = 3
) -> ContinualMethod:
    """The method ``name`` (one of ``METHODS``) on a copy of ``anchor``."""
    if name not in METHODS:
        raise ValueError(f"continual method must be one of {sorted(METHODS)}, got {name!r}")
    if name == CLRMethod.name:
        return CLRMethod(anchor, variant=clr_variant, kernel_size=clr_kernel_size)
    return METHODS[name](anchor)

