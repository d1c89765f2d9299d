"""What a run shows and where it logs: the ``logger`` config group, progress without a terminal, a one-line model
summary, and none of Lightning's advice that applies to no chanzoo run.

* ``instantiate_loggers``: the loggers of the ``logger`` group, their ``save_dir`` taken relative to the run folder,
  the CSV logger (``metrics.csv``, read by ``curves.png`` and ``chanzoo.report``) first.
* ``RunFolderCSVLogger``: Lightning's CSVLogger writing ``metrics.csv`` straight into the run folder.
* ``IntervalProgress``: when stdout is not a terminal (SLURM, ``nohup``, a pipe), one log line every ``interval``
  seconds (epoch, step/total, metrics, it/s, ETA) and one per finished epoch, instead of a bar redrawn in place.
* ``OneLineSummary``: the parameter counts as one log line instead of Lightning's table.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

_logger = logging.getLogger(__name__)

CSV_LOGGER = "csv"
DEFAULT_INTERVAL_S = 30.0
# Lightning prints these on every Trainer (LitLogger / litmodels adverts); no Trainer argument turns them off
LIGHTNING_TIP_PREFIX = "💡 Tip:"
LIGHTNING_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _RunFolderWriter(ExperimentWriter):
    """Lightning's CSV writer, minus the warning that the log folder is not empty: chanzoo's log folder is the run
    folder, which Hydra has already filled (``.hydra/``, the job log). Only an existing ``metrics.csv``, which the
    writer replaces, is worth a warning."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            rank_zero_warn(f"{self.metrics_file_path} exists and will be replaced by this run's metrics")
            self._fs.rm_file(self.metrics_file_path)


