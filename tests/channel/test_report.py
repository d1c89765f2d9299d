"""``python -m chanzoo.report``: a multirun folder in the pipeline's exact formats (Hydra-composed configs saved as
``.hydra/config.yaml``, metrics written by Lightning's ``CSVLogger``) gives the right table, CSV and chart."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

import chanzoo
from chanzoo import report
from chanzoo.channel.se import SqueezeExcite
from chanzoo.profile import count_flops
from chanzoo.configs import CONFIG_DIR

REPO = Path(__file__).resolve().parents[2]
ATTNS = ["none", "se", "eca"]
# best val/acc1 of each run; epochs log rising then falling accuracy so "best" differs from "last"
CURVES = {"none": [0.61, 0.70, 0.68], "se": [0.63, 0.74, 0.72], "eca": [0.60, 0.71, 0.73]}


@pytest.fixture(scope="module")
def multirun(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("multirun") / "2025-01-01_00-00-00"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        for job, attn in enumerate(ATTNS):
            cfg = compose("config", overrides=["model=small_cnn", f"model.attn={attn}"])
            run = folder / str(job)
            logger = CSVLogger(save_dir=str(run), name="", version="")
            for step, acc in enumerate(CURVES[attn]):
                logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=10 * step + 5)
                logger.log_metrics({"val/acc1": acc, "val/loss": 1 - acc, "epoch": step}, step=10 * step + 9)
            logger.save()
            (run / ".hydra").mkdir()
            OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return folder


def test_report_rows_and_files(multirun: Path, tmp_path: Path) -> None:
    rows = report.build_rows(multirun, batch_size=4, repeats=2)
    assert [r.module for r in rows] == ATTNS and [r.run for r in rows] == ["0", "1", "2"]
    assert [r.best_top1 for r in rows] == [max(CURVES[a]) for a in ATTNS]

    # params/FLOPs: the models the configs describe (small_cnn on 1-channel 28x28 Fashion-MNIST, 10 classes)
    models = {a: chanzoo.create_model("small_cnn", num_classes=10, in_chans=1, attn=a) for a in ATTNS}
    for row in rows:
        assert row.params == sum(p.numel() for p in models[row.module].parameters())
        assert row.throughput > 0
        assert (row.input_shape, row.batch_size) == ("1x28x28", 4)  # timed at the run's data size, not 224x224
    se_params = sum(p.numel() for m in models["se"].modules() if isinstance(m, SqueezeExcite) for p in m.parameters())
    assert rows[1].params - rows[0].params == se_params > 0
    for row in rows:
        flops, _ = count_flops(models[row.module].eval(), torch.zeros(1, 1, 28, 28))
        assert math.isclose(row.gmacs, flops / 2e9)

    md, table, png = report.write_report(rows, tmp_path)
    text = md.read_text()
    assert "| 1 | se |" in text and f"+{se_params:,}" in text and "74.00" in text
    assert "| throughput (img/s at 1x28x28, batch 4) |" in text
    with table.open() as handle:
        assert [r["module"] for r in csv.DictReader(handle)] == ATTNS
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_mixed_input_sizes_label_each_figure(multirun: Path) -> None:
    rows = report.build_rows(multirun, batch_size=2, repeats=1)[:2]
    rows[1].input_shape = "3x32x32"
    header, _, first, second = report.markdown_table(rows).splitlines()
    assert "| throughput (img/s at batch 2) |" in header
    assert f"| {rows[0].throughput:.1f} (1x28x28) |" in first and f"| {rows[1].throughput:.1f} (3x32x32) |" in second


def test_report_cli(multirun: Path, tmp_path: Path) -> None:
    report.main([str(multirun), "--out", str(tmp_path), "--batch-size", "2", "--repeats", "1"])
    assert {p.name for p in tmp_path.iterdir()} == {"report.md", "report.csv", "report.png"}


def test_report_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"multirun folder '.*nowhere' does not exist"):
        report.build_rows(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"holds no run \(no \*/\.hydra/config\.yaml\)"):
        report.build_rows(tmp_path)
