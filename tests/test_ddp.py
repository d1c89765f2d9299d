"""Two-process DDP on CPU (gloo) through `trainer=ddp`: metrics synced across ranks, one set of checkpoints."""
import csv
import json

import pytest
import torch

from chanzoo.data.fashion_mnist import MEAN, STD, FashionMNISTDataModule
from chanzoo.run import build_model
from support import only_run_dir, run_entry


def _accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model((images.float() / 255 - MEAN) / STD).argmax(1) == labels).float().mean().item()


@pytest.mark.slow
def test_two_process_ddp_syncs_metrics_counts_each_sample_once_and_writes_one_checkpoint(tmp_path):
    """1005 images: 201 for validation and 201 for test, odd sizes that two ranks cannot split evenly. The logged
    val/test accuracies are over each whole set with every image counted exactly once: not one rank's half, and not
    the 202 images of a sampler that pads the second rank's share with a repeat of the first image."""
    overrides = [
        "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "data.subset=1005", "trainer.max_epochs=1",
        "sched.warmup_epochs=0", "trainer.enable_progress_bar=false",
    ]
    result = run_entry("train.py", overrides, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    run_dir = only_run_dir(tmp_path, "small_cnn_fashion_mnist")
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["best-epoch000.ckpt", "last.ckpt"]  # rank 1 wrote nothing of its own

    # recompute in one process from the saved weights
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    model = build_model(ckpt["chanzoo_model_cfg"]).eval()
    weights = ckpt["state_dict"].items()
    model.load_state_dict({k.removeprefix("model."): v for k, v in weights if k.startswith("model.")})
    dm = FashionMNISTDataModule(subset=1005, seed=0)
    dm.setup()
    rows = [r for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get("val/acc1")]
    test_acc = json.loads((run_dir / "metrics.json").read_text())["test/acc1"]
    logged = {"val": float(rows[-1]["val/acc1"]), "test": test_acc}
    for stage, dataset in (("val", dm.val_set), ("test", dm.test_set)):
        images, labels = dataset.tensors
        assert len(labels) == 201
        once = _accuracy(model, images, labels)
        padded = _accuracy(model, torch.cat([images, images[:1]]), torch.cat([labels, labels[:1]]))
        assert once != pytest.approx(padded, abs=1e-6)  # the two counts tell apart
        assert logged[stage] != pytest.approx(padded, abs=1e-6), f"{stage}: the first image was counted twice"
        assert logged[stage] == pytest.approx(once, abs=1e-6), (stage, logged[stage], once)
