"""Build a small multi-channel classification data set offline from real images (Fashion-MNIST).

Each 28x28 Fashion-MNIST image (zero-padded to 32x32) becomes four channels that carry different information about
the same garment, the way microscopy or satellite channels show different aspects of one scene:

    intensity   the image itself, in [0, 1]
    edges       Sobel gradient magnitude (outline, no fill)
    lowpass     Gaussian blur, sigma 2 px (coarse shape, no texture or edges)
    highpass    image minus its Gaussian blur with sigma 1 px (fine texture and edges, no mean intensity)

Samples are written one file per sample (``.npy`` float32 (4, 32, 32), or multi-page ``.tif``) with ``labels.csv``
(file, label, split) and ``channels.txt``, the layout ``chanzoo.data.MultiChannelDataModule`` reads.
Train samples come from the Fashion-MNIST training set, test samples from its test set (first N of each)::

    python -m chanzoo.data.make_multichannel --out data/fmnist4 --train 3000 --test 1000
"""
from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tifffile
from skimage.filters import gaussian, sobel

from chanzoo.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist

_logger = logging.getLogger(__name__)
CHANNELS = ("intensity", "edges", "lowpass", "highpass")


def to_channels(image: np.ndarray, size: int = 32) -> np.ndarray:
    """One (H, W) uint8 image -> (4, size, size) float32 channels (see the module docstring)."""
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {image.shape}")
    pad_h, pad_w = size - image.shape[0], size - image.shape[1]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"size={size} is smaller than the image {image.shape}")
    img = np.pad(image.astype(np.float64) / 255.0, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)))
    channels = (img, sobel(img), gaussian(img, sigma=2), img - gaussian(img, sigma=1))
    return np.stack(channels).astype(np.float32)


def build(out: Path, n_train: int, n_test: int, fmt: str = "npy", source: str = DEFAULT_ROOT) -> Path:
    """Write the data set to ``out``; returns the path of its ``labels.csv``."""
    if fmt not in ("npy", "tif"):
        raise ValueError(f"fmt must be 'npy' or 'tif', got {fmt!r}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = load_fashion_mnist(source, split)
        if not 0 < n <= len(images):
            raise ValueError(f"--{split} must be in 1..{len(images)}, got {n}")
        for i in range(n):
            name = f"images/{split}_{i:05d}.{fmt}"
            array = to_channels(images[i, 0].numpy())
            if fmt == "npy":
                np.save(out / name, array)
            else:
                tifffile.imwrite(out / name, array)
            rows.append((name, int(labels[i]), split))
    (out / "channels.txt").write_text("\n".join(CHANNELS) + "\n")
    csv_path = out / "labels.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("file", "label", "split"))
        writer.writerows(rows)
    _logger.info("wrote %d samples with channels %s to %s", len(rows), CHANNELS, out)
    return csv_path


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=3000, help="training samples (from Fashion-MNIST train)")
    parser.add_argument("--test", type=int, default=1000, help="test samples (from Fashion-MNIST test)")
    parser.add_argument("--format", default="npy", choices=("npy", "tif"))
    parser.add_argument("--source", default=DEFAULT_ROOT, help="folder with the Fashion-MNIST idx files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    build(Path(args.out), args.train, args.test, args.format, args.source)


if __name__ == "__main__":
    main()
