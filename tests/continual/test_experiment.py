"""End to end: ``python train.py -m experiment=clr_digits task.method=...`` then ``python -m chanzoo.report`` on the
multirun; the methods share one anchor trained on the first task."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from chanzoo import report
from support import run_entry

TINY = ["continual.data.img_size=16", "continual.classes_per_task=5", "trainer.max_epochs=1",
        "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "task.anchor.epochs=1",
        "trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_clr_digits_multirun_and_report(tmp_path: Path) -> None:
    done = run_entry("train.py", ["-m", "experiment=clr_digits", "task.method=clr,finetune", *TINY], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    multirun = next((tmp_path / "multirun").iterdir())
    results = [json.loads((multirun / str(job) / "continual.json").read_text()) for job in (0, 1)]
    clr, finetune = results
    assert (clr["method"], finetune["method"]) == ("clr", "finetune")
    assert clr["exact_zero_forgetting"] and clr["bwt"] == 0.0 and clr["regularizer"] == 1e-5
    assert clr["accuracy"][1][0] == clr["accuracy"][0][0] and clr["accuracy"][0][1] is None
    assert [t["classes"] for t in clr["tasks"]] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert "cached" not in clr["anchor"] and finetune["anchor"]["cached"].endswith(".safetensors")
    assert finetune["anchor"]["test_acc"] == clr["anchor"]["test_acc"]
    for job in (0, 1):
        run = multirun / str(job)
        assert (run / "accuracy_matrix.png").read_bytes()[:4] == b"\x89PNG"
        assert json.loads((run / "metrics.json").read_text())["continual/avg_acc"] == pytest.approx(
            100 * results[job]["avg_acc"])
    assert len(list((multirun / "0" / "tasks").glob("*.safetensors"))) == 2


    report.main([str(multirun), "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| clr (reduced_v1) |" in text and "| finetune |" in text and text.count("after \\ on") == 2
    with (tmp_path / "report" / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["clr (reduced_v1)", "finetune"]
    assert float(rows[0]["avg_acc"]) == pytest.approx(100 * clr["avg_acc"])
    assert rows[0]["exact_zero_forgetting"] == "True"
    assert (tmp_path / "report" / "report.png").read_bytes()[:4] == b"\x89PNG"
