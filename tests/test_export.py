"""Export: ONNX files agree with the eager model in onnxruntime on a real photo, .pt2 programs and timm-style
safetensors folders load back to the same outputs, and the CLI writes its file."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import chanzoo
from chanzoo.export import example_input, export_onnx, export_pt2, export_safetensors, load_folder, load_model
from support import REPO

CLASSIFIER = {"name": "resnet18", "attn": "eca", "num_classes": 10, "in_chans": 3}
VIT = {"name": "channelvit_tiny_p16", "num_classes": 10, "in_chans": 3, "kwargs": {"img_size": 64, "depth": 2}}
RESTORATION = {"name": "rgt_s_x2", "num_classes": 0, "in_chans": 3,
               "kwargs": {"embed_dim": 48, "depth": [2], "num_heads": 4, "split_size": [4, 8]}}


def photo_batch(model: torch.nn.Module, photo: np.ndarray, size: int) -> torch.Tensor:
    """Two copies of ``photo`` at ``size`` px, normalized as the model expects (through the export's own helper)."""
    path = f"/tmp/chanzoo_export_photo_{os.getpid()}.png"
    Image.fromarray(photo).save(path)
    try:
        return example_input(model, (3, size, size), image=path)
    finally:
        os.remove(path)


@pytest.mark.parametrize("model_cfg, size", [(CLASSIFIER, 64), (VIT, 64), (RESTORATION, 48)],
                         ids=["resnet18_eca", "channelvit", "rgt"])
def test_onnx_matches_eager_on_a_photo(model_cfg, size, photos, tmp_path):
    torch.manual_seed(0)
    model, _ = load_model(model_cfg)
    x = photo_batch(model, photos["astronaut"], size)
    abs_err, rel_err = export_onnx(model, x, tmp_path / "model.onnx", model_cfg["name"])
    assert (tmp_path / "model.onnx").stat().st_size > 10_000
    assert rel_err <= 1e-4, (abs_err, rel_err)


def test_onnx_batch_axis_is_dynamic(photos, tmp_path):
    import onnxruntime

    torch.manual_seed(0)
    model, _ = load_model(CLASSIFIER)
    x = photo_batch(model, photos["coffee"], 64)
    export_onnx(model, x, tmp_path / "model.onnx", "resnet18")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, 64, 64] and session.get_outputs()[0].shape == ["batch", 10]
    five = torch.cat([x, x.flip(-1), x[:1]])
    (logits,) = session.run(None, {"input": five.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(five).numpy(), atol=1e-5, rtol=0)


def test_pt2_round_trip(photos, tmp_path):
    torch.manual_seed(0)
    model, _ = load_model(VIT)
    x = photo_batch(model, photos["chelsea"], 64)
    abs_err, _ = export_pt2(model, x, tmp_path / "vit.pt2", VIT["name"])
    assert abs_err == 0.0
    loaded = torch.export.load(str(tmp_path / "vit.pt2")).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:1]), model(x[:1]), rtol=0, atol=0)  # batch axis is dynamic


def test_safetensors_folder_loads_in_timm(photos, tmp_path):
    torch.manual_seed(0)
    cfg = {"name": "resnet18", "num_classes": 10, "in_chans": 3}
    model, _ = load_model(cfg)
    x = photo_batch(model, photos["rocket"], 64)
    folder = tmp_path / "resnet18_fashion"
    abs_err, _ = export_safetensors(model, x, folder, cfg)
    assert abs_err == 0.0
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 10 and config["num_features"] == 512
    assert config["pretrained_cfg"]["num_classes"] == 10 and config["pretrained_cfg"]["first_conv"] == "conv1"
    overlay = dict(file=str(folder / "model.safetensors"), num_classes=10)
    loaded = timm.create_model("resnet18", pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay).eval()
    from_dir = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(from_dir(x), expected, rtol=0, atol=0)


def test_safetensors_folder_keeps_the_channel_module_and_model_args(photos, tmp_path):
    torch.manual_seed(0)
    for cfg, size in ((CLASSIFIER, 64), (RESTORATION, 32)):
        model, _ = load_model(cfg)
        x = photo_batch(model, photos["coffee"], size)
        folder = tmp_path / cfg["name"]
        export_safetensors(model, x, folder, cfg)
        config = json.loads((folder / "config.json").read_text())
        reloaded = load_folder(folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)
        if cfg is CLASSIFIER:
            assert config["chanzoo"] == {"attn": "eca"}
            assert sum(type(m).__name__ == "EfficientChannelAttention" for m in reloaded.modules()) == 8
        else:
            assert config["model_args"]["embed_dim"] == 48 and "chanzoo" not in config


def test_checkpoint_weights_are_exported(photos, tmp_path):
    """A train.py checkpoint (model config under chanzoo_model_cfg, weights under state_dict's model.*)."""
    torch.manual_seed(0)
    trained = chanzoo.create_model("resnet18", num_classes=10, attn="eca").eval()
    checkpoint = {
        "chanzoo_model_cfg": dict(CLASSIFIER, pretrained=False, pretrained_file=None),
        "state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()},
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    model, model_cfg = load_model(None, str(tmp_path / "last.ckpt"))
    x = photo_batch(model, photos["astronaut"], 64)
    assert model_cfg["attn"] == "eca"
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x), rtol=0, atol=0)


def test_missing_model_and_checkpoint_are_named():
    with pytest.raises(ValueError, match="model=<config or model name> or ckpt_path"):
        load_model(None, None)
    with pytest.raises(FileNotFoundError, match="ckpt_path='nowhere.ckpt'"):
        load_model(None, "nowhere.ckpt")


def test_custom_cpp_op_refuses_onnx_by_name(photos, tmp_path):
    from chanzoo.ops.selective_scan import available_backends

    assert "cpp" in available_backends()  # the C++ scan (the CPU default) is what ONNX cannot express
    model, _ = load_model({"name": "vim2_nano", "num_classes": 10, "in_chans": 3})
    x = photo_batch(model, photos["chelsea"], 64)
    with pytest.raises(ValueError, match=r"'vim2_nano' cannot be exported to onnx.*chanzoo::selective_scan_fwd"):
        export_onnx(model, x, tmp_path / "vim2.onnx", "vim2_nano")


@pytest.mark.slow
def test_cli_writes_an_onnx_file(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "r18.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "chanzoo.export", "model=resnet18", "data.num_classes=10", "img_size=64",
         "format=onnx", f"output={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.stat().st_size > 10_000
    assert "onnxruntime vs eager" in result.stdout and "max abs error" in result.stdout
    assert "Replaced initializer" not in result.stdout  # the ONNX optimizer's per-pass notes are silenced


@pytest.mark.slow
def test_cli_names_a_bad_format(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "chanzoo.export", "model=resnet18", "format=tflite"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "format must be one of ('onnx', 'pt2', 'safetensors'), got 'tflite'" in result.stderr
