"""The profiler: FLOPs against published figures and closed forms, params, timing rows, the Hydra entry point."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

import chanzoo
from chanzoo.profile import (
    DOCS_BEGIN,
    DOCS_END,
    ProfileRow,
    Variant,
    count_flops,
    count_params,
    flop_report,
    profile_model,
    write_docs,
)
from support import REPO


def run_profile(overrides: list[str], runs_dir) -> subprocess.CompletedProcess:
    """``python -m chanzoo.profile <overrides>`` from the repo root, runs under ``runs_dir``."""
    env = {**os.environ, "CHANZOO_RUNS": str(runs_dir)}
    return subprocess.run([sys.executable, "-m", "chanzoo.profile", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name, published_gmacs", [
    ("resnet50", 4.1),             # He et al. 2016, Table 1: 3.8 x 10^9 "FLOPs" (multiply-adds) for the v1 stride;
                                   # timm's v1.5 (stride in the 3x3) is the 4.1G of its model card
    ("davit_tiny", 4.5),           # Ding et al. 2022, Table 2
    ("inception_next_tiny", 4.2),  # Yu et al. 2024, Table 1
])
def test_macs_match_published_figures(name: str, published_gmacs: float) -> None:
    with torch.device("meta"):  # FlopCounterMode counts from shapes: no weights or compute needed
        model = chanzoo.create_model(name).eval()
        flops, _ = count_flops(model, torch.empty(1, 3, 224, 224))
    assert flops / 2 / 1e9 == pytest.approx(published_gmacs, rel=0.03)


def test_params_equal_numel_sum() -> None:
    model = chanzoo.create_model("small_cnn", num_classes=10, in_chans=1)
    model.get_classifier().weight.requires_grad_(False)
    total, trainable = count_params(model)
    assert total == sum(p.numel() for p in model.parameters())
    assert trainable == total - model.get_classifier().weight.numel()


def test_linear_flops_closed_form() -> None:
    batch, tokens, c_in, c_out = 3, 5, 32, 48
    flops, _ = count_flops(nn.Linear(c_in, c_out), torch.zeros(batch, tokens, c_in))
    assert flops == 2 * batch * tokens * c_in * c_out


class _Attention(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.scaled_dot_product_attention(x, x, x)


def test_sdpa_flops_closed_form_and_fvcore_note() -> None:
    batch, heads, length, dim = 2, 3, 17, 8
    x = torch.zeros(batch, heads, length, dim)
    flops, by_op = count_flops(_Attention(), x)  # on CPU SDPA runs aten._scaled_dot_product_flash_attention_for_cpu
    assert flops == 2 * (2 * batch * heads * length * length * dim)  # Q K^T and (softmax) V
    assert list(by_op) == ["aten._scaled_dot_product_flash_attention_for_cpu"]
    # fvcore cannot count SDPA: the report must say so rather than agree silently
    report = flop_report(nn.Sequential(nn.Unflatten(1, (heads, length)), _Attention(), nn.Flatten(1)).eval(),
                         in_chans=heads * length, img_size=dim)
    assert "scaled_dot_product_attention" in report["note"]


def test_fvcore_agrees_on_a_cnn() -> None:
    report = flop_report(chanzoo.create_model("small_cnn", num_classes=10, in_chans=1, attn=None), 1, 28)
    assert report["fvcore_macs"] == pytest.approx(report["macs"], rel=0.05)  # fvcore also counts the norms


def test_profile_model_rows_and_errors() -> None:
    build = lambda: chanzoo.create_model("small_cnn", num_classes=10, in_chans=1)  # noqa: E731
    rows = profile_model(build, "small_cnn", batch_size=4, variants=[Variant("eager", False, False),
                         Variant("channels_last", False, True)], mode="all", warmup=1, repeats=3, fvcore=False)
    assert [r.variant for r in rows] == ["eager", "channels_last"]
    for row in rows:
        assert row.infer_img_s > 0 and row.train_img_s > 0 and row.latency_ms > 0 and row.peak_mem_mb >= 0
        assert row.img_size == 28 and row.params_m == pytest.approx(count_params(build())[0] / 1e6)
    assert rows[1].applied["channels_last"] is True
    with pytest.raises(ValueError, match="mode.*'fast'"):
        profile_model(build, "small_cnn", mode="fast")
    with pytest.raises(ValueError, match="batch_size.*0"):
        profile_model(build, "small_cnn", batch_size=0)
    with pytest.raises(ValueError, match="amp.*'fp8'"):
        profile_model(build, "small_cnn", variants=[Variant("x", False, False, amp="fp8")])


def test_write_docs_replaces_only_its_block(tmp_path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\nintro\n\n{DOCS_BEGIN}\nold table\n{DOCS_END}\n\n## Other family\nkept\n")
    row = ProfileRow(model="m", variant="default", device="cpu", batch_size=8, img_size=224, amp="none",
                     params_m=25.6, trainable_m=25.6, gflops=8.2, gmacs=4.1, infer_img_s=10.0, machine="cpu x")
    write_docs([row], docs, tmp_path / "plot.png")
    text = docs.read_text()
    assert "old table" not in text and "| m | default | 25.60 | 8.20 | 4.10 | 10.0 |" in text
    assert text.startswith("# Benchmarks\nintro") and text.endswith("## Other family\nkept\n")
    assert (tmp_path / "plot.png").stat().st_size > 0


TINY = ["batch_size=1", "img_size=32", "repeats=2", "warmup=1", "fvcore=false"]


@pytest.mark.slow
def test_entry_point_sweep_writes_csv_json_docs(tmp_path) -> None:
    docs = tmp_path / "bench.md"
    result = run_profile([
        "models=[small_cnn]", "data.in_chans=1", "data.num_classes=10", "accel.compile=false",
        "accel.channels_last=false", "repeats=2", "warmup=1", "fvcore=false", f"docs_file={docs}",
        f"plot_file={tmp_path / 'plot.png'}",
    ], tmp_path / "runs")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "small_cnn" in result.stdout and "infer img/s" in result.stdout
    (out_dir,) = (tmp_path / "runs" / "profile").iterdir()
    rows = json.loads((out_dir / "profile.json").read_text())
    assert rows[0]["model"] == "small_cnn" and rows[0]["applied"]["compile"] == "off"
    assert next(csv.DictReader(open(out_dir / "profile.csv")))["variant"] == "chosen"
    assert DOCS_BEGIN in docs.read_text() and (tmp_path / "plot.png").exists()


@pytest.mark.slow
def test_default_sweep_writes_into_the_run_folder_and_leaves_the_docs_alone(tmp_path) -> None:
    tracked = REPO / "docs" / "benchmarks.md"
    before = (tracked.read_bytes(), tracked.stat().st_mtime_ns)
    # convnext_atto has no config file: the default model config with model.name, without small_cnn's SE
    result = run_profile(["models=[resnet18,convnext_atto]", *TINY], tmp_path / "runs")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tracked.read_bytes(), tracked.stat().st_mtime_ns) == before
    (out_dir,) = (tmp_path / "runs" / "profile").iterdir()
    rows = json.loads((out_dir / "profile.json").read_text())
    expected = {name: count_params(timm.create_model(name))[0] for name in ("resnet18", "convnext_atto")}
    assert {r["model"]: round(r["params_m"] * 1e6) for r in rows} == expected
    table = (out_dir / "benchmarks.md").read_text()
    assert DOCS_BEGIN in table and "| resnet18 |" in table and "| convnext_atto |" in table
    assert (out_dir / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_every_name_is_checked_before_the_first_is_profiled(tmp_path) -> None:
    result = run_profile(["models=[resnet18,unknownx,resnt50]", *TINY], tmp_path / "runs")
    assert result.returncode != 0
    assert "unknown model 'unknownx'" in result.stderr and "unknown model 'resnt50'" in result.stderr
    assert "'resnet50'" in result.stderr  # the close match
    assert "profiling resnet18" not in result.stdout + result.stderr
    assert not list((tmp_path / "runs").rglob("profile.json"))


@pytest.mark.slow
def test_model_name_profiles_any_timm_model_without_a_config_file(tmp_path) -> None:
    result = run_profile(["model.name=convnext_atto", *TINY], tmp_path / "runs")
    assert result.returncode == 0, result.stderr[-3000:]
    (out_dir,) = (tmp_path / "runs" / "profile").iterdir()
    (row,) = json.loads((out_dir / "profile.json").read_text())
    assert row["model"] == "convnext_atto"
    assert round(row["params_m"] * 1e6) == count_params(timm.create_model("convnext_atto"))[0]
    assert not (out_dir / "benchmarks.md").exists()  # one model: the rows only


def test_entry_point_rejects_bad_amp(tmp_path) -> None:
    result = run_profile(["amp=fp4", "data.in_chans=1", "data.num_classes=10"], tmp_path)
    assert result.returncode != 0 and "amp must be one of" in result.stderr and "'fp4'" in result.stderr


def test_dense_profile_splits_backbone_and_head(tmp_path, monkeypatch, capsys) -> None:
    """``python -m chanzoo.profile task=segmentation model=resnet18 input_size=[...]``: backbone + head = the whole
    dense model, the backbone part is the ResNet-18 trunk without its classifier."""
    import json

    import timm
    from hydra import compose, initialize_config_dir

    from chanzoo.configs import CONFIG_DIR
    from chanzoo.profile import profile_dense

    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("profile", overrides=["task=segmentation", "model=resnet18", "input_size=[3,64,64]",
                                            "head_classes=11"])
    result = profile_dense(cfg)
    trunk = timm.create_model("resnet18", num_classes=0)
    assert result["backbone_params"] == sum(p.numel() for p in trunk.parameters())
    assert result["params"] == result["backbone_params"] + result["head_params"] and result["head_params"] > 0
    assert result["flops"] == result["backbone_flops"] + result["head_flops"] and result["head_flops"] > 0
    assert result["head_classes"] == 11 and result["input_size"] == [3, 64, 64]
    assert json.loads((tmp_path / "dense_profile.json").read_text()) == result
    assert "backbone" in capsys.readouterr().out
