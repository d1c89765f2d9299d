"""End-to-end: train.py writes a complete run folder and learns on real data; eval.py scores its checkpoint."""
import csv
import json
import re

import pytest
import torch

from chanzoo.acceleration import native_bf16
from chanzoo.run import build_model
from support import only_run_dir, run_entry

QUICK = ["data.subset=3000", "trainer.max_epochs=2", "data.batch_size=64", "sched.warmup_epochs=0"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = run_entry("train.py", QUICK, runs)
    assert result.returncode == 0, result.stderr[-3000:]
    return runs, only_run_dir(runs, "small_cnn_fashion_mnist"), result


def test_run_folder_holds_config_metrics_checkpoints_and_curves(trained_run):
    runs, run_dir, result = trained_run
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(name.startswith("best-epoch") for name in ckpts), ckpts
    png = (run_dir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"test/acc1", "test/acc5", "best/val/acc1"} <= set(metrics)
    output = result.stdout + result.stderr
    assert "final metrics" in output and "test/acc1" in output  # the closing table


def test_loss_falls_and_model_beats_chance_on_real_images(trained_run):
    _, run_dir, _ = trained_run
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    val_loss = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val_loss) == 2 and val_loss[1] < val_loss[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/acc1"] > 0.6  # 10 classes: chance is 0.1


def test_eval_scores_the_checkpoint_and_writes_json(trained_run):
    runs, run_dir, _ = trained_run
    best = next((run_dir / "checkpoints").glob("best-epoch*.ckpt"))
    result = run_entry("eval.py", [f"ckpt_path={best}", "data.subset=3000"], runs)
    assert result.returncode == 0, result.stderr[-3000:]
    eval_dir = only_run_dir(runs, "eval")
    payload = json.loads((eval_dir / "metrics.json").read_text())
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert payload["model"] == "small_cnn" and payload["ckpt_path"] == str(best)
    assert payload["metrics"]["test/acc1"] == pytest.approx(trained["test/acc1"], abs=1e-6)
    # trainer.precision=auto: eval.py scores in the precision the checkpoint was trained in (bf16 where native)
    trained_in = torch.load(best, map_location="cpu", weights_only=True)["chanzoo_precision"]
    assert trained_in == ("bf16-mixed" if native_bf16() else "32-true")
    assert f"trainer.precision=auto: {trained_in} (the precision the checkpoint was trained in)" in (
        result.stdout + result.stderr)


def test_checkpoint_loads_with_weights_only(trained_run):
    _, run_dir, _ = trained_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["chanzoo_model_cfg"]["name"] == "small_cnn" and ckpt["epoch"] == 1


def test_fast_dev_run_sends_one_batch_through_fit_validate_and_test(tmp_path):
    """The README's ``trainer.fast_dev_run=true``: "one batch through everything", i.e. one training step, one
    validation batch and one test batch, each leaving its metrics in metrics.json."""
    result = run_entry("train.py", ["trainer.fast_dev_run=true"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((only_run_dir(tmp_path, "small_cnn_fashion_mnist") / "metrics.json").read_text())
    assert metrics["train/loss_epoch"] == metrics["train/loss_step"]  # the epoch's mean is one step's loss
    eval_batch = 512  # data.eval_batch_size of configs/data/fashion_mnist.yaml
    for stage in ("val", "test"):
        assert {f"{stage}/loss", f"{stage}/acc1", f"{stage}/acc5"} <= set(metrics), (stage, sorted(metrics))
        for name in ("acc1", "acc5"):  # accuracies over one batch of 512 images: whole multiples of 1/512
            correct = metrics[f"{stage}/{name}"] * eval_batch
            assert correct == pytest.approx(round(correct), abs=1e-3) and 0 < correct < eval_batch, (stage, name)
        assert 1.5 < metrics[f"{stage}/loss"] < 3.5  # an untrained 10-way classifier: about ln 10 = 2.30
    assert 1.5 < metrics["train/loss"] < 3.5


def test_bad_config_names_list_what_is_allowed(tmp_path):
    result = run_entry("train.py", ["data=fashion_mnst"], tmp_path)
    assert result.returncode != 0
    assert "fashion_mnst" in result.stderr and "fashion_mnist" in result.stderr
    result = run_entry("train.py", ["model.name=small_cn", "trainer.fast_dev_run=true"], tmp_path)
    assert result.returncode != 0 and "unknown model 'small_cn'" in result.stderr and "'small_cnn'" in result.stderr
    result = run_entry("train.py", ["model=resnet18", "trainer.fast_dev_run=true", "model.in_chans=3"], tmp_path)
    assert result.returncode != 0
    assert "model in_chans=3 but data 'fashion_mnist' has 1 channel" in result.stderr


# A restoration run: a small RGT x2 for four steps on the bundled-photo SR data (validated on two whole photos).
SR_MODEL = ["model=rgt_s_x2", "+model.kwargs.embed_dim=16", "+model.kwargs.num_heads=2", "+model.kwargs.depth=[1]",
            "+model.kwargs.split_size=[4,16]"]
SR_RUN = [*SR_MODEL, "data=sr_bicubic_skimage", "data.patch_size=16", "data.batch_size=4", "trainer.max_epochs=1",
          "trainer.limit_train_batches=4", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
          "callbacks.checkpoint.monitor=val/psnr_y", "optimized_metric=best/val/psnr_y", "test_after_fit=false"]


@pytest.fixture(scope="module")
def restoration_ckpt(tmp_path_factory):
    runs = tmp_path_factory.mktemp("sr_runs")
    result = run_entry("train.py", SR_RUN, runs)
    assert result.returncode == 0, result.stderr[-3000:]
    return runs, only_run_dir(runs, "rgt_s_x2_sr_bicubic_skimage") / "checkpoints" / "last.ckpt"


def _restoration_metrics_in_process(ckpt_path) -> dict[str, float]:
    """The checkpoint's model rebuilt here and scored image by image on sr_bicubic_skimage's test (= val) photos."""
    from chanzoo.data.restoration import BicubicSRDataModule
    from chanzoo.tasks.restoration import RestorationTask, restoration_metrics

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model = build_model(ckpt["chanzoo_model_cfg"]).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    dm = BicubicSRDataModule(val=["skimage:chelsea", "skimage:colorwheel"], num_workers=0)
    dm.set_model(model)
    dm.setup("test")
    task = RestorationTask(model, optim={"name": "adam"}, sched={"name": "none"})
    metrics = restoration_metrics()
    with torch.no_grad():
        for i in range(len(dm.test_set)):
            lq, gt = dm.test_set[i]
            task.update_metrics(metrics, model(lq[None]), gt[None])
    return {f"test/{k}": float(v) for k, v in metrics.compute().items()}


@pytest.mark.slow
@pytest.mark.parametrize("task", [["task=restoration"], []], ids=["task_given", "task_from_checkpoint"])
def test_eval_py_scores_a_restoration_checkpoint_written_by_train_py(restoration_ckpt, tmp_path, task):
    """eval.py on train.py's RGT checkpoint: PSNR/SSIM (Y and RGB) equal to the checkpoint's model scored here; the
    checkpoint alone says it holds a restoration model, as it says which model (``task=`` need not be repeated)."""
    _, ckpt_path = restoration_ckpt
    result = run_entry("eval.py", [f"ckpt_path={ckpt_path}", "data=sr_bicubic_skimage", *task,
                                   "trainer.enable_progress_bar=false"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((only_run_dir(tmp_path, "eval") / "metrics.json").read_text())
    assert payload["model"] == "rgt_s_x2" and payload["ckpt_path"] == str(ckpt_path)
    expected = _restoration_metrics_in_process(ckpt_path)
    for name, value in expected.items():
        assert payload["metrics"][name] == pytest.approx(value, abs=1e-4), name
    assert 15 < expected["test/psnr_y"] < 40


@pytest.mark.slow
def test_eval_py_names_a_missing_checkpoint_or_one_without_model_config(restoration_ckpt, tmp_path):
    _, ckpt_path = restoration_ckpt
    missing = tmp_path / "no_such_run" / "last.ckpt"
    result = run_entry("eval.py", [f"ckpt_path={missing}", "data=sr_bicubic_skimage"], tmp_path / "runs")
    assert result.returncode != 0
    assert str(missing) in result.stderr and re.search("no such|not found|does not exist", result.stderr)
    assert not (tmp_path / "runs" / "eval").exists() or not list((tmp_path / "runs" / "eval").rglob("metrics.json"))

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    del ckpt["chanzoo_model_cfg"]
    bare = tmp_path / "without_model_config.ckpt"
    torch.save(ckpt, bare)
    result = run_entry("eval.py", [f"ckpt_path={bare}", "data=sr_bicubic_skimage", "task=restoration"],
                       tmp_path / "runs")
    assert result.returncode != 0
    assert str(bare) in result.stderr and "model config" in result.stderr
    assert not list((tmp_path / "runs").rglob("metrics.json"))
