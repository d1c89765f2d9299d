"""``task.dice_weight``: cross-entropy plus a multi-class Dice term, checked against the formula written out, on the
coins photo's labels (255 on coin borders, ignored by both terms)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chanzoo.tasks.segmentation import SegmentationLoss


def _dice_by_hand(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Mean over classes of 1 - 2|P∩Y| / (|P| + |Y|) with soft P, over labelled pixels; a class absent from the
    labels contributes 0 (as smp's DiceLoss counts it)."""
    keep = labels != ignore_index
    probs = logits.softmax(1).permute(0, 2, 3, 1)[keep]  # (pixels, classes)
    onehot = F.one_hot(labels[keep], logits.shape[1]).float()
    intersection = (probs * onehot).sum(0)
    dice = 2 * intersection / (probs.sum(0) + onehot.sum(0)).clamp_min(1e-7)
    return ((1 - dice) * (onehot.sum(0) > 0)).mean()


def test_cross_entropy_plus_dice_equals_the_formula_and_ignores_255(coins: tuple) -> None:
    _, _, semantic = coins
    labels = torch.stack([semantic, semantic.flip(-1)])
    assert (labels == 255).any() and len(labels.unique()) == 4  # background, two coin classes, borders
    logits = torch.randn(2, 4, *semantic.shape, generator=torch.Generator().manual_seed(0))  # class 3 is absent

    cross_entropy = F.cross_entropy(logits, labels, ignore_index=255)
    assert SegmentationLoss(dice_weight=0.0)(logits, labels) == cross_entropy
    combined = SegmentationLoss(dice_weight=0.5)(logits, labels)
    assert combined == pytest.approx(float(cross_entropy + 0.5 * _dice_by_hand(logits, labels)), abs=1e-5)

    changed = logits.clone()
    changed.permute(0, 2, 3, 1)[labels == 255] = 100.0  # whatever is predicted on ignored pixels changes neither term
    assert SegmentationLoss(dice_weight=0.5)(changed, labels) == pytest.approx(float(combined), abs=1e-5)
