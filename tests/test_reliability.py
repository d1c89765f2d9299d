"""Bad inputs and faults end early with one line naming the cause and a non-zero exit; good checkpoints survive.

End-to-end cases run ``train.py`` / ``eval.py`` / ``python -m chanzoo.restore`` on tiny Fashion-MNIST subsets.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import chanzoo
from chanzoo import hub
from chanzoo.callbacks import (
    AtomicCheckpointIO,
    FiniteModelCheckpoint,
    batches_per_device,
    clean_stale_temp_files,
    nonfinite_tensors,
    plot_metrics_csv,
    zero_batches_message,
)
from chanzoo.tasks.guard import NonFiniteError
from support import FASHION_MNIST, REPO, run_entry

TINY = ["data.subset=400", "data.batch_size=32", "trainer.enable_progress_bar=false", "accel.compile=false"]


def _run_dirs(runs: Path) -> list[Path]:
    return sorted(p.parent for p in runs.glob("*/*/.hydra"))


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    """The run failed with exit 1 and a single 'error: ...' line, without a traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "During handling" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def _finite(ckpt: Path) -> bool:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return not nonfinite_tensors(state)


def _fashion_images(count: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(FASHION_MNIST / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_MNIST / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images[offset : offset + count], labels[offset : offset + count]


def _two_class_folder(root: Path, per_class: int = 24) -> Path:
    """An ImageNet-layout folder of Fashion-MNIST trousers and sneakers (2 classes)."""
    images, labels = _fashion_images(3000)
    for split, start in (("train", 0), ("val", per_class)):
        for label, name in ((1, "trouser"), (7, "sneaker")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, image in enumerate(images[labels == label][start : start + per_class]):
                Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root


# ------------------------------------------------------------------------------------------ unit-level checks
def test_atomic_checkpoint_follows_umask_and_refuses_nonfinite_weights(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    old = os.umask(0o022)
    try:
        io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # mkstemp's 0600 before
    with pytest.raises(NonFiniteError, match=r"refusing to write checkpoint .*last.ckpt: 1 weight tensor\(s\).*'w'"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, math.nan])}, "epoch": 1}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_stale_temporary_files_are_removed_and_checkpoints_kept(tmp_path):
    (tmp_path / ".last.ckpt.0123abcd.tmp").write_bytes(b"torn")
    (tmp_path / "best-epoch000.ckpt").write_bytes(b"kept")
    removed = clean_stale_temp_files(tmp_path)
    assert [p.name for p in removed] == [".last.ckpt.0123abcd.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["best-epoch000.ckpt"]


def test_nan_score_is_never_ranked_best(tmp_path):
    import lightning as L

    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    callback = FiniteModelCheckpoint(dirpath=tmp_path, monitor="val/acc1", mode="max", save_top_k=1)
    assert not callback.check_monitor_top_k(trainer, torch.tensor(math.nan))  # even with no best yet
    callback.best_k_models = {"best.ckpt": torch.tensor(0.8)}
    callback.kth_best_model_path = "best.ckpt"
    assert not callback.check_monitor_top_k(trainer, torch.tensor(math.nan))
    assert not callback.check_monitor_top_k(trainer, torch.tensor(math.inf))
    assert callback.check_monitor_top_k(trainer, torch.tensor(0.9))


def test_batches_per_device_counts_drop_last_and_devices():
    images, labels = _fashion_images(10)
    data = TensorDataset(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))
    assert batches_per_device(DataLoader(data, batch_size=4, drop_last=True), 1) == 2
    assert batches_per_device(DataLoader(data, batch_size=16, drop_last=True), 1) == 0
    assert batches_per_device(DataLoader(data, batch_size=16, drop_last=False), 1) == 1
    # 4 devices: 3 samples each, fewer than a batch of 4 (Lightning shards a plain sampler itself)
    assert batches_per_device(DataLoader(data, batch_size=4, drop_last=True), 4) == 0
    sharded = DataLoader(data, batch_size=4, drop_last=True, sampler=DistributedSampler(data, num_replicas=4, rank=0))
    assert batches_per_device(sharded, 4) == 0
    message = zero_batches_message(sharded, 4)
    assert "batch size 4" in message and "10 training samples" in message and "4 device(s)" in message
    assert "at least 16 training samples" in message


def test_weights_of_another_architecture_or_no_torch_file_are_refused(tmp_path, caplog):
    small = chanzoo.create_model("small_cnn", num_classes=10, in_chans=1)
    torch.save(small.state_dict(), tmp_path / "small.pth")
    torch.save(chanzoo.create_model("resnet18", num_classes=10).state_dict(), tmp_path / "resnet18.pth")
    with caplog.at_level("INFO", logger="chanzoo.hub"):
        assert hub.report_loaded(small, tmp_path / "small.pth") == (38, 38)
    assert "loaded 38 of 38 tensors of SmallCNN" in caplog.text
    with pytest.raises(ValueError, match=r"resnet18.pth' does not fit SmallCNN: none of its 122 tensors"):
        hub.report_loaded(small, tmp_path / "resnet18.pth")
    (tmp_path / "notes.pth").write_text("these are not weights")
    with pytest.raises(ValueError, match=r"pretrained_file='.*notes.pth' is not a torch weights file"):
        hub.report_loaded(small, tmp_path / "notes.pth")


def test_tasks_declare_their_monitor_and_run_tags_tell_models_apart():
    from hydra import compose, initialize_config_dir

    from chanzoo.configs import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=rgt_s_x2"])
        classification = compose("config")
        eca = compose("config", overrides=["model.attn=eca"])
        eca_weights = compose("config", overrides=["model.attn=eca", "model.pretrained_file=weights.pth",
                                                   "accel.compile=true"])
    assert cfg.callbacks.checkpoint.monitor == "val/psnr" and cfg.optimized_metric == "best/val/psnr"
    assert classification.callbacks.checkpoint.monitor == "val/acc1"
    # run folders end in a hash of the model config: another channel module, another folder; weights and compile do not
    assert len(classification.run_tag) == 7 and classification.run_tag != eca.run_tag == eca_weights.run_tag


# ------------------------------------------------------------------------------------------------ command line
@pytest.mark.slow
def test_mistyped_key_gets_close_match_and_exit_1(tmp_path):
    result = run_entry("train.py", ["trainer.max_epoch=3"], tmp_path)
    line = _one_line_error(result)
    assert "'trainer.max_epoch'" in line and "did you mean trainer.max_epochs?" in line
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing ran, no run folder
    result = run_entry("eval.py", ["data.batchsize=3"], tmp_path)
    assert "did you mean data.batch_size" in _one_line_error(result)


@pytest.mark.slow
def test_unwritable_run_folder_is_refused_before_any_work(tmp_path):
    result = run_entry("train.py", ["hydra.run.dir=/proc/chanzoo_run"], tmp_path)
    line = _one_line_error(result)
    assert "hydra.run.dir='/proc/chanzoo_run' is not writable" in line
    assert "Fashion-MNIST" not in result.stderr  # failed before the data was read


@pytest.mark.slow
def test_nan_stops_with_message_and_keeps_the_good_checkpoints(tmp_path):
    # lr x 1e9 from epoch 1 on: epoch 0 trains well, then the loss diverges
    diverging = ["sched=multistep", "sched.decay_milestones=[1]", "sched.decay_rate=1e9", "test_after_fit=false"]
    result = run_entry("train.py", [*TINY, "trainer.max_epochs=3", *diverging], tmp_path)
    line = _one_line_error(result)
    [run] = _run_dirs(tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    assert "non-finite" in line and "at epoch 1, step" in line and f"Last finite checkpoint: {last}" in line
    assert "task.on_nonfinite=skip" in line
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in ckpts] == ["best-epoch000.ckpt", "last.ckpt"]
    for ckpt in ckpts:
        assert _finite(ckpt), ckpt
        assert torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"] == 0
    assert not (run / "metrics.json").exists()


@pytest.mark.slow
def test_nonfinite_skip_keeps_weights_finite(tmp_path):
    result = run_entry("train.py", [*TINY, "trainer.max_epochs=1", "optim.lr=1e6", "task.on_nonfinite=skip"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "step skipped" in log and "task.on_nonfinite=skip" in log
    ckpts = list(tmp_path.glob("*/*/checkpoints/*.ckpt"))
    assert ckpts and all(_finite(c) for c in ckpts)


@pytest.mark.slow
def test_last_ckpt_is_newest_state_and_curves_hold_every_epoch(tmp_path):
    # mode=min ranks the lowest accuracy best: later (better) epochs are not saved as best
    overrides = [*TINY, "trainer.max_epochs=3", "callbacks.checkpoint.mode=min", "test_after_fit=false"]
    result = run_entry("train.py", overrides, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = _run_dirs(tmp_path)
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    steps_per_epoch = (400 - 80) // 32
    assert last["epoch"] == 2 and last["global_step"] == 3 * steps_per_epoch
    best = list((run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1
    # curves.png is the plot of the complete metrics.csv
    replot = plot_metrics_csv(run / "metrics.csv", tmp_path / "replot.png")
    assert np.array_equal(np.asarray(Image.open(run / "curves.png")), np.asarray(Image.open(replot)))


@pytest.mark.slow
def test_one_epoch_curves_are_not_empty(tmp_path):
    result = run_entry("train.py", [*TINY, "trainer.max_epochs=1", "test_after_fit=false"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = _run_dirs(tmp_path)
    assert "train/loss_epoch" in (run / "metrics.csv").read_text()
    replot = plot_metrics_csv(run / "metrics.csv", tmp_path / "replot.png")
    assert np.array_equal(np.asarray(Image.open(run / "curves.png")), np.asarray(Image.open(replot)))


@pytest.mark.slow
def test_batch_larger_than_data_is_an_error_before_training(tmp_path):
    result = run_entry("train.py", ["data.subset=200", "data.batch_size=256", "trainer.enable_progress_bar=false"],
                       tmp_path)
    line = _one_line_error(result)
    assert "batch size 256" in line and "160 training samples" in line and "1 device(s)" in line
    assert not list(tmp_path.glob("*/*/metrics.json")) and not list(tmp_path.glob("*/*/checkpoints/*.ckpt"))


@pytest.mark.slow
def test_image_folder_classes_set_the_head_and_a_mismatch_is_named(tmp_path):
    root = _two_class_folder(tmp_path / "data")
    data = ["data=image_folder", f"data.root={root}", "data.img_size=28", "data.num_workers=0", "data.batch_size=8",
            "model=small_cnn", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "accel.compile=false"]
    result = run_entry("train.py", data, tmp_path / "runs")
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = _run_dirs(tmp_path / "runs")
    metrics = json.loads((run / "metrics.json").read_text())
    assert "test/acc1" in metrics and not any("acc5" in k for k in metrics)  # no top-5 of 2 classes
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["chanzoo_model_cfg"]["num_classes"] == 2
    assert ckpt["state_dict"]["model.head.fc.weight"].shape[0] == 2

    line = _one_line_error(run_entry("train.py", [*data, "model.num_classes=5"], tmp_path / "runs"))
    assert "model.num_classes=5 but data 'image_folder' has 2 classes" in line
    line = _one_line_error(run_entry("train.py", [*data, "data.num_classes=10"], tmp_path / "runs"))
    assert "data.num_classes=10" in line and "has 2 class folders" in line


@pytest.mark.slow
def test_corrupt_image_is_named_in_one_line_and_verify_finds_it_at_setup(tmp_path):
    root = _two_class_folder(tmp_path / "data")
    bad = root / "train" / "sneaker" / "005.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    data = ["data=image_folder", f"data.root={root}", "data.img_size=28", "data.num_workers=0", "data.batch_size=8",
            "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "accel.compile=false"]
    line = _one_line_error(run_entry("train.py", data, tmp_path / "runs"))
    assert f"corrupt or unreadable image file {bad}" in line
    result = run_entry("train.py", [*data, "data.verify=true"], tmp_path / "runs2")
    line = _one_line_error(result)
    assert f"corrupt or unreadable image file {bad}" in line and "verifying train" in result.stdout + result.stderr
    assert not list((tmp_path / "runs2").glob("*/*/checkpoints"))


@pytest.mark.slow
def test_pretrained_file_of_another_model_or_no_torch_file_stops_the_run(tmp_path):
    torch.save(chanzoo.create_model("resnet18", num_classes=10).state_dict(), tmp_path / "resnet18.pth")
    (tmp_path / "notes.pth").write_text("not weights")
    base = [*TINY, "trainer.max_epochs=1", "model.num_classes=7", "data.num_classes=7"]
    line = _one_line_error(run_entry("train.py", [*base, f"model.pretrained_file={tmp_path / 'resnet18.pth'}"],
                                     tmp_path / "runs"))
    assert "resnet18.pth' does not fit SmallCNN" in line
    line = _one_line_error(run_entry("train.py", [*TINY, f"model.pretrained_file={tmp_path / 'notes.pth'}"],
                                     tmp_path / "runs"))
    assert "notes.pth' is not a torch weights file" in line


@pytest.mark.slow
def test_resume_with_another_model_names_both_configs(tmp_path):
    first = run_entry("train.py", [*TINY, "trainer.max_epochs=1", "test_after_fit=false"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    [last] = tmp_path.glob("*/*/checkpoints/last.ckpt")
    line = _one_line_error(run_entry("train.py", [*TINY, "model.attn=eca", f"resume={last}"], tmp_path))
    assert "'attn': 'se'" in line and "'attn': 'eca'" in line and "do not fit" in line
    assert "Missing key(s)" not in line


@pytest.mark.slow
def test_monitor_the_task_does_not_log_is_an_error_before_training(tmp_path):
    line = _one_line_error(run_entry("train.py", [*TINY, "callbacks.checkpoint.monitor=val/psnr"], tmp_path))
    assert "callbacks.checkpoint.monitor='val/psnr' is not logged by ClassificationTask" in line
    assert "'val/acc1'" in line


@pytest.mark.slow
def test_fast_dev_run_runs_the_test_stage(tmp_path):
    result = run_entry("train.py", [*TINY, "trainer.fast_dev_run=true"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [metrics] = tmp_path.glob("*/*/metrics.json")
    payload = json.loads(metrics.read_text())
    assert 0.0 <= payload["test/acc1"] <= 1.0 and math.isfinite(payload["test/loss"])


@pytest.mark.slow
def test_restore_refuses_random_weights_and_unwritable_output_before_inference(tmp_path):
    from skimage import data

    Image.fromarray(data.astronaut()[::16, ::16]).save(tmp_path / "in.png")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "chanzoo.restore", "model=rgt_s_x2", f"input={tmp_path / 'in.png'}"]

    def restore(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    line = _one_line_error(restore(f"output={tmp_path / 'out.png'}"))
    assert "has no weights" in line and "allow_random_weights=true" in line
    assert not (tmp_path / "out.png").exists()
    line = _one_line_error(restore("output=/proc/chanzoo/out.png", "allow_random_weights=true"))
    assert "output='/proc/chanzoo' is not writable" in line
    tiny = ["+model.kwargs.embed_dim=12", "+model.kwargs.num_heads=2", "+model.kwargs.depth=[1]",
            "allow_random_weights=true", "progress=false", f"output={tmp_path / 'out.png'}"]
    result = restore(*tiny)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "out.png").size == (64, 64)


def test_finite_check_accepts_empty_tensors() -> None:
    """Models can hold zero-element parameters (RGT at small widths): they must not break the non-finite guard."""
    from chanzoo.tasks.guard import _all_finite

    assert _all_finite([torch.zeros(0), torch.ones(3)])
    assert _all_finite([torch.zeros(0)])
    assert not _all_finite([torch.zeros(0), torch.tensor([1.0, float("nan")])])
    assert not _all_finite([torch.tensor([float("inf")])])


def test_finite_check_by_sums_has_no_false_alarm_in_half_precision() -> None:
    """The guard sums each tensor: half-precision gradients whose fp16 sum would overflow (100k x 60000) are still
    finite, and a NaN or inf anywhere, of either sign, in any dtype, is caught."""
    from chanzoo.tasks.guard import _all_finite

    assert _all_finite([torch.full((100_000,), 60_000.0, dtype=torch.float16)])
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for bad in (float("nan"), float("inf"), float("-inf")):
            assert not _all_finite([torch.ones(5, dtype=dtype), torch.tensor([1.0, bad, -1.0], dtype=dtype)])
