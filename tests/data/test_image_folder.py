"""ImageNet-layout folders through timm: transforms from the model's cfg, and every bad layout named."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import chanzoo
from chanzoo.data.image_folder import ImageFolderDataModule


def _write_folder(root: Path, photos: dict, per_class: int = 3) -> Path:
    for split in ("train", "val"):
        for name, photo in photos.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                crop = photo[i * 40 : i * 40 + 96, i * 30 : i * 30 + 96]
                Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{name}_{i}.png")
    return root


def test_real_photos_load_with_model_normalisation(tmp_path, photos):
    root = _write_folder(tmp_path / "data", {k: photos[k] for k in ("astronaut", "coffee")})
    dm = ImageFolderDataModule(str(root), batch_size=2, num_workers=0, img_size=64, auto_augment=None)
    assert dm.num_classes == 2
    dm.set_model(chanzoo.create_model("resnet18", num_classes=2))
    dm.setup("fit")
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0]  # class indices follow sorted folder names
    all_labels = torch.cat([batch[1] for batch in dm.val_dataloader()])
    assert all_labels.tolist() == [0, 0, 0, 1, 1, 1]  # every image once: astronaut (0) then coffee (1)
    # normalised with resnet18's ImageNet mean/std: undone, the pixels are the photo's again (in [0, 1], the crop's
    # colour balance, RGB order kept)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    pixels = images * std + mean
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5 and images.min() < 0 and images.max() > 1
    source = torch.from_numpy(photos["astronaut"][6:90, 6:90]).permute(2, 0, 1).float() / 255  # centre 87.5%
    torch.testing.assert_close(pixels[0].mean(dim=(1, 2)), source.mean(dim=(1, 2)), rtol=0, atol=0.015)
    train_images, _ = next(iter(dm.train_dataloader()))
    assert train_images.shape == (2, 3, 64, 64)


def test_missing_empty_and_classless_folders_are_named(tmp_path, photos):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope" / "train")):
        ImageFolderDataModule(str(tmp_path / "nope"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        ImageFolderDataModule(str(tmp_path / "empty"))
    root = _write_folder(tmp_path / "data", {"coffee": photos["coffee"]})
    (root / "train" / "ghost").mkdir()
    (root / "train" / "ghost" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"class folder .*ghost holds no images"):
        ImageFolderDataModule(str(root))


def test_corrupt_image_is_named_not_skipped(tmp_path, photos):
    root = _write_folder(tmp_path / "data", {"coffee": photos["coffee"], "rocket": photos["rocket"]})
    bad = root / "val" / "rocket" / "rocket_1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    dm = ImageFolderDataModule(str(root), batch_size=6, num_workers=0, img_size=32, auto_augment=None)
    dm.setup("validate")
    with pytest.raises(ValueError, match="corrupt or unreadable image file .*rocket_1.png"):
        next(iter(dm.val_dataloader()))
