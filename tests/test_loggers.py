"""Loggers and logs: each logger of the ``logger`` group writes the run's metrics, runs without a terminal print
progress lines, and Lightning's noise (FLOPs-0 summary, product tips, non-empty log folder) is gone."""
from __future__ import annotations

import csv
import os
import re
import struct
from pathlib import Path

import pytest

from chanzoo.progress import IntervalProgress, OneLineSummary, display_callbacks, instantiate_loggers
from support import only_run_dir, run_entry

TINY = ["data.subset=512", "data.batch_size=32", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
        "trainer.limit_test_batches=1", "sched.warmup_epochs=0", "accel.compile=false"]
NOISE = ("FLOPs", "💡 Tip", "seamless cloud", "exists and is not empty", "LeafSpec")


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """One short training on real Fashion-MNIST images with every logger, stdout a pipe (not a terminal)."""
    runs = tmp_path_factory.mktemp("runs")
    result = run_entry("train.py", [*TINY, "logger=[tensorboard,mlflow,wandb]", "progress_interval=0"], runs)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(runs, "small_cnn_fashion_mnist")
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    val_acc = [float(r["val/acc1"]) for r in rows if r.get("val/acc1")]
    assert len(val_acc) == 2  # one per epoch: the CSV logger, kept with the others, is the reference
    return runs, run_dir, result, val_acc


@pytest.mark.slow
def test_csv_stays_in_the_run_folder(logged_run):
    _, run_dir, _, _ = logged_run
    assert (run_dir / "hparams.yaml").is_file()
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn from metrics.csv


@pytest.mark.slow
def test_tensorboard_events_hold_the_metric(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _, val_acc = logged_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("val/acc1")] == pytest.approx(val_acc, abs=1e-6)


@pytest.mark.slow
def test_mlflow_file_store_holds_the_metric(logged_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    _, run_dir, _, val_acc = logged_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{run_dir / 'mlruns'}")
    experiment = client.get_experiment_by_name("small_cnn_fashion_mnist")
    (run,) = client.search_runs([experiment.experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "val/acc1"), key=lambda m: m.step)
    assert [m.value for m in history] == pytest.approx(val_acc, abs=1e-6)


def _wandb_records(path: Path):
    """The records of a W&B ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose records
    (crc32, length, type) hold protobuf ``Record``s, split across blocks as FIRST/MIDDLE/LAST pieces."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metric(logged_run):
    _, run_dir, result, val_acc = logged_run
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = [{item.key or "/".join(item.nested_key): float(item.value_json) for item in r.history.item}
               for r in _wandb_records(run_file) if r.WhichOneof("record_type") == "history"]
    assert [h["val/acc1"] for h in history if "val/acc1" in h] == pytest.approx(val_acc, abs=1e-6)
    assert "offline" in result.stdout + result.stderr


@pytest.mark.slow
def test_progress_lines_without_a_terminal(logged_run):
    _, run_dir, result, val_acc = logged_run
    steps = re.findall(r"epoch (\d)/2  step (\d)/3 \(\d+%\)  train/loss_step [\d.]+  [\d.]+ it/s  elapsed [\d:]+  "
                       r"eta epoch [\d:]+, fit [\d:]+", result.stdout)
    assert [(int(e), int(s)) for e, s in steps] == [(e, s) for e in (1, 2) for s in (1, 2, 3)]  # interval 0
    epochs = re.findall(r"epoch (\d)/2 done in [\d:]+  train/loss_epoch [\d.]+  val/acc1 ([\d.]+)", result.stdout)
    assert [float(acc) for _, acc in epochs] == pytest.approx(val_acc, abs=1e-4)
    assert "test 1/1" in result.stdout
    assert "epoch 1/2  step 1/3" in (run_dir / "train.log").read_text()  # the job log has them too
    output = result.stdout + result.stderr
    assert "\r" not in output and "Epoch 0" not in output  # no Lightning bar (TQDM or Rich) redrawn into the file
    summary = re.search(r"([\d.]+ K) parameters \(\1 trainable, [\d.]+ MB\): model \(SmallCNN, \1\)", result.stdout)
    assert summary, result.stdout[:3000]


@pytest.mark.slow
def test_no_lightning_noise_in_train_and_eval(logged_run):
    runs, run_dir, result, _ = logged_run
    best = next((run_dir / "checkpoints").glob("best-epoch*.ckpt"))
    evaluated = run_entry("eval.py", [f"ckpt_path={best}", "data.subset=512", "trainer.limit_test_batches=1"], runs)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    for output in (result.stdout + result.stderr, evaluated.stdout + evaluated.stderr):
        found = [text for text in NOISE if text in output]
        assert not found, found


def test_terminal_gets_the_tqdm_bar(monkeypatch):
    from lightning.pytorch.callbacks import TQDMProgressBar

    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    chosen = display_callbacks({"enable_progress_bar": True}, [])
    assert [type(c) for c in chosen] == [TQDMProgressBar, OneLineSummary]
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert [type(c) for c in display_callbacks({"enable_progress_bar": True}, [], 5.0)] == [IntervalProgress,
                                                                                          OneLineSummary]
    assert display_callbacks({"enable_progress_bar": False, "enable_model_summary": False}, []) == []


def test_logger_config_errors_name_the_entry(tmp_path):
    with pytest.raises(ValueError, match=r"logger.tb has no _target_"):
        instantiate_loggers({"tb": {"save_dir": "tb"}}, tmp_path)
    with pytest.raises(ValueError, match=r"interval must be >= 0 seconds, got -1"):
        IntervalProgress(-1)
    assert os.listdir(tmp_path) == []


def test_run_folder_csv_logger_warns_only_before_replacing_metrics(tmp_path, recwarn):
    from chanzoo.progress import RunFolderCSVLogger

    (tmp_path / ".hydra").mkdir()
    (tmp_path / "train.log").write_text("Hydra's job log\n")
    logger = RunFolderCSVLogger(save_dir=str(tmp_path))
    logger.log_metrics({"train/loss": 0.5}, step=0)
    logger.save()
    assert not [w for w in recwarn if "not empty" in str(w.message) or "replaced" in str(w.message)]
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert rows == [{"step": "0", "train/loss": "0.5"}]
    with pytest.warns(UserWarning, match=r"metrics.csv exists and will be replaced"):
        _ = RunFolderCSVLogger(save_dir=str(tmp_path)).experiment  # creating the writer is what warns
    assert not (tmp_path / "metrics.csv").exists()
