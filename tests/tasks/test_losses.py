"""Histoformer's Pearson-correlation loss against numpy's correlation on real photos, its invariances and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chanzoo.tasks import RestorationTask
from chanzoo.tasks.losses import PearsonCorrelationLoss, pearson_correlation


def _crops(photos: dict, names: tuple[str, ...], size: int = 48) -> torch.Tensor:
    crops = [photos[n][100 : 100 + size, 120 : 120 + size] for n in names]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).double() / 255.0


def test_correlation_equals_numpy_corrcoef(photos):
    x = _crops(photos, ("astronaut", "coffee", "chelsea"))
    y = _crops(photos, ("rocket", "astronaut", "coffee"))
    expected = [np.corrcoef(a.numpy().ravel(), b.numpy().ravel())[0, 1] for a, b in zip(x, y)]
    torch.testing.assert_close(pearson_correlation(x, y, eps=0.0), torch.tensor(expected, dtype=torch.float64))
    loss = PearsonCorrelationLoss(eps=0.0)(x, y)
    assert loss.item() == pytest.approx(np.mean([(1 - r) / 2 for r in expected]), rel=1e-12)


def test_invariances_and_extremes(photos):
    x = _crops(photos, ("astronaut", "chelsea"))
    loss = PearsonCorrelationLoss()
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(0.3 * x + 0.2, x).item() == pytest.approx(0.0, abs=1e-5)  # positive affine maps keep rho = 1
    assert loss(1.0 - x, x).item() == pytest.approx(1.0, abs=1e-6)  # inverted image: rho = -1
    flat = torch.full_like(x, 0.5)
    assert loss(flat, x).item() == pytest.approx(0.5)  # eps keeps a constant image finite: rho = 0


def test_non_finite_samples_are_left_out_as_in_the_official_code(photos):
    x = _crops(photos, ("astronaut", "coffee"))
    y = _crops(photos, ("chelsea", "rocket"))
    broken = x.clone()
    broken[1, 0, 0, 0] = float("nan")
    loss = PearsonCorrelationLoss()
    torch.testing.assert_close(loss(broken, y), loss(x[:1], y[:1]))


def test_gradient_equals_finite_differences(photos):
    """The loss's autograd gradient against central finite differences (float64, small real crops, eps > 0)."""
    y = _crops(photos, ("coffee", "chelsea"), 6)
    x = (y * 0.5 + 0.1 * y.flip(-1)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: PearsonCorrelationLoss()(a, y), (x,), eps=1e-6, atol=1e-7)
    PearsonCorrelationLoss()(x, y).backward()
    assert x.grad.abs().sum() > 0


def test_errors():
    loss = PearsonCorrelationLoss()
    with pytest.raises(ValueError, match=r"output \(2, 3, 4, 4\) and target \(2, 3, 4, 5\)"):
        loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))
    with pytest.raises(TypeError, match="got ndarray and Tensor"):
        loss(np.zeros((2, 3)), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="eps must be a non-negative number, got -1"):
        PearsonCorrelationLoss(eps=-1)


def test_restoration_task_adds_it_with_the_recipe_weight(photos):
    gt = _crops(photos, ("astronaut", "rocket"), 16).float()
    out = gt * 0.8 + 0.05
    task = RestorationTask(torch.nn.Identity(), optim={"name": "adam", "lr": 1e-3}, sched={"name": "none"},
                           aux_loss=PearsonCorrelationLoss(), aux_loss_weight=1.0)
    losses = task.loss(out, gt)
    torch.testing.assert_close(losses["total"], (out - gt).abs().mean() + PearsonCorrelationLoss()(out, gt))
