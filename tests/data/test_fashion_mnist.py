"""Fashion-MNIST read straight from Debian's idx files."""
import gzip

import pytest
import torch

from chanzoo.data.fashion_mnist import FashionMNISTDataModule, load_fashion_mnist, random_shift_flip


def test_reads_all_70k_real_images():
    train_x, train_y = load_fashion_mnist(split="train")
    test_x, test_y = load_fashion_mnist(split="test")
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert train_x.dtype == torch.uint8 and set(train_y.unique().tolist()) == set(range(10))
    assert torch.bincount(train_y).tolist() == [6000] * 10  # the data set is balanced
    # mean/std used for normalisation are the training set's
    pixels = train_x.float() / 255
    assert pixels.mean().item() == pytest.approx(0.2860, abs=1e-3)
    assert pixels.std().item() == pytest.approx(0.3530, abs=1e-3)


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be one of .* got 'val'"):
        load_fashion_mnist(split="val")


def test_truncated_file_is_reported(tmp_path):
    src = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
    with gzip.open(src) as f:
        raw = f.read()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(raw[:100])
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist(tmp_path, "test")


def test_split_is_disjoint_and_seeded():
    dm = FashionMNISTDataModule(subset=2000, seed=3)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 2000 and len(dm.val_set) == 400
    again = FashionMNISTDataModule(subset=2000, seed=3)
    again.setup()
    assert torch.equal(dm.val_set.tensors[0], again.val_set.tensors[0])


def test_shift_flip_moves_pixels_only():
    images = load_fashion_mnist(split="test")[0][:16].float()
    torch.manual_seed(0)
    shifted = random_shift_flip(images, pad=2, hflip=True)
    assert shifted.shape == images.shape
    assert not torch.equal(shifted, images)
    # a shift by at most 2 px drops at most the border mass; no new intensities appear
    assert set(shifted.unique().tolist()) <= set(images.unique().tolist()) | {0.0}
    assert torch.equal(random_shift_flip(images, pad=0, hflip=False), images)
