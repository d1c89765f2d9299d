"""prepare_model: compiled equals eager, channels-last, regional blocks, 'auto' decisions and bad switches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import chanzoo
from chanzoo.acceleration import (
    CPU_MEASURED_INFERENCE,
    CPU_MEASURED_TRAINING,
    native_bf16,
    prepare_model,
    repeated_blocks,
    resolve_precision,
    to_input_format,
)
from chanzoo.tasks.classification import ClassificationTask
from chanzoo.tasks.restoration import RestorationTask


@pytest.fixture(scope="module")
def grey_batch() -> torch.Tensor:
    """Four 28x28 crops of scikit-image's camera photo, in [0, 1]."""
    from skimage import data, transform

    image = transform.resize(data.camera(), (56, 56), anti_aliasing=True).astype(np.float32)
    crops = [image[:28, :28], image[:28, 28:], image[28:, :28], image[28:, 28:]]
    return torch.from_numpy(np.stack(crops))[:, None]


def _small_cnn(seed: int = 0) -> torch.nn.Module:
    """SmallCNN without its head dropout, so that train-mode outputs are deterministic."""
    torch.manual_seed(seed)
    return chanzoo.create_model("small_cnn", num_classes=10, in_chans=1, drop_rate=0.0).eval()


def test_compiled_equals_eager_and_keeps_keys(grey_batch: torch.Tensor) -> None:
    model = _small_cnn()
    keys = list(model.state_dict())
    with torch.no_grad():
        expected = model(grey_batch)
    compiled, applied = prepare_model(model, compile=True, channels_last=True, device="cpu", inference=True)
    assert applied["compile"] == "whole" and applied["channels_last"] and applied["freezing"]
    with torch.inference_mode():
        out = compiled(to_input_format(grey_batch, applied))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert list(compiled.state_dict()) == keys  # compiled in place: checkpoints keep their keys


def test_regional_compilation_trains_like_eager(grey_batch: torch.Tensor) -> None:
    eager, model = _small_cnn().train(), _small_cnn().train()
    model, applied = prepare_model(model, compile=True, channels_last=False, device="cpu")
    assert applied["compile"] == "regional" and applied["block"] == "SmallCNNStage"
    assert applied["compiled_modules"] == 3
    for m in (eager, model):
        m(grey_batch).logsumexp(1).mean().backward()
    for (name, p), q in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_repeated_blocks_of_timm_families() -> None:
    with torch.device("meta"):
        davit = chanzoo.create_model("davit_tiny")
        resnet = chanzoo.create_model("resnet50")
    assert {type(b).__name__ for b in repeated_blocks(davit)} == {"SpatialBlock", "ChannelBlock"}
    assert len(repeated_blocks(davit)) == 2 * sum(davit.pretrained_cfg.get("depths", (1, 1, 3, 1)))
    assert len(repeated_blocks(resnet)) == 3 + 4 + 6 + 3
    assert repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))) == []


def test_auto_follows_the_measured_table() -> None:
    model, applied = prepare_model(_small_cnn(), compile="auto", channels_last="auto", device="cpu")
    assert CPU_MEASURED_TRAINING["small_cnn"] == {"channels_last": True, "compile": False}
    assert applied["compile"] == "off" and applied["channels_last"] is True
    assert model.stages[0].blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert applied["compile_reason"].startswith("auto") and applied["family"] == "small_cnn"
    _, applied = prepare_model(_small_cnn(), compile="auto", channels_last="auto", device="cpu", inference=True)
    assert "small_cnn" not in CPU_MEASURED_INFERENCE
    assert applied["compile"] == "off" and applied["channels_last"] is False  # not measured: eager, contiguous
    with torch.device("meta"):
        davit = chanzoo.create_model("davit_tiny")
    _, applied = prepare_model(davit, compile="false", channels_last="auto", device="meta")  # not CUDA: the table
    assert applied["channels_last"] is False and applied["compile"] == "off"


@pytest.mark.parametrize("inference, table", [(True, CPU_MEASURED_INFERENCE), (False, CPU_MEASURED_TRAINING)])
def test_auto_uses_the_table_measured_for_training_or_inference(inference: bool, table: dict) -> None:
    """DaViT compiles for inference (measured to pay) but trains eager (its compiled training step did not pay)."""
    with torch.device("meta"):
        davit = chanzoo.create_model("davit_tiny")
    # compile=auto on a meta model only decides: count what it would do through the reason and the table
    _, applied = prepare_model(davit, compile="false", channels_last="auto", device="meta", inference=inference)
    assert applied["use"] == ("inference" if inference else "training")
    name = "CPU_MEASURED_INFERENCE" if inference else "CPU_MEASURED_TRAINING"
    assert name in applied["channels_last_reason"]
    assert ("davit" in table) is inference


@pytest.mark.parametrize("kwargs, match", [
    ({"compile": "yes"}, "compile must be true, false or 'auto', got 'yes'"),
    ({"channels_last": 1}, "channels_last must be true, false or 'auto', got 1"),
    ({"compile_mode": "fastest"}, "compile_mode must be one of .* got 'fastest'"),
    ({"device": "gpu0"}, "device must be .* got 'gpu0'"),
    ({"compile": True, "regional": True, "model": torch.nn.Linear(2, 2)}, "regional=True but Linear repeats no block"),
])
def test_bad_switches_name_the_value(kwargs: dict, match: str) -> None:
    model = kwargs.pop("model", None) or _small_cnn()
    with pytest.raises(ValueError, match=match):
        prepare_model(model, **kwargs)


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="the CPU flags are read from Linux's /proc/cpuinfo")
def test_native_bf16_matches_the_cpu_flags() -> None:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    flags = {flag for line in lines if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    assert native_bf16("cpu") == bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_picks_bf16_only_where_native_and_the_task_allows(native: bool, monkeypatch) -> None:
    monkeypatch.setattr("chanzoo.acceleration.native_bf16", lambda accelerator="auto": native)
    classifier = ClassificationTask(_small_cnn(), optim={"name": "adamw", "lr": 1e-3}, sched={"name": "cosine"})
    restorer = RestorationTask(chanzoo.create_model("rgt_s_x2", embed_dim=32, num_heads=2, depth=(2, 2)),
                               optim={"name": "adamw", "lr": 1e-3}, sched={"name": "cosine"})
    assert resolve_precision("auto", "cpu", classifier) == ("bf16-mixed" if native else "32-true")
    assert resolve_precision("auto", "cpu", restorer) == "32-true"  # PSNR-reported tasks stay fp32
    assert resolve_precision("auto", "cpu") == ("bf16-mixed" if native else "32-true")
    for given in ("32-true", "bf16-mixed", 16, "16-mixed"):
        assert resolve_precision(given, "cpu", classifier) == given
