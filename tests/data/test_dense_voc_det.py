"""VOC detection from devkit XML on a fixture devkit (VOC2007 + VOC2012, real photos)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dense_fixtures import make_voc
from hydra import compose, initialize_config_dir

from chanzoo.configs import CONFIG_DIR
from chanzoo.data.voc import VOC_CLASSES, VOCDetectionDataModule
from chanzoo.run import build_datamodule


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("vocdet")
    return root, make_voc(root, years=("2007", "2012"))


def test_07_12_protocol_boxes_labels_and_difficult(voc: tuple[Path, dict]) -> None:
    root, info = voc
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=["data=voc_det", f"data.root={root}", "data.num_workers=0",
                                           "data.hflip=0.0"])
    dm = build_datamodule(cfg.data)
    assert (dm.num_classes, dm.class_names, dm.task_type, dm.in_chans) == (20, list(VOC_CLASSES), "detection", 3)
    dm.setup()
    trainval = [(y, n) for y in ("2007", "2012") for n in info[y]["names"]["train"] + info[y]["names"]["val"]]
    assert len(dm.train_set) == len(trainval)
    for (image, target), (year, name) in zip(dm.train_set, trainval):
        rec = info[year]["records"][name]
        kept = [o for o in rec["objects"] if not o["difficult"]]  # difficult objects are not trained on
        assert image.shape == (3, rec["height"], rec["width"])
        torch.testing.assert_close(target["boxes"], torch.tensor([o["xyxy"] for o in kept]))
        assert target["labels"].tolist() == [o["label"] for o in kept]
        assert target["iscrowd"].tolist() == [0] * len(kept)
    for (_, target), name in zip(dm.val_set, info["2007"]["names"]["val"]):  # VOC2007/test
        objects = info["2007"]["records"][name]["objects"]
        torch.testing.assert_close(target["boxes"], torch.tensor([o["xyxy"] for o in objects]))
        assert target["iscrowd"].tolist() == [o["difficult"] for o in objects]  # evaluation ignores difficult
        boxes = target["boxes"]
        torch.testing.assert_close(target["area"], (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and len(targets) == 2


def _xml(root: Path) -> Path:
    return next((root / "VOCdevkit/VOC2012/Annotations").glob("*.xml"))


@pytest.mark.parametrize("old, new, message", [
    ("<name>", "<name>zebra", r"object 0 \('zebra.*'\): class 'zebra.*' is not one of the 20 VOC classes"),
    ("<xmin>", "<xmin>900", r"object 0 .* negative size"),
])
def test_bad_xml_names_file_and_object(tmp_path: Path, old: str, new: str, message: str) -> None:
    make_voc(tmp_path)
    path = _xml(tmp_path)
    text = path.read_text()
    path.write_text(text.replace(old, new, 1))
    dm = VOCDetectionDataModule(str(tmp_path), train_sets=["VOC2012/train", "VOC2012/val"], val_sets=["VOC2012/val"],
                                num_workers=0)
    with pytest.raises(ValueError, match=message) as err:
        dm.setup("fit")
    assert f"annotation file {path}" in str(err.value)


def test_box_outside_and_missing_image(tmp_path: Path) -> None:
    make_voc(tmp_path)
    path = _xml(tmp_path)
    text = path.read_text()
    start, end = text.index("<bndbox>"), text.index("</bndbox>")
    path.write_text(text[:start] + "<bndbox><xmin>500</xmin><ymin>5</ymin><xmax>520</xmax><ymax>30</ymax>"
                    + text[end:])
    dm = VOCDetectionDataModule(str(tmp_path), train_sets=["VOC2012/trainval"], val_sets=["VOC2012/val"],
                                num_workers=0)
    with pytest.raises(ValueError, match=rf"{path}, object 0 .* lies outside the \d+x\d+ image"):
        dm.setup("fit")
    path.write_text(text)
    image = tmp_path / "VOCdevkit/VOC2012/JPEGImages" / f"{path.stem}.jpg"
    image.unlink()
    with pytest.raises(FileNotFoundError, match=f"image file {image} does not exist"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="must read VOC<year>/<list>"):
        VOCDetectionDataModule(str(tmp_path), train_sets=["trainval"])
