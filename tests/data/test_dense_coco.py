"""COCO-format detection datamodule against fixture folders in COCO 2017's layout (real photos, exact masks)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from dense_fixtures import COCO_CATEGORIES, coco_mask, make_coco
from hydra import compose, initialize_config_dir
from PIL import Image
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

from chanzoo.configs import CONFIG_DIR
from chanzoo.data.coco import COCODetectionDataModule
from chanzoo.run import build_datamodule


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("coco")
    return root, make_coco(root)


def _module(root: Path, **kw) -> COCODetectionDataModule:
    dm = COCODetectionDataModule(str(root), num_workers=0, **kw)
    dm.setup()
    return dm


def _expected(ann: dict, img: dict) -> tuple[list[float], np.ndarray]:
    x, y, w, h = ann["bbox"]
    box = [max(x, 0), max(y, 0), min(x + w, img["width"]), min(y + h, img["height"])]
    return box, coco_mask(ann["segmentation"], img["height"], img["width"])


def test_config_composes_and_reads_the_layout(coco: tuple[Path, dict]) -> None:
    root, _ = coco
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=["data=coco", f"data.root={root}", "data.with_masks=true",
                                           "data.num_workers=0"])
    dm = build_datamodule(cfg.data)
    assert dm.num_classes == 80 and dm.category_ids == sorted(COCO_CATEGORIES)
    assert dm.class_names == [COCO_CATEGORIES[i] for i in sorted(COCO_CATEGORIES)]
    assert (dm.task_type, dm.in_chans, dm.with_masks) == ("detection", 3, True)
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2
    for image, target in zip(images, targets):
        assert image.dtype == torch.float32 and image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape[1:] == image.shape[1:]
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64


def test_val_targets_equal_the_annotations_crowd_kept(coco: tuple[Path, dict]) -> None:
    root, info = coco
    dm = _module(root, with_masks=True, hflip=0.0)
    ann_by_image: dict[int, list] = {}
    for ann in info["val2017"]["annotations"]:
        ann_by_image.setdefault(ann["image_id"], []).append(ann)
    assert len(dm.val_set) == len(info["val2017"]["images"])
    for (image, target), img in zip(dm.val_set, info["val2017"]["images"]):
        anns = ann_by_image[img["id"]]
        expected = [_expected(a, img) for a in anns]
        assert image.shape == (3, img["height"], img["width"])
        assert int(target["image_id"]) == img["id"]
        torch.testing.assert_close(target["boxes"], torch.tensor([e[0] for e in expected], dtype=torch.float32))
        assert target["labels"].tolist() == [info["category_ids"].index(a["category_id"]) + 1 for a in anns]
        assert target["iscrowd"].tolist() == [a["iscrowd"] for a in anns]
        assert target["area"].tolist() == [float(a["area"]) for a in anns]
        assert np.array_equal(target["masks"].numpy(), np.stack([e[1] for e in expected]))
    first = dm.val_set[0][1]
    assert first["iscrowd"].sum() == 1  # the crowd region is kept for evaluation
    assert first["boxes"][:, 2].max() == info["val2017"]["images"][0]["width"]  # the box past the border is clipped


def test_train_drops_crowd_and_images_without_usable_boxes(coco: tuple[Path, dict]) -> None:
    root, info = coco
    dm = _module(root, hflip=0.0)
    anns = info["train2017"]["annotations"]
    usable = [img for img in info["train2017"]["images"]
              if any(a["image_id"] == img["id"] and a["bbox"][2] > 1 and a["bbox"][3] > 1 for a in anns)]
    assert len(usable) == len(info["train2017"]["images"]) - 2  # the empty image and the 1-px-box image
    assert [int(t["image_id"]) for _, t in dm.train_set] == [img["id"] for img in usable]
    for _, target in dm.train_set:
        expected = [a for a in anns if a["image_id"] == int(target["image_id"]) and not a["iscrowd"]]
        assert target["iscrowd"].sum() == 0 and len(target["labels"]) == len(expected)


def test_matches_torchvision_coco_reader(coco: tuple[Path, dict]) -> None:
    """Boxes and masks equal torchvision's CocoDetection wrapped for transforms v2 (boxes clipped as its
    reference training code does), labels its category ids mapped to 1..K."""
    root, info = coco
    dm = _module(root, with_masks=True, hflip=0.0)
    reference = wrap_dataset_for_transforms_v2(
        CocoDetection(str(root / "val2017"), str(root / "annotations/instances_val2017.json")),
        target_keys=("boxes", "labels", "masks", "image_id"),
    )
    for (_, ours), (img, theirs) in zip(dm.val_set, reference):
        height, width = img.height, img.width
        boxes = theirs["boxes"].as_subclass(torch.Tensor).float()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        torch.testing.assert_close(ours["boxes"], boxes)
        assert ours["labels"].tolist() == [info["category_ids"].index(int(c)) + 1 for c in theirs["labels"]]
        assert torch.equal(ours["masks"], theirs["masks"].as_subclass(torch.Tensor).to(torch.uint8))
        assert int(ours["image_id"]) == theirs["image_id"]


def test_hflip_moves_boxes_and_masks_together(coco: tuple[Path, dict]) -> None:
    root, _ = coco
    plain = _module(root, with_masks=True, hflip=0.0).train_set
    flipped = _module(root, with_masks=True, hflip=1.0).train_set
    for (img_a, tgt_a), (img_b, tgt_b) in zip(plain, flipped):
        width = img_a.shape[-1]
        torch.testing.assert_close(img_b, img_a.flip(-1))
        assert torch.equal(tgt_b["masks"], tgt_a["masks"].flip(-1))
        expected = torch.stack([width - tgt_a["boxes"][:, 2], tgt_a["boxes"][:, 1],
                                width - tgt_a["boxes"][:, 0], tgt_a["boxes"][:, 3]], dim=1)
        torch.testing.assert_close(tgt_b["boxes"], expected)


def test_multiscale_training_resizes_shorter_side(coco: tuple[Path, dict]) -> None:
    root, _ = coco
    dm = _module(root, with_masks=True, train_scales=[96], max_size=1000, hflip=0.0)
    image, target = dm.train_set[0]
    assert min(image.shape[1:]) == 96 and target["masks"].shape[1:] == image.shape[1:]


def test_subset_and_split_checks(coco: tuple[Path, dict]) -> None:
    root, _ = coco
    assert len(_module(root, subset=1).val_set) == 1
    with pytest.raises(ValueError, match="num_classes=10 .* lists 80 categories"):
        COCODetectionDataModule(str(root), num_classes=10)
    with pytest.raises(FileNotFoundError, match="instances_nope.json"):
        COCODetectionDataModule(str(root), val_split="nope")
    with pytest.raises(FileNotFoundError, match="data.root=.*missing"):
        COCODetectionDataModule(str(root / "missing"))


def _broken(tmp_path: Path, edit) -> tuple[Path, Path, int]:
    """A fresh fixture whose val annotation file ``edit(coco)`` changed; returns root, file and the edited id."""
    root = tmp_path / "coco"
    make_coco(root, num_train=1, num_val=2)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    ann_id = edit(data)
    path.write_text(json.dumps(data))
    return root, path, ann_id


def _edit_ann(field: str, value) -> callable:
    def edit(data: dict) -> int:
        data["annotations"][1][field] = value
        return data["annotations"][1]["id"]
    return edit


@pytest.mark.parametrize("edit, message", [
    (_edit_ann("bbox", [10, 10, -4, 20]), "negative size"),
    (_edit_ann("bbox", [500, 10, 20, 20]), "entirely outside"),
    (_edit_ann("bbox", [-40, 10, 20, 20]), "entirely outside"),
    (_edit_ann("category_id", 12), "category_id 12 is not among the categories"),
    (_edit_ann("segmentation", {"size": [10, 12], "counts": "PP"}), r"mask size \[10, 12\]"),
])
def test_bad_annotations_name_file_and_id(tmp_path: Path, edit, message: str) -> None:
    root, path, ann_id = _broken(tmp_path, edit)
    dm = COCODetectionDataModule(str(root), with_masks=True, num_workers=0)
    with pytest.raises(ValueError, match=message) as err:
        dm.setup("validate")
    assert str(path) in str(err.value) and f"annotation id {ann_id}" in str(err.value)


def test_missing_and_mismatched_image_files(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    info = make_coco(root, num_train=1, num_val=2)
    first, second = info["val2017"]["images"][:2]
    (root / "val2017" / first["file_name"]).unlink()
    with pytest.raises(FileNotFoundError, match=f"{first['file_name']} .image id {first['id']}. does not exist"):
        _module(root)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["images"] = data["images"][1:]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first["id"]]
    path.write_text(json.dumps(data))
    file = root / "val2017" / second["file_name"]
    Image.open(file).resize((second["width"] + 8, second["height"])).save(file)
    dm = _module(root)
    with pytest.raises(ValueError, match=f"{second['file_name']} is {second['width'] + 8}x{second['height']} but"):
        dm.val_set[0]


def test_datasets_pickle_for_spawned_workers(coco: tuple[Path, dict]) -> None:
    root, _ = coco
    dm = _module(root, with_masks=True, hflip=0.0)
    copy = pickle.loads(pickle.dumps(dm.val_set))
    (image_a, target_a), (image_b, target_b) = dm.val_set[0], copy[0]
    assert torch.equal(image_a, image_b) and torch.equal(target_a["masks"], target_b["masks"])
