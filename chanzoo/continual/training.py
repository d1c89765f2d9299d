"""Training one task of a sequence with Lightning: the classification task plus what continual methods need."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from chanzoo.acceleration import resolve_precision
from chanzoo.channel.clr import l2_norm_penalty
from chanzoo.tasks.classification import ClassificationTask

_logger = logging.getLogger(__name__)


class TaskLearner(ClassificationTask):
    """``ClassificationTask`` whose ``frozen_modules`` stay in eval mode while it trains (a linear probe's backbone
    keeps its BatchNorm statistics) and whose loss adds the official CLR regulariser when ``regularizer`` > 0
    (``regularizer`` x the sum of the L2 norms of the trainable tensors)."""

    frozen_modules: Sequence[nn.Module] = ()
    regularizer: float = 0.0

    def train(self, mode: bool = True) -> TaskLearner:
        super().train(mode)
        for module in self.frozen_modules:
            module.eval()
        return self

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.regularizer:
            penalty = l2_norm_penalty(self.model.parameters(), self.regularizer)
            self.log("train/regularizer", penalty, on_step=False, on_epoch=True, batch_size=len(batch[0]))
            loss = loss + penalty
        return loss


def fit_task(
    model: nn.Module,
    datamodule: L.LightningDataModule,
    trainer_cfg: Mapping[str, Any],
    optim: Mapping[str, Any],
    sched: Mapping[str, Any],
    log_dir: Path,
    frozen_modules: Sequence[nn.Module] = (),
    regularizer: float = 0.0,
    label_smoothing: float = 0.0,
    max_epochs: int | None = None,
) -> float:
    """Train ``model`` (its trainable parameters) on ``datamodule``; returns the wall seconds of the fit.

    ``trainer_cfg`` is the ``trainer`` config group; checkpointing, sanity validation and the model summary are off
    (a task's result is its kept state, taken by the caller), and metrics go to ``log_dir/metrics.csv``.
    """
    learner = TaskLearner(model, optim=optim, sched=sched, label_smoothing=label_smoothing)
    learner.frozen_modules = tuple(frozen_modules)
    learner.regularizer = float(regularizer)
    overrides: dict[str, Any] = dict(
        callbacks=[], logger=CSVLogger(save_dir=str(log_dir), name="", version=""), enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(log_dir),
    )
    if max_epochs is not None:
        overrides["max_epochs"] = int(max_epochs)
    overrides["precision"] = resolve_precision(trainer_cfg.get("precision", "32-true"),
                                               trainer_cfg.get("accelerator", "auto"), learner)
    trainer = instantiate(dict(trainer_cfg), **overrides)
    learner.train()  # Lightning keeps each module's mode; a model last used for predictions is in eval mode
    start = time.perf_counter()
    trainer.fit(learner, datamodule=datamodule)
    seconds = time.perf_counter() - start
    datamodule.trainer = None  # later predictions read the data as in evaluation (no augmentation)
    model.cpu()
    return seconds


@torch.no_grad()
def predict(
    model: nn.Module, datamodule: L.LightningDataModule, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of ``datamodule``'s test set, in loader order, through the datamodule's batch hooks."""
    datamodule.trainer = None
    model.eval().to(device)
    logits, labels = [], []
    for batch in datamodule.test_dataloader():
        batch = datamodule.transfer_batch_to_device(batch, device, 0)
        images, targets = datamodule.on_after_batch_transfer(batch, 0)
        logits.append(model(images).float().cpu())
        labels.append(targets.cpu())
    model.cpu()
    return torch.cat(logits), torch.cat(labels)
