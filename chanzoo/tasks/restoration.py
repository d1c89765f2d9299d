"""Image restoration (super-resolution, deraining, desnowing, ...) as a LightningModule.

Loss: L1 between output and ground truth, plus ``aux_loss_weight`` times an optional auxiliary loss module (e.g.
Histoformer's Pearson-correlation loss from ``chanzoo.tasks.losses``), both as in the BasicSR recipes.

Metrics follow the SR papers' convention (BasicSR's ``calculate_psnr``/``calculate_ssim`` with
``test_y_channel=True``): the output is clamped to [0, 1] and rounded to 8 bits, ``crop_border`` pixels (the scale
factor for SR) are cut from every side, and PSNR and SSIM (11x11 Gaussian window, sigma 1.5) are computed per image
on the BT.601 luma channel ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255`` (``rgb_to_y``) and on RGB, then
averaged over images. torchmetrics computes them (``ValidSSIM`` keeps only the positions where the window fits, as
the papers' SSIM does).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio

from chanzoo.data.restoration import model_scale
from chanzoo.ops.tiling import tiled_forward
from chanzoo.tasks.guard import NonFiniteGuardMixin, check_on_nonfinite
from chanzoo.tasks.optim import TimmOptimMixin

_logger = logging.getLogger(__name__)

__all__ = ["RestorationTask", "ValidSSIM", "rgb_to_y", "quantize", "restoration_metrics"]

_BT601 = (65.481, 128.553, 24.966)


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of RGB ``x`` (N, 3, H, W) in [0, 1], in [16/255, 235/255]: (16 + 65.481R + 128.553G + 24.966B)/255."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"rgb_to_y expects (N, 3, H, W) RGB input, got shape {tuple(x.shape)}")
    weights = x.new_tensor(_BT601).view(1, 3, 1, 1)
    return ((x * weights).sum(dim=1, keepdim=True) + 16.0) / 255.0


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8-bit levels, as an image saved to disk would be."""
    return x.clamp(0.0, 1.0).mul(255.0).round().div(255.0)


