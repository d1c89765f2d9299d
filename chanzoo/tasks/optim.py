"""Optimizer and learning-rate schedule from config, through timm's factories."""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn

_logger = logging.getLogger(__name__)

_OPTIM_KEYS = {"name", "lr", "lr_base_batch", "weight_decay", "momentum", "betas", "eps", "layer_decay", "nesterov"}
_SCHED_KEYS = {
    "name", "warmup_epochs", "warmup_lr", "min_lr", "decay_milestones", "decay_rate", "cooldown_epochs", "warmup_prefix",
}


def _check_keys(cfg: Mapping[str, Any], allowed: set[str], group: str) -> None:
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"unknown {group} option(s) {unknown}; allowed: {sorted(allowed)}")


def scaled_lr(optim_cfg: Mapping[str, Any], global_batch: int) -> float:
    """``lr`` as given, or ``lr * global_batch / lr_base_batch`` when the recipe states lr per ``lr_base_batch``."""
    lr = float(optim_cfg["lr"])
    base = optim_cfg.get("lr_base_batch")
    return lr * global_batch / float(base) if base else lr


def build_optimizer(model: nn.Module, optim_cfg: Mapping[str, Any], global_batch: int) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` (no weight decay on norms and biases) from an ``optim`` config group."""
    _check_keys(optim_cfg, _OPTIM_KEYS, "optim")
    extra = {k: optim_cfg[k] for k in ("betas", "eps", "nesterov") if optim_cfg.get(k) is not None}
    if "betas" in extra:
        extra["betas"] = tuple(extra["betas"])
    lr = scaled_lr(optim_cfg, global_batch)
    _logger.info("optimizer %s, lr %.3g (global batch %d)", optim_cfg["name"], lr, global_batch)
    return create_optimizer_v2(
        model,
        opt=optim_cfg["name"],
        lr=lr,
        weight_decay=float(optim_cfg.get("weight_decay", 0.0)),
        momentum=float(optim_cfg.get("momentum", 0.9)),
        layer_decay=optim_cfg.get("layer_decay"),
        **extra,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, sched_cfg: Mapping[str, Any], num_epochs: int, updates_per_epoch: int
) -> Optional[Scheduler]:
    """timm's per-update scheduler (cosine with linear warm-up by default) from a ``sched`` config group."""
    _check_keys(sched_cfg, _SCHED_KEYS, "sched")
    if sched_cfg["name"] in (None, "none"):
        return None
    extra = {k: sched_cfg[k] for k in ("decay_milestones", "decay_rate", "cooldown_epochs") if k in sched_cfg}
    if "decay_milestones" in extra:
        extra["decay_milestones"] = list(extra["decay_milestones"])
    # warmup_prefix: the decay starts after the warm-up and fills the remaining epochs (with warmup_lr = lr the
    # warm-up is a constant phase, e.g. Histoformer's fixed lr before its cosine cycle)
    warmup_prefix = bool(sched_cfg.get("warmup_prefix", False))
    warmup_epochs = sched_cfg.get("warmup_epochs", 0)
    if warmup_prefix and warmup_epochs >= num_epochs:
        raise ValueError(f"warmup_epochs={warmup_epochs} with warmup_prefix must be < the {num_epochs} training epochs")
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=sched_cfg["name"],
        num_epochs=num_epochs - warmup_epochs if warmup_prefix else num_epochs,
        warmup_epochs=warmup_epochs,
        warmup_prefix=warmup_prefix,
        warmup_lr=float(sched_cfg.get("warmup_lr", 1e-6)),
        min_lr=float(sched_cfg.get("min_lr", 0.0)),
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
        **extra,
    )
    return scheduler


class TimmOptimMixin:
    """LightningModule mixin: optimizer + timm scheduler stepped on every optimizer update."""

    def _configure_timm_optim(self, model: nn.Module, optim_cfg: Mapping, sched_cfg: Mapping) -> Any:
        trainer = self.trainer  # type: ignore[attr-defined]
        datamodule = trainer.datamodule
        batch = getattr(datamodule, "batch_size", 1) if datamodule is not None else 1
        global_batch = batch * trainer.world_size * trainer.accumulate_grad_batches
        optimizer = build_optimizer(model, optim_cfg, global_batch)
        max_epochs = max(1, trainer.max_epochs or 1)
        updates_per_epoch = max(1, trainer.estimated_stepping_batches // max_epochs)
        scheduler = build_scheduler(optimizer, sched_cfg, max_epochs, updates_per_epoch)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Scheduler, metric: Any) -> None:
        scheduler.step_update(num_updates=self.global_step)  # type: ignore[attr-defined]
