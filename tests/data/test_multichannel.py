"""Multi-channel datamodule, the offline Fashion-MNIST builder, and plain-ViT channel sampling on batches."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chanzoo.data import multichannel
from chanzoo.data.make_multichannel import CHANNELS, build, to_channels
from chanzoo.data.multichannel import MultiChannelDataModule, load_multichannel



@pytest.fixture(scope="module", params=["npy", "tif"])
def dataset(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp(f"fmnist4_{request.param}")
    build(root, n_train=50, n_test=20, fmt=request.param)
    return root


def test_builder_channels_carry_different_information() -> None:
    from chanzoo.data.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist(split="test")
    x = to_channels(images[0, 0].numpy())
    intensity, edges, lowpass, highpass = x
    assert x.shape == (4, 32, 32) and x.dtype == np.float32
    assert np.allclose(intensity[2:30, 2:30] * 255, images[0, 0].numpy(), atol=1e-3)
    assert edges.min() >= 0 and abs(highpass.mean()) < 0.05 * intensity.mean()
    total_variation = lambda a: np.abs(np.diff(a, axis=0)).sum() + np.abs(np.diff(a, axis=1)).sum()  # noqa: E731
    assert total_variation(lowpass) < 0.6 * total_variation(intensity)
    corr = np.corrcoef(x.reshape(4, -1))
    assert (np.abs(corr[np.triu_indices(4, 1)]) < 0.99).all()


def test_setup_splits_names_and_normalises(dataset: Path) -> None:
    dm = MultiChannelDataModule(str(dataset), batch_size=16, eval_batch_size=32, seed=0)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (45, 5, 20)
    assert dm.channel_names == list(CHANNELS)
    train_files = dm.train_set.files
    stack = np.stack([load_multichannel(f) for f in train_files]).astype(np.float64)
    assert np.allclose(dm.mean, stack.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-8)
    assert np.allclose(dm.std, stack.std(axis=(0, 2, 3)), rtol=1e-6)
    x = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-3)
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (20, 4, 32, 32) and labels.dtype == torch.int64


def test_stats_are_cached_and_recomputed_when_files_change(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    stats = tmp_path / "stats.json"
    MultiChannelDataModule(str(dataset), stats_file=str(stats)).setup()
    cached = json.loads(stats.read_text())
    assert cached["files"] == 45

    reads = []
    original = multichannel.load_multichannel
    monkeypatch.setattr(multichannel, "load_multichannel", lambda p: reads.append(p) or original(p))
    MultiChannelDataModule(str(dataset), stats_file=str(stats)).setup()
    assert reads == []  # second set-up: statistics from the cache, no file read

    cached["fingerprint"] = "stale"
    stats.write_text(json.dumps(cached))
    MultiChannelDataModule(str(dataset), stats_file=str(stats)).setup()
    assert len(reads) == 45 and json.loads(stats.read_text())["fingerprint"] != "stale"


def test_random_split_without_split_column_and_string_labels(tmp_path: Path) -> None:
    rows = ["file,label"]
    for i in range(20):
        np.save(tmp_path / f"s{i}.npy", to_channels(np.full((28, 28), 10 * i, dtype=np.uint8))[:2])
        rows.append(f"s{i}.npy,{'cat' if i % 2 else 'dog'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    dm = MultiChannelDataModule(str(tmp_path), in_chans=2, num_classes=2, val_fraction=0.1, test_fraction=0.25,
                                channel_names=["a", "b"])
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (13, 2, 5)
    assert dm.class_names == ["cat", "dog"] and dm.channel_names == ["a", "b"]
    splits = [[Path(f).name for f in s.files] for s in (dm.train_set, dm.val_set, dm.test_set)]
    assert sorted(sum(splits, [])) == sorted(f"s{i}.npy" for i in range(20))  # a partition: each file in one split
    for split in (dm.train_set, dm.val_set, dm.test_set):  # labels stay with their files: odd i is 'cat' (0)
        assert split.labels == [1 - int(Path(f).stem[1:]) % 2 for f in split.files]
    again = MultiChannelDataModule(str(tmp_path), in_chans=2, num_classes=2, val_fraction=0.1, test_fraction=0.25,
                                   channel_names=["a", "b"], seed=1)
    again.setup()
    assert [Path(f).name for f in again.test_set.files] != splits[2]  # a random draw, following the seed


def write_one(root: Path, array: np.ndarray, label: str = "0", split: str = "train") -> None:
    np.save(root / "a.npy", array)
    np.save(root / "b.npy", array)
    (root / "labels.csv").write_text(f"file,label,split\na.npy,{label},{split}\nb.npy,0,test\n")


def test_errors_name_the_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such data folder"):
        MultiChannelDataModule(str(tmp_path / "missing")).setup()
    (tmp_path / "labels.csv").write_text("path,y\nx.npy,1\n")
    with pytest.raises(ValueError, match="must have columns 'file' and 'label'"):
        MultiChannelDataModule(str(tmp_path)).setup()
    write_one(tmp_path, np.zeros((3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="a.npy has 3 channels, expected in_chans=4"):
        MultiChannelDataModule(str(tmp_path), stats_file=str(tmp_path / "s1.json")).setup()
    write_one(tmp_path, np.zeros((4, 32, 32), np.float32), label="12")
    with pytest.raises(ValueError, match=r"labels \[12\] are outside 0..9"):
        MultiChannelDataModule(str(tmp_path)).setup()
    write_one(tmp_path, np.zeros((4, 32, 32), np.float32), split="holdout")
    with pytest.raises(ValueError, match=r"split values \['holdout'\]"):
        MultiChannelDataModule(str(tmp_path)).setup()
    write_one(tmp_path, np.zeros((4, 32, 32), np.float32))
    with pytest.raises(ValueError, match="channel_names has 2 names"):
        MultiChannelDataModule(str(tmp_path), channel_names=["x", "y"]).setup()
    (tmp_path / "a.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="a.npy: corrupt or unreadable"):
        load_multichannel(tmp_path / "a.npy")
    with pytest.raises(ValueError, match="val_fraction must be in"):
        MultiChannelDataModule(str(tmp_path), val_fraction=1.5)


def test_channel_sampling_applies_to_training_batches_only(dataset: Path) -> None:
    dm = MultiChannelDataModule(str(dataset), batch_size=8, channel_sampling=True, hflip=False)
    dm.setup()
    images, labels = next(iter(dm.val_dataloader()))
    out, _ = dm.on_after_batch_transfer([images, labels], 0)
    assert torch.equal(out, images)  # no trainer / not training: untouched

    class Training:
        training = True

    dm.trainer = Training()  # type: ignore[assignment]
    torch.manual_seed(0)
    kept_sizes = set()
    for _ in range(30):
        out, _ = dm.on_after_batch_transfer([images, labels], 0)
        kept = [c for c in range(4) if out[:, c].abs().sum() > 0]
        assert torch.allclose(out[:, kept], images[:, kept] * 4 / len(kept))
        kept_sizes.add(len(kept))
    assert kept_sizes == {1, 2, 3, 4}
