"""Multi-channel images stored one file per sample (``.npy`` or multi-page ``.tif``) with a CSV of labels.

Layout of ``root``::

    labels.csv      columns ``file`` (path relative to root), ``label`` (int or class name), optional ``split``
                    (train / val / test; without it the rows are split at random with a fixed seed)
    channels.txt    optional: one channel name per line (or pass ``channel_names``)
    <files>         each a (C, H, W) array: ``.npy``, or ``.tif``/``.tiff`` with one page per channel

Per-channel mean and standard deviation are computed once over the training files and cached in ``stats_file``
(default ``root/.chanzoo_channel_stats.json``), keyed by a fingerprint of the training files' names, sizes and
modification times, so a changed data set is re-measured and an unchanged one is not.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import tifffile
import torch
from torch.utils.data import Dataset

from chanzoo.data.base import ClassificationDataModule
from chanzoo.data.channel_sampling import drop_channels, sample_channel_subset
from chanzoo.data.fashion_mnist import random_shift_flip
from chanzoo.io import write_json_atomic

__all__ = ["MultiChannelDataModule", "MultiChannelDataset", "load_multichannel", "read_label_csv"]

_logger = logging.getLogger(__name__)
SUFFIXES = (".npy", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


def load_multichannel(path: Union[str, Path]) -> np.ndarray:
    """A (C, H, W) float32 array from a ``.npy`` file or a multi-page ``.tif`` (a 2-D image is one channel)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {SUFFIXES}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        array = np.load(path, allow_pickle=False) if path.suffix.lower() == ".npy" else tifffile.imread(path)
    except (ValueError, OSError, EOFError, tifffile.TiffFileError) as error:
        raise ValueError(f"{path}: corrupt or unreadable image ({error})") from error
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a (C, H, W) array, got shape {array.shape}")
    return array.astype(np.float32, copy=False)


