"""Every dense experiment file composes and takes one training step (plus validation and test) through
``chanzoo.run.train`` on tiny folders in the real COCO / ADE20K / fashion-paste layouts (built by
``tests/dense_fixtures.py`` and ``chanzoo.data.make_fashion_paste``)."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from chanzoo.configs import CONFIG_DIR
from chanzoo.data.make_fashion_paste import make_fashion_paste
from chanzoo.run import train
from dense_fixtures import make_ade20k, make_coco

ONE_STEP = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
            "data.batch_size=2", "data.num_workers=0", "model.pretrained=false", "model.pretrained_file=null"]
SMALL_DETECTOR = ["task.min_size=128", "task.max_size=160", "task.fpn_channels=32"]
# the COCO-layout fixture lists COCO's 80 categories; an untrained R-CNN keeps few proposals and detections
SMALL_RCNN = SMALL_DETECTOR + ["+task.head_kwargs={box_detections_per_img: 10, rpn_post_nms_top_n_test: 50}"]
SMALL_DAVIT = ["+model.kwargs.depths=[1,1,1,1]"]
# the set the test builds (the experiments build 8000/500/1000 images on first use and refuse a folder of other sizes)
FASHION_PASTE_SIZES = ["data.generate.train=4", "data.generate.val=2", "data.generate.test=2"]
EXPERIMENTS = {
    "eca_r50_faster_rcnn_coco": ("coco", SMALL_RCNN, "val/map_50"),
    "eca_r50_retinanet_coco": ("coco", SMALL_DETECTOR, "val/map_50"),
    "eca_r50_mask_rcnn_coco": ("coco", SMALL_RCNN + ["data.with_masks=true"], "val/mask_map_50"),
    "davit_tiny_mask_rcnn_coco": ("coco", SMALL_RCNN + SMALL_DAVIT + ["data.with_masks=true"], "val/mask_map"),
    "davit_tiny_upernet_ade20k": ("ade20k", SMALL_DAVIT + ["data.crop_size=128", "task.decoder_channels=32"],
                                  "val/miou"),
    "inception_next_tiny_upernet_ade20k": ("ade20k", ["data.crop_size=128", "task.decoder_channels=32"], "val/miou"),
    "fashion_paste_detection": ("fashion_paste", FASHION_PASTE_SIZES, "val/map_50"),
    "fashion_paste_segmentation": ("fashion_paste", FASHION_PASTE_SIZES, "val/miou"),
}


def _root(layout: str, tmp_path: Path) -> str:
    if layout == "fashion_paste":
        make_fashion_paste(tmp_path / "fashion_paste", train=4, val=2, test=2)
        return str(tmp_path / "fashion_paste")
    if layout == "coco":
        make_coco(tmp_path / "coco")
        return str(tmp_path / "coco")
    make_ade20k(tmp_path / "ade")
    return str(tmp_path / "ade" / "ADEChallengeData2016")


@pytest.mark.slow
@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_paper_experiment_composes_and_steps(experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout, overrides, metric = EXPERIMENTS[experiment]
    root = _root(layout, tmp_path)
    monkeypatch.chdir(tmp_path)  # the run's checkpoints and metrics.json go to the working directory
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=[f"experiment={experiment}", f"data.root={root}", *ONE_STEP, *overrides])
    metrics = train(cfg)
    assert metric in metrics and f"test/{metric.split('/')[1]}" in metrics, sorted(metrics)
    assert 0.0 <= metrics[metric] <= 1.0
    assert (tmp_path / "metrics.json").is_file()
    assert (tmp_path / "test_predictions.png").stat().st_size > 1000  # test images: ground truth and predictions
