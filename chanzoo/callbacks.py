"""Lightning plug-ins of chanzoo's runs: atomic checkpoints that are never non-finite, a ``last.ckpt`` that is always
the newest state, a check that training will take steps, per-epoch seeding, learning-curve plot."""
from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, DistributedSampler

from chanzoo.io import TEMP_GLOB, atomic_open, torch_save_atomic
from chanzoo.tasks.guard import NonFiniteError

_logger = logging.getLogger(__name__)


def nonfinite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` that hold NaN or inf."""
    return [
        name for name, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the target folder, fsyncs it, then renames it into place.

    A kill at any moment leaves either the previous checkpoint or the new one, never a torn file; the temporary file
    a kill leaves behind is removed by ``clean_stale_temp_files`` when the next run starts. (Lightning's own save
    stages the bytes in the system temp folder, which is often another filesystem, so its final move can be a
    non-atomic copy.) Files get the permissions of the user's umask, as any file the user writes, and a checkpoint
    whose weights hold NaN or inf is refused (``NonFiniteError``): a diverged model never replaces a good one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        path = Path(path)
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteError(
                f"refusing to write checkpoint {path}: {len(bad)} weight tensor(s) hold NaN or inf "
                f"(first: {bad[0]!r}); the checkpoints already written are kept"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        torch_save_atomic(checkpoint, path)


def clean_stale_temp_files(folder: Path) -> list[Path]:
    """Remove the temporary files (``.*.tmp``) that a killed atomic write left in ``folder``; returns them."""
    removed = []
    if folder.is_dir():
        for tmp in folder.glob(TEMP_GLOB):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    if removed:
        _logger.info("removed %d temporary file(s) left by an interrupted write in %s", len(removed), folder)
    return removed


class FiniteModelCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with two guarantees more.

    - A non-finite monitored value (NaN, inf) never enters the top-k: it cannot replace or delete a good checkpoint.
    - ``last.ckpt`` (``save_last=true``) is rewritten at every save point (each validation, each
      ``every_n_train_steps``), not only when a top-k checkpoint was saved, so it always holds the newest state.
    """

    _last_only_step: Optional[int] = None  # global step of a save that wrote last.ckpt alone

    def check_monitor_top_k(self, trainer: L.Trainer, current: Optional[torch.Tensor] = None) -> bool:
        if current is not None and not bool(torch.isfinite(current).all()):
            _logger.warning("%s=%s is not finite: not ranked among the best checkpoints", self.monitor, current)
            return False
        return super().check_monitor_top_k(trainer, current)

    def _write_last(self, trainer: L.Trainer) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        if not self.save_last or trainer.fast_dev_run or trainer.sanity_checking:
            return
        if trainer.state.fn != TrainerFn.FITTING or self._last_global_step_saved == trainer.global_step:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_only_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        every = self._every_n_train_steps
        if every >= 1 and trainer.global_step % every == 0:
            self._write_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._write_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_only_step is not None and self._last_only_step == trainer.global_step:
            # this step wrote only last.ckpt: let validation rank it (and rewrite last.ckpt with the new best)
            self._last_global_step_saved = -1
        self._last_only_step = None
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._write_last(trainer)


def _dataset_size(loader: DataLoader) -> Optional[int]:
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


def _batch_size_and_drop_last(loader: DataLoader) -> tuple[Optional[int], bool]:
    if loader.batch_size is not None:
        return loader.batch_size, loader.drop_last
    return getattr(loader.batch_sampler, "batch_size", None), bool(getattr(loader.batch_sampler, "drop_last", False))


def batches_per_device(loader: DataLoader, world_size: int, shard: bool = True) -> Optional[int]:
    """Training batches ``loader`` yields on each of ``world_size`` devices (``None`` when its data has no length).

    A ``DistributedSampler`` already counts one device's share; any other sampler is sharded by Lightning when
    ``shard`` (``Trainer(use_distributed_sampler=True)``, the default) and ``world_size > 1``.
    """
    size = _dataset_size(loader)
    batch_size, drop_last = _batch_size_and_drop_last(loader)
    if size is None or batch_size is None:
        return None
    if isinstance(loader.sampler, DistributedSampler):
        per_device = len(loader.sampler)
    else:
        per_device = math.ceil(size / world_size) if shard and world_size > 1 else size
    return per_device // batch_size if drop_last else math.ceil(per_device / batch_size)


def zero_batches_message(loader: DataLoader, world_size: int) -> str:
    """Why ``loader`` yields no training batch on each of ``world_size`` devices: batch size, data size, devices."""
    batch_size, drop_last = _batch_size_and_drop_last(loader)
    size = _dataset_size(loader)
    need = f"at least {batch_size * world_size} training samples" if batch_size else "more training samples"
    return (
        f"no training batches: batch size {batch_size} (data.batch_size, per device), {size} training samples "
        f"(after data.subset and the validation split), {world_size} device(s) (trainer.devices x "
        f"trainer.num_nodes){', incomplete batches dropped' if drop_last else ''}. Training needs {need}: lower "
        "data.batch_size or the number of devices, or use more data"
    )


class RequireTrainingBatches(L.Callback):
    """Stops a run whose training loader yields no batch (batch larger than the data, more devices than batches)
    before any work, with a ``ValueError`` naming batch size, data size and devices; Lightning would print
    "No training batches", skip training and go on to test an untrained model.

    Works with any datamodule whose training loader has a sized dataset (iterable data is not checked).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.limit_train_batches == 0 or trainer.datamodule is None:
            return
        loader = trainer.datamodule.train_dataloader()
        if not isinstance(loader, DataLoader):
            return
        shard = bool(getattr(trainer._accelerator_connector, "use_distributed_sampler", True))
        if batches_per_device(loader, trainer.world_size, shard) == 0:
            raise ValueError(zero_batches_message(loader, trainer.world_size))


def compiled_modules(module: torch.nn.Module) -> int:
    """How many submodules of ``module`` were compiled in place (``nn.Module.compile``)."""
    return sum(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


class CompileTimer(L.Callback):
    """Logs that ``torch.compile`` is compiling (on the first batch of each stage, which can take minutes) and how
    long that batch took."""

    def __init__(self) -> None:
        self._started: dict[str, float] = {}
        self._done: set[str] = set()

    def _start(self, stage: str, pl_module: L.LightningModule) -> None:
        if stage in self._done or stage in self._started:
            return
        count = compiled_modules(pl_module)
        if not count:
            self._done.add(stage)
            return
        _logger.info("torch.compile: compiling %d module(s) for the first %s batch; this can take minutes",
                     count, stage)
        self._started[stage] = time.perf_counter()

    def _end(self, stage: str) -> None:
        if stage in self._started:
            _logger.info("torch.compile: first %s batch done after %.1f s (compilation included)", stage,
                         time.perf_counter() - self._started.pop(stage))
            self._done.add(stage)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._start("training", pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._end("training")

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._start("validation", pl_module)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._end("validation")

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._start("test", pl_module)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._end("test")


class EpochSeed(L.Callback):
    """Re-seeds every RNG at each training epoch from (seed, epoch, rank).

    Augmentation, dropout and mixup draws then depend only on the epoch, so a run resumed from an epoch-end
    checkpoint continues exactly as the uninterrupted run would have.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        L.seed_everything(self.seed + 1000 * trainer.current_epoch + trainer.global_rank, workers=True, verbose=False)


class PlotCurves(L.Callback):
    """Draws the loss and accuracy curves of the run's ``metrics.csv`` into ``curves.png``.

    An epoch's training metrics reach the CSV only after every epoch-end hook has run, so each epoch is drawn when
    the next one starts, and the last one when training ends (or stops on an error).
    """

    def __init__(self, filename: str = "curves.png") -> None:
        self.filename = filename

    @rank_zero_only
    def draw(self, trainer: L.Trainer) -> None:
        """Flush the CSV logger and plot its ``metrics.csv``."""
        if trainer.logger is None or trainer.logger.log_dir is None:
            return
        trainer.logger.save()
        metrics_csv = Path(trainer.logger.log_dir) / "metrics.csv"
        if metrics_csv.is_file():
            plot_metrics_csv(metrics_csv, Path(trainer.default_root_dir) / self.filename)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self.draw(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.draw(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.draw(trainer)


# the headline metric of each task, drawn in the right panel (a detector logs a dozen mAP variants)
_PLOTTED_METRICS = ("acc1", "acc5", "psnr", "ssim", "map", "map_50", "mask_map", "miou", "pixel_acc")


def _read_step_series(metrics_csv: Path) -> dict[str, list[tuple[float, float]]]:
    """Every logged value of ``metrics_csv`` as ``{name: [(step, value), ...]}``; epoch aggregates keep their name
    without ``_epoch``."""
    series: dict[str, list[tuple[float, float]]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            for key, value in row.items():
                if key in ("epoch", "step") or not value:
                    continue
                series.setdefault(key.removesuffix("_epoch"), []).append((float(row["step"]), float(value)))
    return series


def plot_metrics_csv(metrics_csv: Path, out_png: Path) -> Path:
    """Plot the losses (left: each training step and each epoch's mean) and the headline metrics (right: accuracy,
    PSNR/SSIM, mAP, mIoU) of a Lightning ``metrics.csv`` against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _read_step_series(metrics_csv)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in sorted(series.items()):
        if "/" not in name or name.startswith("test/"):
            continue
        metric = name.split("/", 1)[1]
        steps, values = zip(*points)
        if name.endswith("loss_step"):
            ax_loss.plot(steps, values, lw=0.8, alpha=0.5, label=name)
        elif "loss" in metric:
            ax_loss.plot(steps, values, marker="o", label=name)
        elif metric in _PLOTTED_METRICS:
            ax_acc.plot(steps, values, marker="o", label=name)
    for ax, title in ((ax_loss, "loss"), (ax_acc, "metric")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return out_png