class RunFolderCSVLogger(CSVLogger):
    """``CSVLogger`` for ``save_dir`` = the run folder itself (``name=''``, ``version=''``): ``metrics.csv`` and
    ``hparams.yaml`` land beside the run's config and checkpoints."""

    def __init__(self, save_dir: str, name: str = "", version: str = "", **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, name=name, version=version, **kwargs)

    @property
    def experiment(self) -> ExperimentWriter:
        """The writer (created on first use)."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _RunFolderWriter(log_dir=self.log_dir)
        return self._experiment


def mlflow_logger(save_dir: str, tracking_uri: Optional[str] = None, **kwargs: Any) -> Logger:
    """Lightning's ``MLFlowLogger``; without ``tracking_uri``, a local file store in ``save_dir`` (a ``file:`` URI).

    MLflow 3 refuses to open a file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set (it recommends a database
    backend); selecting this logger without a ``tracking_uri`` is that choice, so the variable is set unless the
    environment already sets it. Give ``tracking_uri`` (``sqlite:///...``, ``http://...``) for any other backend.
    """
    from lightning.pytorch.loggers import MLFlowLogger

    if not tracking_uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        tracking_uri = f"file:{Path(save_dir).resolve()}"
    return MLFlowLogger(tracking_uri=tracking_uri, save_dir=save_dir, **kwargs)


def instantiate_loggers(logger_cfg: Optional[Any], run_dir: Path) -> list[Logger]:
    """The loggers of a composed ``logger`` group (a mapping name -> Lightning logger config, or None for none).

    Each ``save_dir`` is relative to ``run_dir`` (an absolute path stays as given); the ``csv`` logger comes first,
    so that ``trainer.logger`` is the one whose ``metrics.csv`` the curves plot reads.
    """
    from hydra.utils import instantiate

    if not logger_cfg:
        return []
    loggers = []
    for name, cfg in sorted(logger_cfg.items(), key=lambda item: item[0] != CSV_LOGGER):
        if cfg is None:
            continue
        if "_target_" not in cfg:
            raise ValueError(f"logger.{name} has no _target_ (a Lightning logger class), got keys {sorted(cfg)}")
        save_dir = run_dir / str(cfg.get("save_dir") or ".")
        loggers.append(instantiate(cfg, save_dir=str(save_dir)))
    return loggers


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _format_metrics(metrics: dict[str, Any], drop_suffix: str) -> str:
    parts = []
    for key, value in sorted(metrics.items()):
        if key == "v_num" or key.endswith(drop_suffix):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return "  ".join(parts)


def _count(total: float) -> str:
    return str(int(total)) if math.isfinite(total) else "?"


class IntervalProgress(ProgressBar):
    """Progress as log lines for runs without a terminal: every ``interval`` seconds (and after the first batch)
    ``epoch e/E  step s/S (p%)  <train metrics>  x it/s  elapsed  eta epoch / fit``, and a line per finished epoch
    with its validation metrics; validation and test print their batch counts at the same interval."""

    def __init__(self, interval: float = DEFAULT_INTERVAL_S) -> None:
        super().__init__()
        if interval < 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval}")
        self.interval = float(interval)
        self._enabled = True
        self._last_line = 0.0
        self._epoch_start = 0.0
        self._fit_start = 0.0
        self._eval_start = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _due(self, first: bool = False) -> bool:
        now = time.monotonic()
        if not self._enabled or not (first or now - self._last_line >= self.interval):
            return False
        self._last_line = now
        return True

    def _epochs(self, trainer: L.Trainer) -> str:
        total = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        return f"{trainer.current_epoch + 1}/{total if total else '?'}"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.monotonic()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._due(first=trainer.global_step <= 1 and batch_idx == 0):
            return
        done, total = batch_idx + 1, self.total_train_batches
        elapsed = time.monotonic() - self._epoch_start
        rate = done / elapsed if elapsed > 0 else float("inf")
        epoch_left = (total - done) / rate if rate > 0 else float("inf")
        epochs_after = (trainer.max_epochs - trainer.current_epoch - 1) if (trainer.max_epochs or 0) > 0 else math.inf
        fit_left = epoch_left + epochs_after * total / rate if rate > 0 else float("inf")
        percent = f" ({100 * done / total:.0f}%)" if math.isfinite(total) and total else ""
        metrics = _format_metrics({k: v for k, v in self.get_metrics(trainer, pl_module).items()
                                   if not k.startswith(("val", "test"))}, "_epoch")
        _logger.info(
            "epoch %s  step %d/%s%s  %s  %.2f it/s  elapsed %s  eta epoch %s, fit %s", self._epochs(trainer), done,
            _count(total), percent, metrics, rate, _duration(time.monotonic() - self._fit_start),
            _duration(epoch_left), _duration(fit_left),
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled:
            return
        metrics = _format_metrics(self.get_metrics(trainer, pl_module), "_step")
        _logger.info("epoch %s done in %s  %s", self._epochs(trainer), _duration(time.monotonic() - self._epoch_start),
                     metrics)
        self._last_line = time.monotonic()

    def _eval_batch(self, stage: str, done: int, total: float) -> None:
        if self._due():
            elapsed = time.monotonic() - self._eval_start
            _logger.info("%s %d/%s  %.2f it/s", stage, done, _count(total), done / elapsed if elapsed > 0 else 0.0)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start = time.monotonic()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start = time.monotonic()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self.has_dataloader_changed(dataloader_idx)  # points the total at this dataloader
        if not trainer.sanity_checking:
            self._eval_batch("validation", batch_idx + 1, self.total_val_batches_current_dataloader)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self.has_dataloader_changed(dataloader_idx)
        self._eval_batch("test", batch_idx + 1, self.total_test_batches_current_dataloader)


class OneLineSummary(ModelSummary):
    """Lightning's model summary as one log line: parameter counts and size, and the top-level modules that hold
    parameters. (Lightning's table has a FLOPs column that reads 0 unless the module sets an example input.)"""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        columns = dict(summary_data)
        parts = [f"{name} ({kind}, {params.strip()})" for name, kind, params in
                 zip(columns["Name"], columns["Type"], columns["Params"]) if params.strip() != "0"]
        _logger.info("%s parameters (%s trainable, %.1f MB): %s", get_human_readable_count(total_parameters),
                     get_human_readable_count(trainable_parameters), model_size, ", ".join(parts))


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_TIP_PREFIX)


def drop_lightning_tips() -> None:
    """Filter Lightning's product tips out of its rank-zero log, and its own use of a torch API that torch has
    deprecated (a warning no chanzoo user can act on); idempotent."""
    rank_zero = logging.getLogger(LIGHTNING_RANK_ZERO_LOGGER)
    if not any(isinstance(f, _DropLightningTips) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLightningTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def display_callbacks(trainer_cfg: Any, callbacks: list[L.Callback],
                      interval: float = DEFAULT_INTERVAL_S) -> list[L.Callback]:
    """What to add to ``callbacks`` for a run's display: TQDM's bar on a terminal, ``IntervalProgress`` otherwise
    (when the ``trainer`` config enables the progress bar), and ``OneLineSummary`` (when it enables the model
    summary); nothing where ``callbacks`` already has a progress bar or a model summary."""
    added: list[L.Callback] = []
    if trainer_cfg.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        added.append(TQDMProgressBar() if sys.stdout.isatty() else IntervalProgress(interval))
    if trainer_cfg.get("enable_model_summary", True) and not any(isinstance(c, ModelSummary) for c in callbacks):
        added.append(OneLineSummary())
    return added