class ValidSSIM(Metric):
    """Per-image mean SSIM (Gaussian window 11, sigma 1.5) over the positions where the window fits the image.

    This is the SR papers' SSIM (Wang et al. 2004 as in BasicSR's ``calculate_ssim`` and scikit-image's
    ``structural_similarity``): torchmetrics' SSIM map is computed on a reflection-padded image, so its border
    ``kernel_size // 2`` pixels are cut here before averaging.
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, data_range: float = 1.0, kernel_size: int = 11, sigma: float = 1.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_range, self.kernel_size, self.sigma = data_range, kernel_size, sigma
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        pad = self.kernel_size // 2
        if min(preds.shape[-2:]) <= 2 * pad:
            raise ValueError(f"SSIM needs images larger than {2 * pad}x{2 * pad}, got {tuple(preds.shape[-2:])}")
        _, full = structural_similarity_index_measure(
            preds, target, gaussian_kernel=True, sigma=self.sigma, kernel_size=self.kernel_size,
            data_range=self.data_range, reduction="none", return_full_image=True,
        )
        per_image = full[..., pad:-pad, pad:-pad].flatten(1).mean(1)
        self.total = self.total + per_image.double().sum()
        self.count = self.count + per_image.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()


def restoration_metrics() -> MetricCollection:
    """Per-image-averaged PSNR and SSIM (data range 1) on Y and on RGB."""

    def psnr() -> PeakSignalNoiseRatio:
        return PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")

    def ssim() -> ValidSSIM:
        return ValidSSIM(data_range=1.0)

    return MetricCollection({"psnr_y": psnr(), "ssim_y": ssim(), "psnr": psnr(), "ssim": ssim()}, compute_groups=False)


def _crop_border(x: torch.Tensor, border: int) -> torch.Tensor:
    return x[..., border : x.shape[-2] - border, border : x.shape[-1] - border] if border > 0 else x


class RestorationTask(NonFiniteGuardMixin, TimmOptimMixin, L.LightningModule):
    """Train and evaluate an image-to-image model built by ``chanzoo.create_model`` (RGT, Histoformer, ...).

    Args:
        model: network mapping a (B, C, H, W) image in [0, 1] to (B, C, scale*H, scale*W).
        optim, sched: the ``optim`` and ``sched`` config groups (see ``chanzoo.tasks.optim``).
        crop_border: pixels cut from each side before the metrics; ``None``: the model's scale for super-resolution
            (the SR convention), 0 for same-size restoration.
        aux_loss: an extra loss module ``aux_loss(output, target)``; ``aux_loss_weight`` scales it.
        quantize_output: round outputs to 8 bits before the metrics (as the papers do with saved images).
        tile, tile_overlap: evaluate large images in overlapping tiles of ``tile`` input pixels.
        on_nonfinite: 'stop' (raise at the first non-finite loss or gradient) or 'skip' (drop that step);
            see ``chanzoo.tasks.guard``.
    """

    # trainer.precision=auto keeps fp32 here: the papers train in fp32 and report PSNR to 0.01 dB, which bf16
    # outputs (8 significant bits) would blur
    auto_bf16 = False

    def __init__(
        self,
        model: nn.Module,
        optim: Mapping[str, Any],
        sched: Mapping[str, Any],
        crop_border: Optional[int] = None,
        aux_loss: Optional[nn.Module] = None,
        aux_loss_weight: float = 0.0,
        quantize_output: bool = True,
        tile: Optional[int] = None,
        tile_overlap: int = 32,
        on_nonfinite: str = "stop",
    ) -> None:
        super().__init__()
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        self.save_hyperparameters(ignore=["model", "aux_loss"])
        if getattr(model, "num_classes", 0):
            raise ValueError(f"restoration needs an image-to-image model (num_classes=0), got num_classes={model.num_classes}")
        self.model = model
        self.optim_cfg, self.sched_cfg = dict(optim), dict(sched)
        self.scale = model_scale(model)
        if crop_border is not None and (not isinstance(crop_border, int) or crop_border < 0):
            raise ValueError(f"crop_border must be a non-negative int or null (the model's scale), got {crop_border!r}")
        self.crop_border = (self.scale if self.scale > 1 else 0) if crop_border is None else crop_border
        if aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {aux_loss_weight}")
        if aux_loss_weight > 0 and aux_loss is None:
            raise ValueError(f"aux_loss_weight={aux_loss_weight} given without an aux_loss module")
        self.l1 = nn.L1Loss()
        self.aux_loss = aux_loss
        self.aux_loss_weight = float(aux_loss_weight)
        self.quantize_output = quantize_output
        if tile is not None and (not isinstance(tile, int) or tile <= 0):
            raise ValueError(f"tile must be a positive int or null, got {tile!r}")
        self.tile, self.tile_overlap = tile, tile_overlap
        self.val_metrics = restoration_metrics()
        self.test_metrics = restoration_metrics()

    def monitorable_metrics(self) -> list[str]:
        """The validation metrics this task logs (what a checkpoint callback may monitor); the luma (``_y``)
        metrics exist for RGB models only."""
        names = ["psnr", "ssim"] + (["psnr_y", "ssim_y"] if getattr(self.model, "in_chans", 3) == 3 else [])
        return ["val/loss", *(f"val/{name}" for name in names)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tile is not None and not self.training:
            return tiled_forward(self.model, x, self.tile, self.tile_overlap, self.scale)
        return self.model(x)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{'l1', 'aux' (if any), 'total'}``."""
        losses = {"l1": self.l1(output, target)}
        total = losses["l1"]
        if self.aux_loss is not None and self.aux_loss_weight > 0:
            losses["aux"] = self.aux_loss(output, target)
            total = total + self.aux_loss_weight * losses["aux"]
        losses["total"] = total
        return losses

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        lq, gt = batch
        losses = self.loss(self.model(lq), gt)
        self.log("train/loss", losses["total"], prog_bar=True, on_step=True, on_epoch=True, sync_dist=True,
                 batch_size=len(lq))
        if "aux" in losses:
            for name in ("l1", "aux"):
                self.log(f"train/{name}", losses[name], on_step=True, on_epoch=True, sync_dist=True, batch_size=len(lq))
        return losses["total"]

    def update_metrics(self, metrics: MetricCollection, output: torch.Tensor, gt: torch.Tensor) -> None:
        """Add one batch to ``metrics`` with the papers' conventions (8-bit output, border crop, Y and RGB)."""
        if output.shape != gt.shape:
            raise ValueError(f"output {tuple(output.shape)} and ground truth {tuple(gt.shape)} differ in shape")
        output = quantize(output) if self.quantize_output else output.clamp(0.0, 1.0)
        output, gt = _crop_border(output.float(), self.crop_border), _crop_border(gt.float(), self.crop_border)
        if output.shape[1] == 3:
            y_output, y_gt = rgb_to_y(output), rgb_to_y(gt)
            metrics["psnr_y"].update(y_output, y_gt)
            metrics["ssim_y"].update(y_output, y_gt)
        metrics["psnr"].update(output, gt)
        metrics["ssim"].update(output, gt)

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        lq, gt = batch
        output = self(lq)
        self.log(f"{stage}/loss", self.l1(output, gt), sync_dist=True, batch_size=len(lq))
        self.update_metrics(getattr(self, f"{stage}_metrics"), output, gt)

    def _log_metrics(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        for name, value in metrics.items():
            if value.update_called:
                self.log(f"{stage}/{name}", value.compute(), prog_bar=name == "psnr_y", sync_dist=False)
        metrics.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def configure_optimizers(self) -> Any:
        return self._configure_timm_optim(self.model, self.optim_cfg, self.sched_cfg)
