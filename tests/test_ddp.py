"""Two-process DDP on CPU (gloo) through `trainer=ddp`: metrics synced across ranks, one set of checkpoints."""
import csv

import pytest
import torch

from chanzoo.data.fashion_mnist import MEAN, STD, FashionMNISTDataModule
from chanzoo.run import build_model
from support import only_run_dir, run_entry


@pytest.mark.slow
def test_two_process_ddp_syncs_metrics_and_writes_one_checkpoint(tmp_path):
    overrides = [
        "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "data.subset=1000", "trainer.max_epochs=1",
        "sched.warmup_epochs=0", "test_after_fit=false",
    ]
    result = run_entry("train.py", overrides, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    run_dir = only_run_dir(tmp_path, "small_cnn_fashion_mnist")
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["best-epoch000.ckpt", "last.ckpt"]  # rank 1 wrote nothing of its own

    # The logged validation accuracy is over the whole validation set (both ranks' halves), not one rank's half:
    # recompute it in one process from the saved weights.
    rows = [r for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get("val/acc1")]
    logged_acc = float(rows[-1]["val/acc1"])
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    model = build_model(ckpt["chanzoo_model_cfg"]).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    dm = FashionMNISTDataModule(subset=1000, seed=0)
    dm.setup()
    images, labels = dm.val_set.tensors
    assert len(labels) % 2 == 0  # no padding duplicates in the distributed sampler
    with torch.no_grad():
        predictions = model((images.float() / 255 - MEAN) / STD).argmax(1)
    assert logged_acc == pytest.approx((predictions == labels).float().mean().item(), abs=1e-6)
