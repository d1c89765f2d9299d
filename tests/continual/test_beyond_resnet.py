"""CLR on networks other than a plain ResNet: InceptionNeXt (depthwise and band convs) and ResNet-18 carrying a
channel module (ECA, ELA). The same guarantee holds (task 0's predictions bit-identical after task 1 is trained, also
from its file), and each task adds exactly what the official rules give: a k x k depthwise conv after every
non-pointwise Conv2d outside the classifier, plus the BatchNorm weights and biases."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from continual_support import digits_sequence, short_fit
from torch import nn

import chanzoo
from chanzoo.channel.clr import CLRConv2d, load_task, save_task
from chanzoo.continual.methods import CLRMethod
from chanzoo.continual.runner import ContinualRunner
from chanzoo.continual.training import predict

_logger = logging.getLogger(__name__)


def expected_task_params(model: nn.Module) -> int:
    """reduced_v1 by the official rules: out_channels x 3 x 3 per non-1x1 Conv2d, + BatchNorm weight and bias."""
    head = set(model.get_classifier().modules())
    convs = sum(m.out_channels * 9 for m in model.modules()
                if type(m) is nn.Conv2d and m not in head and m.kernel_size != (1, 1))
    norms = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    return convs + norms


@pytest.mark.parametrize("name, attn, img_size", [
    ("inception_next_atto", None, 32), ("resnet18", "eca", 16), ("resnet18", "ela_b", 16),
])
def test_clr_zero_forgetting_beyond_resnet(name: str, attn: str | None, img_size: int, tmp_path: Path,
                                           one_thread: None) -> None:
    tasks = digits_sequence(img_size=img_size, tasks=2)
    torch.manual_seed(0)
    anchor = chanzoo.create_model(name, num_classes=2, in_chans=1, attn=attn)
    expected = expected_task_params(anchor)
    head = sum(p.numel() for p in anchor.get_classifier().parameters())
    backbone = sum(p.numel() for p in anchor.parameters()) - head
    method = CLRMethod(anchor)
    runner = ContinualRunner(method, tasks, short_fit(tmp_path), task_dir=tmp_path / "tasks")
    runner.learn(0)
    runner.learn(1)
    assert runner.identical[1][0] and torch.equal(runner.predict(0)[0], runner.reference[0])
    added, _ = method.added_parameters(runner.states[0])
    assert added == expected
    if attn is not None:  # the channel module's own conv (Conv1d) is a frozen part of the anchor
        modules = [m for m in method.model.modules()
                   if type(m).__module__.startswith("chanzoo.channel.") and not isinstance(m, CLRConv2d)]
        assert len(modules) == 8 and all(not p.requires_grad for m in modules for p in m.parameters())
    _logger.info("%s%s: CLR adds %d parameters per task = %.3f%% of the %d-parameter backbone (%d convs reprogrammed)",
                 name, f" + {attn}" if attn else "", added, 100 * added / backbone, backbone,
                 sum(isinstance(m, CLRConv2d) for m in method.model.modules()))
    assert added / backbone < {"inception_next_atto": 0.02, "resnet18": 0.005}[name]

    # task 0's file on a fresh copy of the anchor gives the same logits bit for bit
    fresh = CLRMethod(anchor).model
    load_task(fresh, Path(runner.task_files[0]))
    assert torch.equal(predict(fresh, tasks[0].datamodule, torch.device("cpu"))[0], runner.reference[0])
    save_task(fresh, tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == Path(runner.task_files[0]).read_bytes()
