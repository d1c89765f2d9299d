"""End-to-end: train.py writes a complete run folder and learns on real data; eval.py scores its checkpoint."""
import csv
import json

import pytest
import torch

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


def test_checkpoint_loads_with_weights_only(trained_run):
    _, run_dir, _ = trained_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["chanzoo_model_cfg"]["name"] == "small_cnn" and ckpt["epoch"] == 1


def test_fast_dev_run_sends_one_batch_through_fit_validate_and_test(tmp_path):
    """The README's ``trainer.fast_dev_run=true``: "one batch through everything", i.e. one training step, one
    validation batch and one test batch, each leaving its metrics in metrics.json."""
    result = run_entry("train.py", ["trainer.fast_dev_run=true"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "will run the requested loop using 1 batch(es)" in output
    assert "`max_steps=1` reached" in output  # exactly one optimisation step
    metrics = json.loads((only_run_dir(tmp_path, "small_cnn_fashion_mnist") / "metrics.json").read_text())
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
