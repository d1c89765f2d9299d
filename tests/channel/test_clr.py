"""CLR reprogramming: identity at wrapping, frozen anchors, exact task save/load, two real tasks without forgetting,
and the paper's parameter budget on ResNet-50."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import chanzoo
from chanzoo.channel.clr import CLRConv2d, load_task, reprogram, save_task, task_parameter_count
from chanzoo.models.small_cnn import SmallCNN

Task = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Small models train ~10x faster on one thread than on two busy shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits_task(first_label: int) -> Task:
    """sklearn digits with labels first_label..first_label+4 (relabelled 0..4), 16x16, split 70/30 in file order."""
    images, labels = load_digits(return_X_y=True)
    x = F.interpolate(torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16, size=16, mode="bilinear")
    y = torch.tensor(labels)
    keep = (y >= first_label) & (y < first_label + 5)
    x, y = x[keep], y[keep] - first_label
    n = int(len(x) * 0.7)
    return (x[:n], y[:n]), (x[n:], y[n:])


def train(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], steps: int = 80) -> list[float]:
    x, y = data
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,), generator=generator)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    x, y = data
    return (model(x).argmax(1) == y).float().mean().item()


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(num_classes=5, in_chans=1, widths=(16, 32, 64), depths=(1, 1, 1), drop_rate=0.0)


def test_wrapping_leaves_the_output_unchanged(photos: dict[str, np.ndarray]) -> None:
    model = chanzoo.create_model("resnet18", num_classes=10).eval()
    x = torch.from_numpy(photos["astronaut"]).permute(2, 0, 1).float()[None] / 255
    x = (F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True) - 0.45) / 0.225
    with torch.no_grad():
        before = model(x)
        reprogram(model)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    wrapped = [m for m in model.modules() if isinstance(m, CLRConv2d)]
    assert len(wrapped) == 1 + 8 * 2  # the stem's 7x7 and two 3x3 per basic block; the 1x1 downsamples are skipped
    assert all(m.reprogram.kernel_size == (3, 3) and m.reprogram.groups == m.anchor.out_channels for m in wrapped)


def test_resnet50_task_parameters_stay_under_the_papers_budget() -> None:
    model = chanzoo.create_model("resnet50")
    base = sum(p.numel() for p in model.parameters())
    reprogram(model)
    # 3840 reprogrammed channels x 3 x 3 + 53,120 BatchNorm weights and biases
    assert task_parameter_count(model) == 3840 * 9 + 53120
    assert task_parameter_count(model) / base < 0.006
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(".reprogram." in n or ".bn" in n or n.startswith(("bn1.", "fc.")) or ".downsample.1." in n
               for n in trainable)


def test_two_tasks_train_in_turn_without_forgetting(tmp_path: Path, one_thread: None) -> None:
    model = reprogram(small_model())
    anchors = {n: p.detach().clone() for n, p in model.named_parameters() if ".anchor." in n}
    task_a, task_b = digits_task(0), digits_task(5)

    losses = train(model, task_a[0])
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])
    acc_a = accuracy(model, task_a[1])
    assert acc_a > 0.9
    save_task(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        logits_a = model(task_a[1][0])

    model.reset_classifier(5)
    train(model, task_b[0])
    acc_b = accuracy(model, task_b[1])
    assert acc_b > 0.9
    assert accuracy(model, task_a[1]) < 0.5  # task B's state alone does not solve task A ...
    save_task(model, tmp_path / "b.safetensors")

    load_task(model, tmp_path / "a.safetensors")  # ... but task A's file brings it back exactly
    with torch.no_grad():
        torch.testing.assert_close(model(task_a[1][0]), logits_a, rtol=0, atol=0)
    assert accuracy(model, task_a[1]) == acc_a
    load_task(model, tmp_path / "b.safetensors")
    assert accuracy(model, task_b[1]) == acc_b
    for name, value in anchors.items():
        torch.testing.assert_close(model.get_parameter(name), value, rtol=0, atol=0, msg=name)


def test_load_task_rebuilds_a_head_of_another_width(tmp_path: Path) -> None:
    model = reprogram(small_model(), num_classes=3)
    save_task(model, tmp_path / "three.safetensors")
    model.reset_classifier(7)
    load_task(model, tmp_path / "three.safetensors")
    assert model.get_classifier().out_features == 3


def test_clr_errors_name_the_problem(tmp_path: Path) -> None:
    model = small_model()
    with pytest.raises(ValueError, match="is not reprogrammed"):
        save_task(model, tmp_path / "x.safetensors")
    reprogram(model)
    with pytest.raises(ValueError, match="already reprogrammed"):
        reprogram(model)
    with pytest.raises(ValueError, match="task file .*missing.safetensors' does not exist"):
        load_task(model, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="CLR kernel_size must be a positive odd int, got 2"):
        reprogram(small_model(), kernel_size=2)
    other = reprogram(SmallCNN(num_classes=5, in_chans=1, widths=(16, 32, 64), depths=(2, 1, 1)))
    save_task(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not fit SmallCNN: missing keys"):
        load_task(model, tmp_path / "other.safetensors")
