"""Fashion-MNIST read straight from Debian's idx files."""
import gzip
from collections import Counter

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
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz is truncated: header says \(10000,\), found 92"):
        load_fashion_mnist(tmp_path, "test")


def _multiset(images: torch.Tensor, labels: torch.Tensor) -> Counter:
    """(image bytes, label) pairs with their counts: the content of a split, whatever its order."""
    rows = images.reshape(len(images), -1).numpy()
    return Counter(zip((row.tobytes() for row in rows), labels.tolist()))


@pytest.mark.parametrize("subset, sizes", [(2000, (1600, 400, 400)), (None, (55000, 5000, 10000))])
def test_split_is_a_seeded_partition_of_the_training_file(subset, sizes):
    """train and val together are exactly the (first ``subset``) images of the training file, each used once: no
    image in both, none dropped; test is the test file's head; the validation draw is random and follows the seed."""
    dm = FashionMNISTDataModule(subset=subset, seed=3)
    dm.setup()
    train, val, test = dm.train_set.tensors, dm.val_set.tensors, dm.test_set.tensors
    assert (len(train[1]), len(val[1]), len(test[1])) == sizes
    images, labels = load_fashion_mnist(split="train")
    n = subset or len(labels)
    # With the sizes adding up to n, equal multisets mean a partition: no image in both splits (beyond the copies the
    # file itself holds), none dropped, none altered, labels still with their images.
    assert _multiset(*train) + _multiset(*val) == _multiset(images[:n], labels[:n])
    position = {row.tobytes(): i for i, row in enumerate(images[:n].reshape(n, -1).numpy())}
    test_images, test_labels = load_fashion_mnist(split="test")
    assert torch.equal(test[0], test_images[: sizes[2]]) and torch.equal(test[1], test_labels[: sizes[2]])
    # validation is a random draw over the whole range, fixed by the seed, changed by another seed
    val_positions = sorted(position[row.tobytes()] for row in val[0].reshape(len(val[0]), -1).numpy())
    assert val_positions[0] < n // 10 and val_positions[-1] > n - n // 10
    again, other = FashionMNISTDataModule(subset=subset, seed=3), FashionMNISTDataModule(subset=subset, seed=4)
    again.setup()
    other.setup()
    assert torch.equal(again.val_set.tensors[0], val[0]) and torch.equal(again.train_set.tensors[1], train[1])
    assert not torch.equal(other.val_set.tensors[0], val[0])


def test_shift_flip_moves_each_image_by_one_random_offset():
    """Each output is its input shifted by some (dy, dx) in [-pad, pad]^2 with zero fill, then flipped or not; the
    offsets and flips vary over the batch and follow the generator."""
    images = load_fashion_mnist(split="test")[0][:32].float()
    shifted = random_shift_flip(images, pad=2, hflip=True, generator=torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    moves = []
    for i in range(len(images)):
        windows = {(dy, dx): padded[i, :, dy : dy + 28, dx : dx + 28] for dy in range(5) for dx in range(5)}
        candidates = [(dy, dx, flip) for (dy, dx), window in windows.items() for flip in (False, True)
                      if torch.equal(shifted[i], window.flip(-1) if flip else window)]
        assert candidates, f"image {i} is not a shift (and flip) of its input"
        moves.append(candidates[0])
    assert len({(dy, dx) for dy, dx, _ in moves}) >= 10  # 25 offsets possible
    assert {flip for _, _, flip in moves} == {False, True}
    again = random_shift_flip(images, pad=2, hflip=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, shifted)
    assert torch.equal(random_shift_flip(images, pad=0, hflip=False), images)


@pytest.mark.parametrize("name, side", [("small_cnn", 28), ("convnext_atto", 32), ("vit_tiny_patch16_224", 224)])
def test_auto_img_size_is_the_smallest_side_the_model_takes(name: str, side: int) -> None:
    """``data.img_size=auto`` keeps 28 px where the model takes it, else grows to the model's total stride (ConvNeXt
    would shrink 28 px to nothing by its last stage) or to a fixed-size ViT's own input size."""
    import timm

    import chanzoo  # noqa: F401  (registers small_cnn)

    with torch.device("meta"):
        model = timm.create_model(name, in_chans=1, num_classes=10)
    dm = FashionMNISTDataModule(subset=200, batch_size=8, img_size="auto")
    dm.set_model(model)
    assert dm.img_size == side
    dm.setup("fit")
    images, labels = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert images.shape == (8, 1, side, side) and labels.shape == (8,)


def test_img_size_names_the_bad_value() -> None:
    with pytest.raises(ValueError, match="img_size must be 'auto' or a side in pixels >= 1, got 'big'"):
        FashionMNISTDataModule(img_size="big")