def read_label_csv(csv_path: Path) -> tuple[list[str], list[str], Optional[list[str]]]:
    """``file``, ``label`` and (if present) ``split`` columns of ``csv_path``."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"label CSV {csv_path} not found")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "file" not in columns or "label" not in columns:
            raise ValueError(f"{csv_path} must have columns 'file' and 'label' (and optionally 'split'), got {columns}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{csv_path} lists no samples")
    splits = [r["split"].strip() for r in rows] if "split" in columns else None
    if splits is not None:
        bad = sorted(set(splits) - set(SPLITS))
        if bad:
            raise ValueError(f"{csv_path}: split values {bad} are not allowed; use {list(SPLITS)}")
    return [r["file"].strip() for r in rows], [r["label"].strip() for r in rows], splits


class MultiChannelDataset(Dataset):
    """Files -> normalised (C, H, W) float tensors and integer labels."""

    def __init__(
        self, files: Sequence[Path], labels: Sequence[int], mean: np.ndarray, std: np.ndarray, shape: tuple[int, ...]
    ) -> None:
        self.files, self.labels = list(files), list(labels)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.shape = shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        array = load_multichannel(self.files[index])
        if array.shape != self.shape:
            raise ValueError(f"{self.files[index]}: shape {array.shape}, expected (in_chans, H, W) = {self.shape}")
        return (torch.from_numpy(array) - self.mean) / self.std, self.labels[index]


class MultiChannelDataModule(ClassificationDataModule):
    """Multi-channel classification data (see the module docstring for the folder layout).

    Args:
        root: the data folder.
        csv_file: label CSV inside ``root``.
        channel_names: names of the channels (default: ``root/channels.txt`` if present, else ``c0, c1, ...``).
        val_fraction, test_fraction: held out at random (fixed ``seed``) when the CSV has no ``split`` column;
            ``val_fraction`` also carves validation out of 'train' when the CSV has no 'val' rows.
        hflip: random horizontal flips of training batches.
        channel_sampling: plain-ViT Hierarchical Channel Sampling of training batches (Bao et al. 2024: keep a
            random channel subset, its size uniform on 1..C, zero the rest and rescale by C / k); for models with a
            fixed input width. ChannelViT does HCS itself (``model.kwargs.hcs=true``).
        stats_file: where the per-channel statistics are cached (default ``root/.chanzoo_channel_stats.json``).
    """

    def __init__(
        self,
        root: str,
        csv_file: str = "labels.csv",
        channel_names: Optional[Sequence[str]] = None,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        hflip: bool = False,
        channel_sampling: bool = False,
        stats_file: Optional[str] = None,
        seed: int = 0,
        num_classes: int = 10,
        in_chans: int = 4,
        img_size: int = 32,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, num_classes, in_chans, img_size)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        self.root = Path(root)
        self.csv_file = csv_file
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.hflip, self.channel_sampling = hflip, channel_sampling
        self.stats_file = Path(stats_file) if stats_file else self.root / ".chanzoo_channel_stats.json"
        self._channel_names = list(channel_names) if channel_names is not None else None
        self.channel_names: list[str] = []
        self.class_names: Optional[list[str]] = None
        self.mean: Optional[np.ndarray] = None
        self.std: Optional[np.ndarray] = None

    # ---------------------------------------------------------------------------------------------- set-up
    def _read_channel_names(self) -> list[str]:
        names = self._channel_names
        names_file = self.root / "channels.txt"
        if names is None and names_file.is_file():
            names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if names is None:
            return [f"c{i}" for i in range(self.in_chans)]
        if len(names) != self.in_chans:
            raise ValueError(f"channel_names has {len(names)} names {names} but in_chans={self.in_chans}")
        return list(names)

    def _labels(self, raw: list[str]) -> list[int]:
        try:
            labels = [int(v) for v in raw]
        except ValueError:
            self.class_names = sorted(set(raw))
            labels = [self.class_names.index(v) for v in raw]
        bad = sorted({v for v in labels if not 0 <= v < self.num_classes})
        if bad:
            raise ValueError(f"labels {bad[:10]} are outside 0..{self.num_classes - 1}; set num_classes to match")
        return labels

    def _split(self, n: int, splits: Optional[list[str]]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        if splits is None:
            order = rng.permutation(n)
            n_test, n_val = int(round(n * self.test_fraction)), int(round(n * self.val_fraction))
            parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
        else:
            parts = {s: np.array([i for i, v in enumerate(splits) if v == s], dtype=np.int64) for s in SPLITS}
            if len(parts["val"]) == 0 and self.val_fraction > 0:
                order = rng.permutation(parts["train"])
                n_val = int(round(len(order) * self.val_fraction))
                parts["val"], parts["train"] = order[:n_val], order[n_val:]
        for name, idx in parts.items():
            if len(idx) == 0 and name != "val":
                raise ValueError(f"{self.root / self.csv_file}: the {name!r} split is empty")
        if len(parts["val"]) == 0:
            parts["val"] = parts["test"]
        return parts

    def _fingerprint(self, files: Sequence[Path]) -> str:
        digest = hashlib.sha256()
        for path in sorted(files):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def channel_stats(self, files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std over ``files`` (the training set), cached in ``stats_file``."""
        fingerprint = self._fingerprint(files)
        if self.stats_file.is_file():
            cached = json.loads(self.stats_file.read_text())
            if cached.get("fingerprint") == fingerprint and len(cached.get("mean", [])) == self.in_chans:
                return np.asarray(cached["mean"]), np.asarray(cached["std"])
        total = np.zeros(self.in_chans)
        total_sq = np.zeros(self.in_chans)
        count = 0
        for path in files:
            array = load_multichannel(path).astype(np.float64)
            if array.shape[0] != self.in_chans:
                raise ValueError(f"{path} has {array.shape[0]} channels, expected in_chans={self.in_chans}")
            total += array.sum(axis=(1, 2))
            total_sq += (array**2).sum(axis=(1, 2))
            count += array.shape[1] * array.shape[2]
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
        std[std == 0] = 1.0
        payload = {"fingerprint": fingerprint, "mean": mean.tolist(), "std": std.tolist(), "files": len(files)}
        try:
            write_json_atomic(self.stats_file, payload)
        except OSError as error:
            _logger.warning("could not cache channel statistics in %s (%s); they will be recomputed", self.stats_file, error)
        _logger.info("per-channel statistics of %d training files: mean %s std %s", len(files), mean, std)
        return mean, std

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        if not self.root.is_dir():
            raise FileNotFoundError(f"root={str(self.root)!r}: no such data folder")
        self.channel_names = self._read_channel_names()
        names, raw_labels, splits = read_label_csv(self.root / self.csv_file)
        files = [self.root / name for name in names]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} file(s) listed in {self.root / self.csv_file} are missing: {missing[:5]}")
        labels = self._labels(raw_labels)
        parts = self._split(len(files), splits)
        self.mean, self.std = self.channel_stats([files[i] for i in parts["train"]])
        shape = (self.in_chans, self.img_size, self.img_size)

        def subset(name: str) -> MultiChannelDataset:
            idx = parts[name]
            return MultiChannelDataset([files[i] for i in idx], [labels[i] for i in idx], self.mean, self.std, shape)

        self.train_set, self.val_set, self.test_set = subset("train"), subset("val"), subset("test")
        _logger.info(
            "%s: %d train, %d val, %d test samples, channels %s",
            self.root, len(self.train_set), len(self.val_set), len(self.test_set), self.channel_names,
        )

    def on_after_batch_transfer(self, batch: list[torch.Tensor], dataloader_idx: int) -> list[torch.Tensor]:
        images, labels = batch
        if self.trainer is not None and self.trainer.training:
            if self.hflip:  # draws from the generator the training sampler re-seeds every epoch (exact resume)
                images = random_shift_flip(images, 0, True, self.augment_generator)
            if self.channel_sampling:
                subset = sample_channel_subset(images.shape[1], generator=self.augment_generator)
                images = drop_channels(images, subset)
        return [images, labels]
