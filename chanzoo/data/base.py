"""Shared loader logic of chanzoo's classification datamodules."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from tqdm import tqdm
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

_logger = logging.getLogger(__name__)


def verify_images(files: Iterable[Union[str, Path]], desc: str = "verifying images") -> int:
    """Decode every image file (``data.verify=true``), with a progress bar; the first one that does not decode is
    a ``ValueError`` naming it. Returns how many were checked."""
    files = list(files)
    for file in tqdm(files, desc=desc, unit="img", mininterval=1.0):
        try:
            with Image.open(file) as img:
                img.load()
        except (OSError, ValueError, SyntaxError) as err:
            raise ValueError(f"corrupt or unreadable image file {file}: {err}") from None
    _logger.info("%s: all %d files decode", desc, len(files))
    return len(files)


def loader_sampler(dataset: Dataset, train: bool, trainer: Optional[L.Trainer], seed: int,
                   generators: Sequence[torch.Generator]) -> Optional[DistributedSampler]:
    """The sampler of a datamodule's loader: ``EpochSampler`` for training (sharded, re-seeding ``generators`` each
    epoch); for evaluation under DDP one that never repeats a sample (Lightning's default ``DistributedSampler``
    pads the last rank with repeats, which would count them twice in accuracy, mAP or mIoU); ``None`` otherwise and
    for iterable datasets, which shard themselves."""
    if isinstance(dataset, IterableDataset):
        return None
    world_size = trainer.world_size if trainer is not None else 1
    rank = trainer.global_rank if trainer is not None else 0
    if train:
        return EpochSampler(dataset, num_replicas=world_size, rank=rank, seed=seed, generators=generators)
    if world_size > 1:
        return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return None


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` that also re-seeds ``generators`` from (seed, epoch, rank) in every ``set_epoch``.

    Lightning calls ``set_epoch`` before it fetches an epoch's first batch, so the batch order, the loader's worker
    seeds and any augmentation drawn from these generators depend only on the epoch: a run resumed from an
    epoch-end checkpoint sees exactly the batches the uninterrupted run saw.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, generators: Sequence[torch.Generator]):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.generators = list(generators)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for i, generator in enumerate(self.generators):
            generator.manual_seed(((self.seed * 1_000_003 + epoch) * 1009 + self.rank) * 31 + i)


class ClassificationDataModule(L.LightningDataModule):
    """Holds ``train_set``/``val_set``/``test_set`` and builds their loaders.

    The training loader shuffles with an ``EpochSampler`` built for the trainer's world size (one replica when not
    distributed); ``loader_generator`` (worker seeds) and ``augment_generator`` (augmentation done on the batch after
    transfer) are re-seeded by it every epoch.
    """

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: Optional[int],
        num_workers: int,
        seed: int,
        num_classes: int,
        in_chans: int,
        img_size: int,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None
        self.loader_generator = torch.Generator()
        self.augment_generator = torch.Generator()

    def _loader(self, dataset: Optional[Dataset], train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its loaders are requested")
        sampler = loader_sampler(dataset, train, self.trainer, self.seed, (self.loader_generator, self.augment_generator))
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=False,
            generator=self.loader_generator if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
