"""Dense prediction under two-process DDP on CPU (gloo): the metrics the tasks report equal one process's, and
``train.py trainer=ddp`` trains, validates and tests a detector and a segmenter.

The metric check feeds one fixed set of predictions (fashion-paste test images: ground-truth boxes jittered,
instance masks shifted, some labels and semantic regions wrong, false positives added) to the tasks' own metric
objects, dealt unevenly over two ranks; what they compute after the cross-process sync must equal one process
scoring everything (box and mask mAP of Mask R-CNN's metric, mIoU and pixel accuracy)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from ddp_metric_worker import build_tasks, run_rank, score, shard

from chanzoo.data.make_fashion_paste import (
    FashionPasteDetectionDataModule,
    FashionPasteSegmentationDataModule,
    make_fashion_paste,
)
from support import only_run_dir, run_entry

SIZES = {"train": 8, "val": 5, "test": 7}  # odd evaluation sets: two ranks cannot split them evenly


@pytest.fixture(scope="module")
def fashion_paste(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp_dense") / "fashion_paste"
    make_fashion_paste(root, **SIZES)
    return root


def _fixed_predictions(root: Path) -> dict[str, list]:
    """Imperfect predictions for every test image, seeded: mAP and mIoU land well between 0 and 1."""
    gen = torch.Generator().manual_seed(0)
    det = FashionPasteDetectionDataModule(str(root), num_workers=0, with_masks=True)
    seg = FashionPasteSegmentationDataModule(str(root), num_workers=0)
    det.setup("test")
    seg.setup("test")
    det_preds, det_targets, seg_preds, seg_masks = [], [], [], []
    for index in range(len(det.test_set)):
        _, target = det.test_set[index]
        boxes = target["boxes"] + torch.randn(target["boxes"].shape, generator=gen) * 4
        labels = target["labels"].clone()
        wrong = torch.rand(len(labels), generator=gen) < 0.25
        labels[wrong] = torch.randint(1, 11, (int(wrong.sum()),), generator=gen)
        corner = torch.rand(2, 2, generator=gen) * 90
        extra = torch.cat([corner, corner + 16 + torch.rand(2, 2, generator=gen) * 20], 1)  # two false positives
        height, width = target["masks"].shape[-2:]
        extra_masks = torch.zeros(2, height, width)
        for mask, (x0, y0, x1, y1) in zip(extra_masks, extra.int().tolist()):
            mask[y0:y1, x0:x1] = 1.0
        shifted = target["masks"].float().roll(shifts=(2, -1), dims=(1, 2))  # masks a little off their objects
        det_preds.append({
            "boxes": torch.cat([boxes, extra]),
            "scores": torch.rand(len(boxes) + 2, generator=gen),
            "labels": torch.cat([labels, torch.randint(1, 11, (2,), generator=gen)]),
            "masks": torch.cat([shifted, extra_masks])[:, None],  # (N, 1, H, W) probabilities, as Mask R-CNN gives
        })
        det_targets.append(target)
        _, mask = seg.test_set[index]
        prediction = mask.clone()
        prediction[prediction == 255] = 0
        top, left = torch.randint(0, 96, (2,), generator=gen).tolist()
        prediction[top:top + 32, left:left + 32] = torch.randint(0, 11, (), generator=gen)
        seg_preds.append(prediction)
        seg_masks.append(mask)
    return {"det_preds": det_preds, "det_targets": det_targets, "seg_preds": seg_preds, "seg_masks": seg_masks}


@pytest.mark.slow
def test_detection_map_and_segmentation_miou_under_ddp_equal_one_process(fashion_paste: Path, tmp_path: Path) -> None:
    predictions = _fixed_predictions(fashion_paste)
    torch.save(predictions, tmp_path / "inputs.pt")
    mp.spawn(run_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "inputs.pt"), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    single = score(*build_tasks(), predictions)
    half = score(*build_tasks(), {key: shard(values, 0, 2) for key, values in predictions.items()})

    for key in ("det/bbox_map_50", "det/segm_map_50", "seg/miou"):
        assert 0.1 < single[key] < 0.95, (key, single)  # the check tells apart
    for key in ("det/bbox_map", "det/bbox_map_50", "det/segm_map", "det/bbox_mar_100", "seg/miou", "seg/pixel_acc"):
        assert half[key] != pytest.approx(single[key], abs=1e-4), f"{key}: one rank's share scores the same"
    for rank in ranks:
        assert rank.keys() == single.keys()
        for key, value in single.items():
            assert rank[key] == pytest.approx(value, abs=1e-6), (key, rank[key], value)


DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_epochs=1",
       "trainer.limit_train_batches=1", "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0",
       "sched.warmup_epochs=0", "data.batch_size=2", "data.num_workers=0", "trainer.precision=32-true"]


@pytest.mark.slow
@pytest.mark.parametrize(("experiment", "data", "small", "metrics"), [
    ("fashion_paste_detection", "fashion_paste_det", ["task.fpn_channels=32"], ("map", "map_50", "mar_100")),
    ("fashion_paste_segmentation", "fashion_paste_seg", ["task.decoder_channels=32"], ("miou", "pixel_acc")),
])
def test_ddp_trains_dense_task_and_its_test_metrics_match_one_process_eval(
    experiment: str, data: str, small: list[str], metrics: tuple[str, ...], fashion_paste: Path, tmp_path: Path,
) -> None:
    """One DDP training step, validation and test on 5 and 7 images; then eval.py in one process on the checkpoint
    the test used gives the same test metrics."""
    sizes = [f"data.generate.{split}={count}" for split, count in SIZES.items()]
    common = [f"data.root={fashion_paste}", *sizes]
    result = run_entry("train.py", [f"experiment={experiment}", f"run_name={experiment}", *common, *small, *DDP],
                       tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    run_dir = only_run_dir(tmp_path, experiment)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    under_ddp = json.loads((run_dir / "metrics.json").read_text())

    ckpt = run_dir / "checkpoints" / "best-epoch000.ckpt"
    single = run_entry("eval.py", [f"ckpt_path={ckpt}", f"data={data}", *common, "data.num_workers=0",
                                   "trainer.enable_progress_bar=false"], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    (eval_dir,) = (tmp_path / "eval").iterdir()
    one_process = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    for name in metrics:
        key = f"test/{name}"
        assert under_ddp[key] == pytest.approx(one_process[key], abs=1e-6), (key, under_ddp[key], one_process[key])
