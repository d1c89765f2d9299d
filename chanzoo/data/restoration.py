"""Datamodules for image restoration: paired LQ/GT folders and HR images degraded on the fly by bicubic down-sampling.

Batches are ``(lq, gt)`` float tensors in [0, 1], RGB, NCHW. Training samples are random aligned patches (``patch_size``
LQ pixels, ``scale * patch_size`` GT pixels) with random flips and 90-degree rotations, as in BasicSR's
``PairedImageDataset``; evaluation samples are whole images, the GT cut to ``scale`` x the LQ size.

Folder layouts (each split of ``PairedFolderDataModule`` is ``{gt_dir, lq_dir, lq_template, gt_suffix}``): the LQ file
of a GT file ``<key><gt_suffix>.<ext>`` is ``lq_template.format(key=<key>, scale=<scale>)`` with any image extension:

* DIV2K: ``DIV2K_train_HR/0001.png`` and ``DIV2K_train_LR_bicubic/X2/0001x2.png`` (``lq_template='{key}x{scale}'``)
* Set5 / Set14 / B100 / Urban100 / Manga109 as BasicSR ships them: ``Set5/HR/baby.png``, ``Set5/LR_bicubic/X2/babyx2.png``
* RainDrop: ``test_a/gt/0_clean.png`` and ``test_a/data/0_rain.png`` (``gt_suffix='_clean'``, ``lq_template='{key}_rain'``)
* Outdoor-Rain (Test1), Snow100K: ``gt/<name>`` and ``input/<name>`` (or ``synthetic/<name>``) with equal names.

``BicubicSRDataModule`` takes HR images only: folders, image files or ``skimage:<name>`` (scikit-image's bundled
photos, e.g. ``skimage:astronaut``), and makes the LQ image with PIL's antialiased bicubic resize (Keys kernel
a=-0.5, the kernel of MATLAB's ``imresize`` that SR benchmarks use).
"""
from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from chanzoo.data.base import ClassificationDataModule, verify_images

_logger = logging.getLogger(__name__)

