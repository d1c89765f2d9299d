"""Auxiliary restoration losses, used through ``RestorationTask(aux_loss=..., aux_loss_weight=...)``.

``PearsonCorrelationLoss`` is Histoformer's correlation loss (Sun et al., "Restoring Images in Adverse Weather
Conditions via Histogram Transformer", ECCV 2024, Sec. 3.4): ``L_cor = (1 - rho(output, target)) / 2`` with rho the
Pearson correlation coefficient of each image's pixels, added to the L1 loss with weight 1 in the released recipe
(``loss_total = l_pix + l_pear`` in the official ``ImageCleanModel.optimize_parameters``).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["PearsonCorrelationLoss", "pearson_correlation"]


def pearson_correlation(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pearson correlation of each sample's flattened values: ``sum(dx dy) / (||dx|| ||dy|| + eps)``, shape (N,).

    ``dx = x - mean(x)`` over all channels and pixels of a sample; ``eps`` is added to the denominator as in the
    official code, so constant images give 0 instead of NaN.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"output and target must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.shape != y.shape or x.ndim < 2:
        raise ValueError(f"output {tuple(x.shape)} and target {tuple(y.shape)} must have one equal (N, ...) shape")
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    dx, dy = x - x.mean(dim=1, keepdim=True), y - y.mean(dim=1, keepdim=True)
    numerator = (dx * dy).sum(dim=1)
    return numerator / (dx.pow(2).sum(dim=1).sqrt() * dy.pow(2).sum(dim=1).sqrt() + eps)


class PearsonCorrelationLoss(nn.Module):
    """Histoformer's correlation loss: mean over samples of ``(1 - rho) / 2``, in [0, 1].

    As in the official code, samples whose correlation is not finite (NaN/Inf in an image) are left out of the mean
    rather than turning the loss into NaN.

    Args:
        eps: added to the product of the norms in the correlation's denominator (official: 1e-6).
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.eps = float(eps)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = (1.0 - pearson_correlation(output, target, self.eps)) / 2.0
        return loss[torch.isfinite(loss)].mean()
