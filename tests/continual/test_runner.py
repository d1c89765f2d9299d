"""CLR's guarantees through the continual runner: predictions on earlier tasks stay bit-identical after later tasks
are trained, a task file holds only its own tensors and restores them on a fresh anchor; the baselines behave as
they should (fine-tuning forgets, the linear probe and independent models do not)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from continual_support import digits_sequence, short_fit
from safetensors.torch import load_file

import chanzoo
from chanzoo.channel.clr import CLRConv2d, load_task, task_state_dict
from chanzoo.continual.methods import CLRMethod, create_method
from chanzoo.continual.metrics import average_accuracy, backward_transfer, forgetting
from chanzoo.continual.runner import ContinualRunner
from chanzoo.continual.training import predict


@pytest.fixture(scope="module")
def tasks():
    return digits_sequence(img_size=16, tasks=3)


@pytest.fixture(scope="module")
def anchor() -> torch.nn.Module:
    torch.manual_seed(0)
    return chanzoo.create_model("resnet18", num_classes=2, in_chans=1)


@pytest.fixture(scope="module")
def runs(tasks, anchor, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ContinualRunner]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for name in ("clr", "finetune", "linear_probe", "independent"):
        folder = tmp_path_factory.mktemp(name)
        runner = ContinualRunner(create_method(name, anchor), tasks, short_fit(folder, regularizer=1e-5),
                                 task_dir=folder / "tasks")
        for index in range(len(tasks)):
            runner.learn(index)
        out[name] = runner
    torch.set_num_threads(threads)
    return out


def test_clr_predictions_on_earlier_tasks_are_bit_identical(runs, anchor) -> None:
    runner = runs["clr"]
    assert all(runner.identical[i][j] for i in range(3) for j in range(i + 1))
    for j in range(3):  # predicting again now, after all tasks, gives the same logits bit for bit
        assert torch.equal(runner.predict(j)[0], runner.reference[j])
    result = runner.results()
    assert result["exact_zero_forgetting"] and result["bwt"] == 0.0 and result["forgetting"] == 0.0
    model = runner.method.model
    wrapped = {name for name, m in model.named_modules() if isinstance(m, CLRConv2d)}
    for name, conv in anchor.named_modules():  # the anchor's convolutions never changed
        if isinstance(conv, torch.nn.Conv2d):
            now = model.get_submodule(f"{name}.anchor" if name in wrapped else name)
            assert torch.equal(now.weight, conv.weight), name
    # training did change each task's own tensors away from the identity start
    for state in runner.states:
        assert not torch.equal(state["layer1.0.conv1.reprogram.weight"],
                               runner.method.initial_state["layer1.0.conv1.reprogram.weight"])


def test_clr_task_file_holds_its_own_tensors_and_restores_them_on_a_fresh_anchor(runs, anchor, tasks) -> None:
    runner = runs["clr"]
    fresh = CLRMethod(anchor).model
    own = set(task_state_dict(fresh))
    for j, path in enumerate(runner.task_files):
        saved = load_file(path)
        assert set(saved) == own and not any(".anchor." in k for k in saved)
        assert all(torch.equal(saved[k], runner.states[j][k]) for k in saved)
        load_task(fresh, Path(path))
        logits, _ = predict(fresh, tasks[j].datamodule, torch.device("cpu"))
        assert torch.equal(logits, runner.reference[j])
    added, head = runner.method.added_parameters(runner.states[0])
    assert head == 512 * 2 + 2 and added == 35_136 + 9_600  # ResNet-18 reduced_v1: 3,904 x 3 x 3 + BN weights/biases


@pytest.mark.parametrize("name, zero_forgetting, added_per_task", [
    ("finetune", False, 0), ("linear_probe", True, 0), ("independent", True, 11_170_240),
])
def test_baselines(runs, name: str, zero_forgetting: bool, added_per_task: int) -> None:
    runner = runs[name]
    result = runner.results()
    assert result["exact_zero_forgetting"] is zero_forgetting
    if not zero_forgetting:  # the shared backbone moved: task 0's logits after task 2 differ from those after task 0
        assert not runner.identical[2][0] and not torch.equal(runner.predict(0)[0], runner.reference[0])
    assert result["params_added"] == [added_per_task] * 3 and result["head_params"] == [1026] * 3
    assert result["backbone_params"] == 11_170_240  # ResNet-18 on one input channel, without its head
    assert all(math.isnan(runner.accuracy[i][j]) for i in range(3) for j in range(i + 1, 3))


def test_matrix_metrics_match_their_definitions() -> None:
    nan = math.nan
    r = [[0.9, nan, nan], [0.8, 0.95, nan], [0.7, 0.85, 0.99]]
    assert average_accuracy(r) == pytest.approx((0.7 + 0.85 + 0.99) / 3)
    assert backward_transfer(r) == pytest.approx(((0.7 - 0.9) + (0.85 - 0.95)) / 2)
    assert forgetting(r) == pytest.approx(((0.9 - 0.7) + (0.95 - 0.85)) / 2)
    with pytest.raises(ValueError, match=r"must be square and non-empty, got shape \(2, 3\)"):
        average_accuracy([[1, 2, 3], [4, 5, 6]])


def test_runner_learns_in_order(tasks, anchor, tmp_path: Path) -> None:
    runner = ContinualRunner(create_method("linear_probe", anchor), tasks, short_fit(tmp_path))
    with pytest.raises(ValueError, match="tasks are learned in order: next is task 0, got 1"):
        runner.learn(1)
    with pytest.raises(ValueError, match="0 of 3 tasks learned"):
        runner.results()
    with pytest.raises(ValueError, match="continual method must be one of .* got 'ewc'"):
        create_method("ewc", anchor)