__all__ = [
    "PairedFolderDataModule",
    "BicubicSRDataModule",
    "PairedImageDataset",
    "BicubicSRDataset",
    "find_pairs",
    "load_image",
    "bicubic_downsample",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SKIMAGE_PREFIX = "skimage:"


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB -> CHW float in [0, 1]."""
    return torch.from_numpy(np.array(image, order="C")).permute(2, 0, 1).float().div_(255.0)  # a writable copy


def _rgb(array: np.ndarray, source: str) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"image {source!r} has shape {array.shape}; expected grey, RGB or RGBA")
    return np.ascontiguousarray(array[..., :3].astype(np.uint8))


def load_image(source: Union[str, Path]) -> np.ndarray:
    """An RGB uint8 HWC array from an image file or ``skimage:<name>``; corrupt files raise ``ValueError``."""
    source = str(source)
    if source.startswith(SKIMAGE_PREFIX):
        import skimage.data

        name = source[len(SKIMAGE_PREFIX) :]
        loader = getattr(skimage.data, name, None)
        if not callable(loader):
            raise ValueError(f"image source {source!r}: skimage.data has no image {name!r}")
        image = loader()
        return _rgb(image[0] if isinstance(image, tuple) else image, source)
    try:
        with Image.open(source) as img:
            return _rgb(np.asarray(img.convert("RGB")), source)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {source!r} ({type(err).__name__}: {err})") from None


def bicubic_downsample(image: np.ndarray, scale: int) -> np.ndarray:
    """``image`` (HWC uint8, H and W multiples of ``scale``) shrunk ``scale`` times with antialiased bicubic."""
    height, width = image.shape[:2]
    if height % scale or width % scale:
        raise ValueError(f"image size {height}x{width} is not a multiple of scale={scale}; mod-crop it first")
    pil = Image.fromarray(image).resize((width // scale, height // scale), Image.Resampling.BICUBIC)
    return np.asarray(pil)


def _list_images(folder: Union[str, Path], argument: str) -> list[Path]:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ValueError(f"{argument}={str(folder)!r} is not a folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{argument}={str(folder)!r} holds no images (looked for {list(IMAGE_SUFFIXES)})")
    return files


def find_pairs(
    gt_dir: Union[str, Path],
    lq_dir: Union[str, Path],
    lq_template: str = "{key}",
    gt_suffix: str = "",
    scale: int = 1,
) -> list[tuple[Path, Path]]:
    """(lq, gt) file pairs of two folders; every GT image must have its LQ partner (else ``ValueError`` naming it).

    ``{scale}`` in ``lq_dir`` is replaced by ``scale`` (e.g. ``LR_bicubic/X{scale}``).
    """
    lq_dir = str(lq_dir).replace("{scale}", str(scale))
    gt_files = _list_images(gt_dir, "gt_dir")
    lq_by_stem = {p.stem: p for p in _list_images(lq_dir, "lq_dir")}
    pairs, missing = [], []
    for gt in gt_files:
        key = gt.stem[: len(gt.stem) - len(gt_suffix)] if gt_suffix and gt.stem.endswith(gt_suffix) else gt.stem
        lq_stem = lq_template.format(key=key, scale=scale)
        if lq_stem in lq_by_stem:
            pairs.append((lq_by_stem[lq_stem], gt))
        else:
            missing.append(f"{gt.name} -> {lq_stem}.*")
    if missing:
        raise ValueError(
            f"{len(missing)} GT image(s) in gt_dir={str(gt_dir)!r} have no LQ image in lq_dir={str(lq_dir)!r} "
            f"(lq_template={lq_template!r}, gt_suffix={gt_suffix!r}), e.g. {missing[:3]}"
        )
    return pairs


def _augment(lq: np.ndarray, gt: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random horizontal flip, vertical flip and transpose (BasicSR's hflip + rot) of both images."""
    if rng.random() < 0.5:
        lq, gt = lq[:, ::-1], gt[:, ::-1]
    if rng.random() < 0.5:
        lq, gt = lq[::-1], gt[::-1]
    if rng.random() < 0.5:
        lq, gt = lq.transpose(1, 0, 2), gt.transpose(1, 0, 2)
    return lq, gt


def _random_crop(
    lq: np.ndarray, gt: np.ndarray, patch: int, scale: int, rng: np.random.Generator, source: str
) -> tuple[np.ndarray, np.ndarray]:
    height, width = lq.shape[:2]
    if height < patch or width < patch:
        raise ValueError(f"image {source!r} has LQ size {height}x{width}, smaller than patch_size={patch}")
    top, left = int(rng.integers(0, height - patch + 1)), int(rng.integers(0, width - patch + 1))
    lq = lq[top : top + patch, left : left + patch]
    gt = gt[top * scale : (top + patch) * scale, left * scale : (left + patch) * scale]
    return lq, gt


class _PatchDataset(Dataset, abc.ABC):
    """Shared sampling: whole images for evaluation, random augmented patches for training.

    Random draws come from torch's global generator (per worker under Lightning's ``seed_everything(workers=True)``),
    so they are reproducible for a seed and differ between epochs.
    """

    def __init__(self, scale: int, patch_size: Optional[int], augment: bool, enlarge: int) -> None:
        self.scale = scale
        self.patch_size = patch_size
        self.augment = augment
        self.enlarge = enlarge

    @abc.abstractmethod
    def _num_images(self) -> int:
        """Distinct images in the set."""

    @abc.abstractmethod
    def _pair(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
        """(lq, gt, source name) of image ``index``; the GT at least ``scale`` x the LQ size."""

    def __len__(self) -> int:
        return self._num_images() * self.enlarge

    def _crop(self, lq: np.ndarray, gt: np.ndarray, rng: np.random.Generator, source: str) -> tuple[np.ndarray, np.ndarray]:
        if self.patch_size is not None:
            return _random_crop(lq, gt, self.patch_size, self.scale, rng, source)
        return lq, gt[: lq.shape[0] * self.scale, : lq.shape[1] * self.scale]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        lq, gt, source = self._pair(index % self._num_images(), rng)
        lq, gt = self._crop(lq, gt, rng, source)
        if self.augment:
            lq, gt = _augment(lq, gt, rng)
        return image_to_tensor(lq), image_to_tensor(gt)


class PairedImageDataset(_PatchDataset):
    """(lq, gt) pairs read from disk (see ``find_pairs``)."""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        scale: int,
        patch_size: Optional[int] = None,
        augment: bool = False,
        enlarge: int = 1,
    ) -> None:
        super().__init__(scale, patch_size, augment, enlarge)
        self.pairs = list(pairs)

    def _num_images(self) -> int:
        return len(self.pairs)

    def _pair(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
        lq_path, gt_path = self.pairs[index]
        lq, gt = load_image(lq_path), load_image(gt_path)
        if gt.shape[0] < lq.shape[0] * self.scale or gt.shape[1] < lq.shape[1] * self.scale:
            raise ValueError(
                f"GT {str(gt_path)!r} ({gt.shape[0]}x{gt.shape[1]}) is smaller than scale={self.scale} x its LQ "
                f"{str(lq_path)!r} ({lq.shape[0]}x{lq.shape[1]})"
            )
        return lq, gt, str(lq_path)


def _expand_sources(sources: Union[str, Sequence[str]], argument: str) -> list[str]:
    """Folders -> their image files; files and ``skimage:<name>`` entries are kept."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise ValueError(f"{argument} is empty; give folders, image files or skimage:<name> entries")
    out: list[str] = []
    for source in sources:
        source = str(source)
        if source.startswith(SKIMAGE_PREFIX):
            import skimage.data

            name = source[len(SKIMAGE_PREFIX) :]
            if not callable(getattr(skimage.data, name, None)):
                raise ValueError(f"{argument}: {source!r}: skimage.data has no image {name!r}")
            out.append(source)
        elif Path(source).expanduser().is_dir():
            out.extend(str(p) for p in _list_images(source, argument))
        elif Path(source).expanduser().is_file():
            out.append(str(Path(source).expanduser()))
        else:
            raise ValueError(f"{argument}: {source!r} is neither a folder, an image file nor skimage:<name>")
    return out


class BicubicSRDataset(_PatchDataset):
    """HR images whose LQ partner is made on the fly by ``bicubic_downsample`` (of each training patch).

    ``cache``: keep every decoded HR image in memory after its first read (in each loader worker's copy of the set).
    """

    def __init__(
        self,
        sources: Sequence[str],
        scale: int,
        patch_size: Optional[int] = None,
        augment: bool = False,
        enlarge: int = 1,
        cache: bool = True,
    ) -> None:
        super().__init__(scale, patch_size, augment, enlarge)
        self.sources = list(sources)
        self._cache: dict[int, np.ndarray] = {}
        self.cache = cache

    def _num_images(self) -> int:
        return len(self.sources)

    def _hr(self, index: int) -> np.ndarray:
        if index in self._cache:
            return self._cache[index]
        image = load_image(self.sources[index])
        if self.cache:
            self._cache[index] = image
        return image

    def _pair(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
        hr, scale, source = self._hr(index), self.scale, self.sources[index]
        if self.patch_size is not None:  # crop the HR patch first: degrading only the patch is much cheaper
            side = self.patch_size * scale
            if hr.shape[0] < side or hr.shape[1] < side:
                raise ValueError(f"image {source!r} ({hr.shape[0]}x{hr.shape[1]}) is smaller than the HR patch {side}")
            top, left = int(rng.integers(0, hr.shape[0] - side + 1)), int(rng.integers(0, hr.shape[1] - side + 1))
            hr = hr[top : top + side, left : left + side]
        hr = hr[: hr.shape[0] // scale * scale, : hr.shape[1] // scale * scale]  # mod-crop
        if min(hr.shape[:2]) < scale:
            raise ValueError(f"image {source!r} ({hr.shape[0]}x{hr.shape[1]}) is smaller than scale={scale}")
        return bicubic_downsample(hr, scale), hr, source

    def _crop(self, lq: np.ndarray, gt: np.ndarray, rng: np.random.Generator, source: str) -> tuple[np.ndarray, np.ndarray]:
        return lq, gt  # the HR patch was cut before degradation


def model_scale(model: torch.nn.Module) -> int:
    """A restoration model's output/input size ratio (``upscale`` for SR models, ``scale`` otherwise, else 1)."""
    return int(getattr(model, "upscale", getattr(model, "scale", 1)))


class _RestorationDataModule(ClassificationDataModule):
    """Loaders, checks and the scale taken from the model when ``scale`` is ``None``."""

    def __init__(
        self,
        scale: Optional[int],
        patch_size: int,
        augment: bool,
        dataset_enlarge_ratio: int,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int,
        seed: int,
        num_classes: int,
        in_chans: int,
        img_size: Optional[int],
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, num_classes, in_chans, img_size or patch_size)
        if scale is not None and (not isinstance(scale, int) or scale < 1):
            raise ValueError(f"scale must be a positive int or null (the model's), got {scale!r}")
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int (LQ pixels), got {patch_size!r}")
        if not isinstance(dataset_enlarge_ratio, int) or dataset_enlarge_ratio < 1:
            raise ValueError(f"dataset_enlarge_ratio must be a positive int, got {dataset_enlarge_ratio!r}")
        if num_classes != 0:
            raise ValueError(f"num_classes must be 0 for restoration data, got {num_classes}")
        self.scale = scale
        self.patch_size = patch_size
        self.augment = augment
        self.enlarge = dataset_enlarge_ratio

    def set_model(self, model: torch.nn.Module) -> None:
        """Take the scale from the model (``model.upscale``) unless ``scale`` was given; a mismatch is an error."""
        scale = model_scale(model)
        if self.scale is None:
            self.scale = scale
        elif self.scale != scale:
            raise ValueError(f"data scale={self.scale} but the model up-scales x{scale}")

    def _scale(self) -> int:
        return self.scale if self.scale is not None else 1


class PairedFolderDataModule(_RestorationDataModule):
    """Paired LQ/GT folders per split (DIV2K, Set5/Set14/Urban100, Outdoor-Rain, RainDrop, Snow100K; see module doc).

    Args:
        train, val, test: ``None`` or ``{gt_dir, lq_dir, lq_template='{key}', gt_suffix=''}``; ``test`` defaults to
            ``val``. ``lq_template`` may use ``{key}`` and ``{scale}``.
        root: the dataset folder (the configs build the split folders from it; kept as ``self.root``).
        scale: LQ -> GT size factor; ``None`` takes the model's.
        patch_size: LQ side of training patches (the GT patch is ``scale`` times larger).
        augment: random flips and transposes of training patches.
        dataset_enlarge_ratio: training images are visited this many times per epoch (BasicSR's option).
        verify: decode every GT and LQ file at setup (progress bar): a corrupt file is named before training.
    """

    def __init__(
        self,
        train: Optional[Mapping[str, Any]] = None,
        val: Optional[Mapping[str, Any]] = None,
        test: Optional[Mapping[str, Any]] = None,
        root: Optional[str] = None,
        scale: Optional[int] = None,
        patch_size: int = 64,
        augment: bool = True,
        dataset_enlarge_ratio: int = 1,
        batch_size: int = 16,
        eval_batch_size: int = 1,
        num_workers: int = 4,
        seed: int = 0,
        num_classes: int = 0,
        in_chans: int = 3,
        img_size: Optional[int] = None,
        verify: bool = False,
    ) -> None:
        super().__init__(
            scale, patch_size, augment, dataset_enlarge_ratio, batch_size, eval_batch_size, num_workers, seed,
            num_classes, in_chans, img_size,
        )
        self.root, self.verify = root, verify
        if train is None and val is None and test is None:
            raise ValueError("PairedFolderDataModule needs at least one of train, val, test ({gt_dir, lq_dir})")
        self.splits = {"train": train, "val": val, "test": test}
        for name, split in self.splits.items():
            if split is not None and not {"gt_dir", "lq_dir"} <= set(split):
                raise ValueError(f"{name} must give gt_dir and lq_dir, got keys {sorted(split)}")

    def _pairs(self, name: str) -> Optional[list[tuple[Path, Path]]]:
        split = self.splits[name]
        if split is None:
            return None
        pairs = find_pairs(
            split["gt_dir"], split["lq_dir"], split.get("lq_template", "{key}"), split.get("gt_suffix", ""),
            self._scale(),
        )
        if self.verify:
            verify_images([file for pair in pairs for file in pair], f"verifying {name}")
        return pairs

    def setup(self, stage: Optional[str] = None) -> None:
        scale = self._scale()
        if stage in (None, "fit") and self.splits["train"] is not None:
            self.train_set = PairedImageDataset(self._pairs("train"), scale, self.patch_size, self.augment, self.enlarge)
        if stage in (None, "fit", "validate", "test"):
            if self.splits["val"] is not None:
                self.val_set = PairedImageDataset(self._pairs("val"), scale)
            # test defaults to val: the same dataset, its folders listed once
            self.test_set = self.val_set if self.splits["test"] is None else PairedImageDataset(self._pairs("test"), scale)
        _logger.info("paired restoration data (scale %d): %s", scale, {
            k: len(v) for k, v in (("train", self.train_set), ("val", self.val_set), ("test", self.test_set))
            if v is not None
        })


class BicubicSRDataModule(_RestorationDataModule):
    """HR images per split, LQ made by bicubic down-sampling on the fly (``BicubicSRDataset``).

    Args:
        train, val, test: folders, image files or ``skimage:<name>`` entries (a list or one string); ``test`` defaults
            to ``val``.
        cache: keep decoded HR images in memory after their first read (each loader worker holds its own copy);
            ``False`` re-reads them for every sample, for HR sets too large to hold ``num_workers`` times (DIV2K).
        Other arguments as ``PairedFolderDataModule``.
    """

    def __init__(
        self,
        train: Optional[Union[str, Sequence[str]]] = None,
        val: Optional[Union[str, Sequence[str]]] = None,
        test: Optional[Union[str, Sequence[str]]] = None,
        scale: Optional[int] = None,
        patch_size: int = 64,
        augment: bool = True,
        dataset_enlarge_ratio: int = 1,
        batch_size: int = 16,
        eval_batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        num_classes: int = 0,
        in_chans: int = 3,
        img_size: Optional[int] = None,
        cache: bool = True,
    ) -> None:
        super().__init__(
            scale, patch_size, augment, dataset_enlarge_ratio, batch_size, eval_batch_size, num_workers, seed,
            num_classes, in_chans, img_size,
        )
        self.cache = cache
        if train is None and val is None and test is None:
            raise ValueError("BicubicSRDataModule needs at least one of train, val, test (HR image sources)")
        self.sources = {
            name: None if value is None else _expand_sources(value, name)
            for name, value in (("train", train), ("val", val), ("test", test))
        }

    def setup(self, stage: Optional[str] = None) -> None:
        scale = self._scale()
        if self.sources["train"] is not None and stage in (None, "fit"):
            self.train_set = BicubicSRDataset(
                self.sources["train"], scale, self.patch_size, self.augment, self.enlarge, cache=self.cache
            )
        if self.sources["val"] is not None:
            self.val_set = BicubicSRDataset(self.sources["val"], scale, cache=self.cache)
        # test defaults to val: the same dataset (and image cache), its sources listed and loaded once
        test = self.sources["test"]
        self.test_set = self.val_set if test is None else BicubicSRDataset(test, scale, cache=self.cache)

