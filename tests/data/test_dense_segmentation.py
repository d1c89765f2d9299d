"""Semantic-segmentation datamodules (VOC2012 with SBD, ADE20K, index-PNG folders) on fixture folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from dense_fixtures import make_ade20k, make_voc
from hydra import compose, initialize_config_dir
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors

from chanzoo.configs import CONFIG_DIR
from chanzoo.data.ade20k import ADE20KDataModule
from chanzoo.data.dense import RandomRescale, SegmentationDataModule
from chanzoo.data.voc import VOCSegmentationDataModule
from chanzoo.run import build_datamodule

MEAN, STD = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("voc")
    return root, make_voc(root, sbd=True)["2012"]


@pytest.fixture(scope="module")
def ade(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_ade20k(tmp_path_factory.mktemp("ade"))


def _compose(name: str, *overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return build_datamodule(compose("config", overrides=[f"data={name}", "data.num_workers=0", *overrides]).data)


def test_voc_val_masks_are_the_files_with_255_borders(voc: tuple[Path, dict]) -> None:
    root, info = voc
    dm = _compose("voc_seg", f"data.root={root}", "data.eval_resize=false")
    assert (dm.num_classes, dm.ignore_index, dm.task_type, dm.in_chans) == (21, 255, "segmentation", 3)
    assert dm.class_names[0] == "background" and len(dm.class_names) == 21
    assert tuple(dm.mean) == IMAGENET_DEFAULT_MEAN and tuple(dm.std) == IMAGENET_DEFAULT_STD
    dm.setup("validate")
    images, masks = next(iter(dm.val_dataloader()))
    name = info["names"]["val"][0]
    expected = info["records"][name]["labels"]
    assert images.shape == (1, 3, *expected.shape) and masks.dtype == torch.int64
    assert np.array_equal(masks[0].numpy(), expected) and (expected == 255).any()
    raw = np.asarray(Image.open(root / "VOCdevkit/VOC2012/JPEGImages" / f"{name}.jpg"), np.float32) / 255
    torch.testing.assert_close(images[0], (torch.from_numpy(raw).permute(2, 0, 1) - MEAN) / STD)


def test_voc_eval_resize_keeps_mask_at_original_size(voc: tuple[Path, dict]) -> None:
    root, info = voc
    dm = VOCSegmentationDataModule(str(root), crop_size=64, num_workers=0)
    dm.setup("validate")
    for (image, mask), name in zip(dm.val_set, info["names"]["val"]):
        h, w = info["records"][name]["labels"].shape
        assert min(image.shape[1:]) == 64 and image.shape[1] / image.shape[2] == pytest.approx(h / w, abs=0.02)
        assert np.array_equal(mask.numpy(), info["records"][name]["labels"])


def test_voc_sbd_trains_on_train_aug_with_aug_labels(voc: tuple[Path, dict]) -> None:
    root, info = voc
    dm = VOCSegmentationDataModule(str(root), sbd=True, num_workers=0)
    dm.setup("fit")
    pairs = dm.train_set.pairs
    assert [p[1].parent.name for p in pairs] == ["SegmentationClassAug"] * len(info["names"]["train"])
    assert [p[0].stem for p in pairs] == info["names"]["train"]
    assert [p[1].parent.name for p in dm.val_set.pairs] == ["SegmentationClass"] * len(info["names"]["val"])


def test_training_crops_pad_image_0_and_mask_255(voc: tuple[Path, dict]) -> None:
    root, _ = voc
    dm = VOCSegmentationDataModule(str(root), crop_size=200, ratio_range=(0.25, 0.25), batch_size=2, num_workers=0)
    dm.setup("fit")
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 200, 200) and masks.shape == (2, 200, 200)
    # rescaled to fit 200x800 * 0.25 = 50x200: the crop pads every image to 200x200, so the last rows are padding
    assert (masks[:, -1] == 255).all()
    torch.testing.assert_close(images[:, :, -1], ((0 - MEAN) / STD)[:, :, 0].expand(2, 3, 200))


def test_random_rescale_follows_mmseg_keep_ratio_rule() -> None:
    rescale = RandomRescale((2048, 512), (1.0, 1.0))
    for height, width in ((375, 500), (500, 333), (1000, 4000)):
        image, mask = rescale(tv_tensors.Image(torch.zeros(3, height, width)),
                              tv_tensors.Mask(torch.zeros(height, width, dtype=torch.uint8)))
        factor = min(2048 / max(height, width), 512 / min(height, width))
        assert image.shape[1:] == mask.shape == (int(height * factor + 0.5), int(width * factor + 0.5))


def test_ade20k_reduce_zero_label(ade: dict) -> None:
    dm = _compose("ade20k", f"data.root={ade['root']}", "data.crop_size=64", "data.batch_size=2")
    assert (dm.num_classes, dm.class_names[0], dm.class_names[-1]) == (150, "wall", "flag")
    dm.setup("fit")
    for (_, mask), labels in zip(dm.val_set, ade["validation"].values()):
        expected = np.where(labels == 0, 255, labels.astype(np.int64) - 1)
        assert np.array_equal(mask.numpy(), expected)
    first = dm.val_set.load_mask(dm.val_set.pairs[0][1])
    assert (first == 149).any() and (first == 255).any()  # label 150 -> 149, "other" -> ignore
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 64, 64) and set(masks.unique().tolist()) <= set(range(150)) | {255}


def test_label_beyond_the_classes_names_the_file(voc: tuple[Path, dict], tmp_path: Path) -> None:
    _, info = voc
    copy = tmp_path / "voc"
    make_voc(copy)
    name = info["names"]["val"][1]
    path = copy / "VOCdevkit/VOC2012/SegmentationClass" / f"{name}.png"
    labels = np.asarray(Image.open(path)).copy()
    labels[0, :3] = (21, 40, 254)
    bad = Image.fromarray(labels)
    bad.putpalette(Image.open(path).getpalette())
    bad.save(path)
    dm = VOCSegmentationDataModule(str(copy), num_workers=0)
    dm.setup("validate")
    dm.val_set[0]  # the other image loads
    with pytest.raises(ValueError, match=rf"label file {path} holds values \[21, 40, 254\] beyond the 21 classes"):
        dm.val_set[1]
    rgb = copy / "VOCdevkit/VOC2012/SegmentationClass" / f"{info['names']['val'][0]}.png"
    Image.open(rgb).convert("RGB").save(rgb)
    with pytest.raises(ValueError, match=f"label file {rgb} has mode RGB"):
        dm.val_set[0]


def test_ade20k_label_151_is_an_error(tmp_path: Path) -> None:
    info = make_ade20k(tmp_path)
    path = info["root"] / "annotations/validation/ADE_val_00000002.png"
    labels = np.asarray(Image.open(path)).copy()
    labels[5, 5] = 151
    Image.fromarray(labels).save(path)
    dm = ADE20KDataModule(str(info["root"]), num_workers=0)
    dm.setup("validate")
    with pytest.raises(ValueError, match=rf"{path} holds values \[151\] beyond the 150 classes"):
        dm.val_set[1]


def test_mask_of_another_size_and_missing_files(voc: tuple[Path, dict], tmp_path: Path) -> None:
    _, info = voc
    copy = tmp_path / "voc"
    make_voc(copy)
    voc_dir = copy / "VOCdevkit/VOC2012"
    name = info["names"]["val"][0]
    Image.open(voc_dir / "SegmentationClass" / f"{name}.png").crop((0, 0, 50, 40)).save(
        voc_dir / "SegmentationClass" / f"{name}.png")
    dm = VOCSegmentationDataModule(str(copy), num_workers=0)
    dm.setup("validate")
    with pytest.raises(ValueError, match=f"label file .*{name}.png is 50x40 but its image .*{name}.jpg is"):
        dm.val_set[0]
    (voc_dir / "JPEGImages" / f"{info['names']['val'][1]}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=f"image file .*{info['names']['val'][1]}.jpg does not exist"):
        VOCSegmentationDataModule(str(copy), num_workers=0).setup("validate")
    with pytest.raises(FileNotFoundError, match="VOC2010 does not exist"):
        VOCSegmentationDataModule(str(copy), year="2010")


def test_generic_module_rejects_bad_arguments(ade: dict) -> None:
    split = {"img_dir": "images/training", "ann_dir": "annotations/training"}
    with pytest.raises(ValueError, match="class_names has 2 names but num_classes=3"):
        SegmentationDataModule(str(ade["root"]), split, split, num_classes=3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="val split must be a mapping with img_dir and ann_dir"):
        SegmentationDataModule(str(ade["root"]), split, {"img_dir": "x"})
    with pytest.raises(ValueError, match=r"ratio_range must be \[low, high\]"):
        SegmentationDataModule(str(ade["root"]), split, split, ratio_range=(2.0, 0.5))
