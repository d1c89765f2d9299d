"""Image classification as a LightningModule: label-smoothed cross-entropy, top-1/top-5, EMA, mixup/cutmix."""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import lightning as L
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from chanzoo.tasks.guard import NonFiniteGuardMixin, check_on_nonfinite
from chanzoo.tasks.optim import TimmOptimMixin

_logger = logging.getLogger(__name__)


class ClassificationTask(NonFiniteGuardMixin, TimmOptimMixin, L.LightningModule):
    """Train and evaluate any image classifier built by ``chanzoo.create_model``.

    Args:
        model: the network (its ``num_classes`` sets the metrics).
        optim, sched: the ``optim`` and ``sched`` config groups (see ``chanzoo.tasks.optim``).
        label_smoothing: cross-entropy smoothing (ignored under mixup, whose targets are already soft).
        mixup: None, or timm ``Mixup`` kwargs (mixup_alpha, cutmix_alpha, prob, switch_prob, mode).
        ema_decay: None, or the decay of timm's ``ModelEmaV3``; the EMA model is validated too (``val_ema/*``).
        on_nonfinite: 'stop' (raise at the first non-finite loss or gradient) or 'skip' (drop that step);
            see ``chanzoo.tasks.guard``.
    """

    def __init__(
        self,
        model: nn.Module,
        optim: Mapping[str, Any],
        sched: Mapping[str, Any],
        label_smoothing: float = 0.0,
        mixup: Optional[Mapping[str, Any]] = None,
        ema_decay: Optional[float] = None,
        on_nonfinite: str = "stop",
    ) -> None:
        super().__init__()
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.optim_cfg, self.sched_cfg = dict(optim), dict(sched)
        num_classes = getattr(model, "num_classes", 0)
        if not num_classes:
            raise ValueError("classification needs a model with a classifier head (num_classes > 0)")
        self.num_classes = num_classes
        self.mixup = Mixup(label_smoothing=label_smoothing, num_classes=num_classes, **mixup) if mixup else None
        self.train_loss = SoftTargetCrossEntropy() if self.mixup else nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.eval_loss = nn.CrossEntropyLoss()
        self.model_ema = ModelEmaV3(model, decay=ema_decay) if ema_decay else None
        top_k = (1, 5) if num_classes >= 5 else (1,)
        for stage in ("val", "test", "val_ema"):
            self.add_module(
                f"{stage}_metrics",
                nn.ModuleDict({f"acc{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro") for k in top_k}),
            )

    def monitorable_metrics(self) -> list[str]:
        """The validation metrics this task logs (what a checkpoint callback may monitor)."""
        return [f"{stage}/{name}" for stage in ("val", "val_ema") if stage == "val" or self.model_ema is not None
                for name in ("loss", *getattr(self, f"{stage}_metrics"))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        loss = self.train_loss(self.model(images), targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(images))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.model_ema is not None:
            self.model_ema.update(self.model, step=self.global_step)

    def _evaluate(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        images, targets = batch
        logits = model(images)
        self.log(f"{stage}/loss", self.eval_loss(logits, targets), sync_dist=True, batch_size=len(images))
        metrics = getattr(self, f"{stage}_metrics")
        for name, metric in metrics.items():
            metric(logits, targets)
            self.log(f"{stage}/{name}", metric, prog_bar=name == "acc1", batch_size=len(images))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(self.model, batch, "val")
        if self.model_ema is not None:
            self._evaluate(self.model_ema.module, batch, "val_ema")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(self.model, batch, "test")

    def configure_optimizers(self) -> Any:
        return self._configure_timm_optim(self.model, self.optim_cfg, self.sched_cfg)
