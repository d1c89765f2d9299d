"""The fashion-paste generator: its constraints, its COCO / index-PNG output and the loaders reading it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from chanzoo.configs import CONFIG_DIR
from chanzoo.data.fashion_mnist import CLASSES
from chanzoo.data.make_fashion_paste import PHOTOS, ensure_fashion_paste, main, make_fashion_paste
from chanzoo.run import build_datamodule

COUNTS = {"train": 160, "val": 30, "test": 40}


@pytest.fixture(scope="module")
def paste(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fashion_paste")
    make_fashion_paste(out, **COUNTS, seed=3)
    return out, {s: json.loads((out / "annotations" / f"instances_{s}.json").read_text()) for s in COUNTS}


def test_constraints(paste: tuple[Path, dict]) -> None:
    _, data = paste
    train = data["train"]
    assert [c["name"] for c in train["categories"]] == list(CLASSES)
    assert {a["category_id"] for a in train["annotations"]} == set(range(1, 11))  # all 10 classes
    for split, coco in data.items():
        assert len(coco["images"]) == COUNTS[split]
        assert len(coco["annotations"]) / len(coco["images"]) >= 2.0  # >= 2 objects per image on average
        assert all(img["width"] >= 128 and img["height"] >= 128 for img in coco["images"])
        sides = np.array([a["bbox"][2:] for a in coco["annotations"]])
        assert sides.min() >= 20 and sides.max() <= 64
    photos = {s: {img["photo"] for img in coco["images"]} for s, coco in data.items()}
    assert photos["train"] <= set(PHOTOS["train"]) and len(photos["train"]) > 5
    assert not photos["train"] & (photos["val"] | photos["test"])  # held-out images use other photos


def test_masks_boxes_and_index_pngs_agree(paste: tuple[Path, dict]) -> None:
    out, data = paste
    for split in ("train", "test"):
        coco = COCO(str(out / "annotations" / f"instances_{split}.json"))  # loads in pycocotools
        assert sorted(coco.getCatIds()) == list(range(1, 11))
        for img in data[split]["images"][:40]:
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            index = np.asarray(Image.open(out / "masks" / split / img["file_name"].replace(".jpg", ".png")))
            assert Image.open(out / "masks" / split / img["file_name"].replace(".jpg", ".png")).mode == "P"
            union = np.zeros_like(index, dtype=bool)
            for ann in anns:
                mask = coco.annToMask(ann).astype(bool)
                assert mask_utils.toBbox(ann["segmentation"]).tolist() == ann["bbox"]  # tight box of the mask
                assert mask.sum() == ann["area"] and not (union & mask).any()  # visible masks do not overlap
                assert (index[mask] == ann["category_id"]).all()
                union |= mask
            assert (index[~union] == 0).all()


def test_deterministic_per_seed(paste: tuple[Path, dict], tmp_path: Path) -> None:
    _, data = paste
    make_fashion_paste(tmp_path / "a", train=20, val=0, test=0, seed=3)
    again = json.loads((tmp_path / "a" / "annotations" / "instances_train.json").read_text())
    assert again["annotations"] == [a for a in data["train"]["annotations"] if a["image_id"] <= 20]
    make_fashion_paste(tmp_path / "b", train=20, val=0, test=0, seed=4)
    other = json.loads((tmp_path / "b" / "annotations" / "instances_train.json").read_text())
    assert other["annotations"] != again["annotations"]


def test_both_loaders_read_it(paste: tuple[Path, dict]) -> None:
    out, data = paste
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        det_cfg = compose("config", overrides=["data=fashion_paste_det", f"data.root={out}", "data.with_masks=true",
                                               "data.num_workers=0", "data.hflip=0", "data.generate=null"])
        seg_cfg = compose("config", overrides=["data=fashion_paste_seg", f"data.root={out}", "data.num_workers=0",
                                               "data.generate=null"])
    det = build_datamodule(det_cfg.data)
    det.setup("test")
    assert (det.num_classes, det.class_names) == (10, list(CLASSES))
    images, targets = next(iter(det.test_dataloader()))
    first = data["test"]["annotations"][: len(targets[0]["labels"])]
    assert targets[0]["labels"].tolist() == [a["category_id"] for a in first]
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor(
        [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in first)], dtype=torch.float32))
    seg = build_datamodule(seg_cfg.data)
    seg.setup("fit")
    assert (seg.num_classes, seg.class_names[1:]) == (11, list(CLASSES))
    images, masks = next(iter(seg.val_dataloader()))
    index = np.asarray(Image.open(out / "masks" / "val" / "000001.png"))
    assert images.shape[1:] == (3, 128, 128) and np.array_equal(masks[0].numpy(), index)
    # the semantic map is the union of the instance masks with their classes
    coco = COCO(str(out / "annotations" / "instances_val.json"))
    rebuilt = np.zeros_like(index)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=1)):
        rebuilt[coco.annToMask(ann).astype(bool)] = ann["category_id"]
    assert np.array_equal(rebuilt, index)


def test_cli_rejects_small_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["--out", str(tmp_path), "--size", "64"]) == 2
    assert "size must be >= 128 pixels, got 64" in caplog.text
    assert not (tmp_path / "annotations").exists()


def test_batches_fit_torchvision_mask_rcnn(paste: tuple[Path, dict]) -> None:
    """The batch format is what torchvision's detectors take: a Mask R-CNN training step gives finite losses."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    out, _ = paste
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=["data=fashion_paste_det", f"data.root={out}", "data.with_masks=true",
                                           "data.num_workers=0", "data.batch_size=2", "data.generate=null"])
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=dm.num_classes + 1,
                                  min_size=128, max_size=128)
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_configs_build_the_set_on_first_use(tmp_path: Path) -> None:
    root = tmp_path / "fp"
    generate = "data.generate={train: 12, val: 4, test: 4, size: 128, seed: 1}"
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        det_cfg = compose("config", overrides=["data=fashion_paste_det", f"data.root={root}", generate])
        seg_cfg = compose("config", overrides=["data=fashion_paste_seg", f"data.root={root}", generate])
    det = build_datamodule(det_cfg.data)
    assert json.loads((root / "params.json").read_text()) == {"train": 12, "val": 4, "test": 4, "size": 128, "seed": 1}
    assert len(json.loads((root / "annotations" / "instances_train.json").read_text())["images"]) == 12
    stamp = (root / "annotations" / "instances_train.json").stat().st_mtime_ns
    seg = build_datamodule(seg_cfg.data)  # the same set, not rebuilt
    assert (root / "annotations" / "instances_train.json").stat().st_mtime_ns == stamp
    assert (det.task_type, det.num_classes, seg.task_type, seg.num_classes) == ("detection", 10, "segmentation", 11)
    assert [p.name for p in tmp_path.iterdir()] == ["fp"]  # no temporary folder left behind
    with pytest.raises(ValueError, match=f"{root} was built with .* not data.generate="):
        ensure_fashion_paste(root, {"train": 13, "val": 4, "test": 4, "size": 128, "seed": 1})
    with pytest.raises(FileNotFoundError, match="python -m chanzoo.data.make_fashion_paste --out"):
        ensure_fashion_paste(tmp_path / "absent", None)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no fashion-paste set"):
        ensure_fashion_paste(tmp_path / "other", {"train": 2})
