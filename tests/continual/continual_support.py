"""Helpers of the continual-learning tests: tiny real sequences and a short Lightning fit."""
from __future__ import annotations

from pathlib import Path

import torch

from chanzoo.continual.methods import ContinualMethod
from chanzoo.continual.sequence import SequenceTask, build_sequence
from chanzoo.continual.training import fit_task

TRAINER = {
    "_target_": "lightning.Trainer", "accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 3,
    "limit_val_batches": 1, "enable_progress_bar": False, "log_every_n_steps": 1,
}
OPTIM = {"name": "adam", "lr": 1e-2, "weight_decay": 0.0}
SCHED = {"name": "none"}


def digits_sequence(img_size: int = 16, tasks: int = 3) -> list[SequenceTask]:
    """The first ``tasks`` pairs of scikit-learn's digits (0-1, 2-3, ...) at ``img_size``."""
    data = {"_target_": "chanzoo.continual.digits.DigitsDataModule", "img_size": img_size, "batch_size": 32,
            "eval_batch_size": 256}
    return build_sequence({"data": data, "tasks": [{"classes": [2 * i, 2 * i + 1]} for i in range(tasks)]})


def short_fit(log_dir: Path, regularizer: float = 0.0):
    """A runner ``fit``: three Adam steps per task through ``chanzoo.continual.training.fit_task``."""

    def fit(method: ContinualMethod, task: SequenceTask, index: int) -> float:
        torch.manual_seed(index)
        return fit_task(method.model, task.datamodule, TRAINER, OPTIM, SCHED, log_dir / str(index),
                        frozen_modules=method.frozen_modules(), regularizer=regularizer)

    return fit
