"""Lightning plug-ins of chanzoo's runs: atomic checkpoints, per-epoch seeding, learning-curve plot."""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from chanzoo.io import atomic_open, torch_save_atomic

_logger = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the target folder, fsyncs it, then renames it into place.

    A kill at any moment leaves either the previous checkpoint or the new one, never a torn file. (Lightning's own
    save stages the bytes in the system temp folder, which is often another filesystem, so its final move can be a
    non-atomic copy.)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch_save_atomic(checkpoint, path)


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
    """Draws the loss and accuracy curves of the run's ``metrics.csv`` into ``curves.png`` after every epoch."""

    def __init__(self, filename: str = "curves.png") -> None:
        self.filename = filename

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.logger is None or trainer.logger.log_dir is None:
            return
        trainer.logger.save()
        metrics_csv = Path(trainer.logger.log_dir) / "metrics.csv"
        if metrics_csv.is_file():
            plot_metrics_csv(metrics_csv, Path(trainer.default_root_dir) / self.filename)


def _read_epoch_series(metrics_csv: Path) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            for key, value in row.items():
                if key in ("epoch", "step") or not value or key.endswith("_step"):
                    continue
                series.setdefault(key.removesuffix("_epoch"), []).append((float(row["epoch"]), float(value)))
    return series


def plot_metrics_csv(metrics_csv: Path, out_png: Path) -> Path:
    """Plot every epoch-level loss (left) and accuracy-like metric (right) from a Lightning ``metrics.csv``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _read_epoch_series(metrics_csv)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in sorted(series.items()):
        ax = ax_loss if "loss" in name else ax_acc if ("acc" in name or "psnr" in name or "ssim" in name) else None
        if ax is None:
            continue
        epochs, values = zip(*points)
        ax.plot([e + 1 for e in epochs], values, marker="o", label=name)
    for ax, title in ((ax_loss, "loss"), (ax_acc, "metric")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return out_png
