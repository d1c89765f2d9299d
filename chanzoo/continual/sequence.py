"""Task sequences for continual learning, cut from chanzoo's classification datamodules.

A sequence is a list of tasks; each task is a view of a datamodule that holds only the task's classes, relabelled
0..k-1 in the order given (task-incremental: every task has its own head). Three ways to write one (the
``continual`` config group):

* ``classes_per_task: k``: consecutive groups of k classes of ``data`` (Split-Fashion-MNIST: 5 tasks of 2);
* ``tasks: [{classes: [...]}, ...]``: explicit class lists (ids, or class-folder names where the datamodule has
  ``classes``), each entry optionally with its own ``data`` config and ``name``;
* ``roots: [...]``: one task per ImageNet-layout folder, each from ``data`` with its ``root`` replaced (unrelated
  datasets one after another, the CLR paper's setting).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import lightning as L
import torch
from hydra.utils import instantiate
from torch.utils.data import Dataset, Subset, TensorDataset

_logger = logging.getLogger(__name__)


@dataclass
class SequenceTask:
    """One task of a sequence: its name, the source labels it keeps (in head order) and a datamodule view."""

    name: str
    classes: list[int]
    class_names: list[str]
    datamodule: L.LightningDataModule

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """The labels of ``dataset`` without loading its images (TensorDataset, Subset, ``targets``, timm readers)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices)]
    targets = getattr(dataset, "targets", None)
    samples = getattr(getattr(dataset, "reader", None), "samples", None)
    if targets is None and samples is not None:  # timm's ImageDataset over a folder reader
        targets = [target for _, target in samples]
    if targets is None:
        raise TypeError(
            f"cannot read the labels of a {type(dataset).__name__} without loading it: class subsets need a "
            "TensorDataset, a Subset, a dataset with `targets`, or a timm ImageDataset"
        )
    return torch.as_tensor(targets)


class ClassSubset(Dataset):
    """The samples of ``dataset`` at ``indices``, labels mapped through ``label_map`` (source label -> task label)."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor, label_map: Mapping[int, int]) -> None:
        self.dataset, self.indices, self.label_map = dataset, indices.tolist(), dict(label_map)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        sample, target = self.dataset[self.indices[index]][:2]
        return sample, self.label_map[int(target)]


def class_subset(dataset: Dataset, classes: Sequence[int]) -> Dataset:
    """The samples of ``dataset`` whose label is in ``classes``, relabelled to their position in ``classes``."""
    targets = dataset_targets(dataset)
    label_map = {c: i for i, c in enumerate(classes)}
    keep = torch.isin(targets, torch.tensor(list(classes), dtype=targets.dtype)).nonzero().flatten()
    if isinstance(dataset, TensorDataset):  # in memory: slice once instead of mapping every sample
        lookup = torch.full((int(targets.max()) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(list(classes))] = torch.arange(len(classes))
        return TensorDataset(*(t[keep] for t in dataset.tensors[:-1]), lookup[targets[keep]])
    return ClassSubset(dataset, keep, label_map)


def class_subset_view(source: L.LightningDataModule, classes: Sequence[int]) -> L.LightningDataModule:
    """A shallow copy of the set-up ``source`` whose train/val/test sets hold only ``classes`` (relabelled).

    The copy keeps the source's loaders and batch hooks (normalisation, augmentation on the device), so a task sees
    its data exactly as a plain run on the source would.
    """
    view = copy.copy(source)
    for split in ("train_set", "val_set", "test_set"):
        dataset = getattr(source, split, None)
        if dataset is None:
            raise ValueError(f"{type(source).__name__} has no {split} after setup(): a task needs train, val and test")
        subset = class_subset(dataset, classes)
        if len(subset) == 0:
            raise ValueError(f"classes {list(classes)} have no sample in the {split} of {type(source).__name__}")
        setattr(view, split, subset)
    view.num_classes = len(classes)
    view.trainer = None
    return view


def _num_classes(datamodule: L.LightningDataModule) -> int:
    num_classes = int(getattr(datamodule, "num_classes", 0) or 0)
    if num_classes < 1:
        raise ValueError(f"{type(datamodule).__name__} does not say its num_classes; a sequence needs it")
    return num_classes


def _class_ids(classes: Sequence[Any], names: Optional[Sequence[str]], num_classes: int, task: str) -> list[int]:
    ids = []
    for c in classes:
        if isinstance(c, str):
            if not names or c not in names:
                raise ValueError(f"task {task!r}: class {c!r} is not a class name of its data (names: {names})")
            ids.append(list(names).index(c))
        elif isinstance(c, int) and not isinstance(c, bool) and 0 <= c < num_classes:
            ids.append(c)
        else:
            raise ValueError(f"task {task!r}: class {c!r} must be a class id in 0..{num_classes - 1} or a class name")
    if len(set(ids)) != len(ids) or len(ids) < 2:
        raise ValueError(f"task {task!r}: classes {list(classes)} must be at least two distinct classes")
    return ids


def _setup(data_cfg: Mapping[str, Any], cache: dict[str, L.LightningDataModule]) -> L.LightningDataModule:
    """Instantiate and set up a datamodule config; equal configs share one instance (loaded once)."""
    key = repr(sorted(data_cfg.items()))
    if key not in cache:
        datamodule = instantiate({k: v for k, v in data_cfg.items() if k != "name"})
        datamodule.setup(None)
        cache[key] = datamodule
    return cache[key]


def build_sequence(spec: Mapping[str, Any]) -> list[SequenceTask]:
    """The tasks of a ``continual`` config (see the module docstring), each set up and ready to train."""
    spec = dict(spec)
    data_cfg = spec.get("data")
    forms = [k for k in ("classes_per_task", "tasks", "roots") if spec.get(k) not in (None, [], 0)]
    if len(forms) != 1:
        raise ValueError(f"a sequence takes exactly one of classes_per_task, tasks, roots; got {forms or 'none'}")
    if spec.get("tasks"):
        entries = [dict(entry) for entry in spec["tasks"]]
    elif spec.get("roots"):
        if not data_cfg:
            raise ValueError("roots: needs `data`, the datamodule config each root is read with")
        entries = [{"data": {**data_cfg, "root": str(root)}, "name": Path(str(root)).name} for root in spec["roots"]]
    else:
        entries = []
    cache: dict[str, L.LightningDataModule] = {}
    if not entries:
        per_task = spec["classes_per_task"]
        if not isinstance(per_task, int) or per_task < 2:
            raise ValueError(f"classes_per_task must be an int >= 2, got {per_task!r}")
        if not data_cfg:
            raise ValueError("classes_per_task: needs `data`, the datamodule the tasks are cut from")
        total = _num_classes(_setup(data_cfg, cache))
        if total % per_task:
            raise ValueError(f"classes_per_task={per_task} does not divide the data's {total} classes")
        entries = [{"classes": list(range(start, start + per_task))} for start in range(0, total, per_task)]
    tasks = []
    for index, entry in enumerate(entries):
        unknown = sorted(set(entry) - {"name", "data", "classes"})
        if unknown:
            raise ValueError(f"task {index}: unknown key(s) {unknown}; allowed: name, data, classes")
        task_data = entry.get("data") or data_cfg
        if not task_data:
            raise ValueError(f"task {index} has no data config (give the sequence's `data` or the task's own)")
        source = _setup(dict(task_data), cache)
        total = _num_classes(source)
        names = list(getattr(source, "classes", None) or [])
        name = str(entry.get("name") or f"task{index}")
        classes = _class_ids(entry.get("classes") or list(range(total)), names, total, name)
        view = class_subset_view(source, classes) if classes != list(range(total)) else source
        class_names = [names[c] if c < len(names) else str(c) for c in classes]
        batch_size = int(getattr(view, "batch_size", 1))
        if len(view.train_set) < batch_size:  # the training loader drops the last partial batch
            raise ValueError(
                f"task {name!r} has {len(view.train_set)} training samples, fewer than one batch of "
                f"data.batch_size={batch_size}: it would train no step; lower the batch size"
            )
        tasks.append(SequenceTask(name=name, classes=classes, class_names=class_names, datamodule=view))
        _logger.info("task %d %s: classes %s, %d train / %d test samples", index, name, class_names,
                     len(view.train_set), len(view.test_set))
    if len({t.name for t in tasks}) != len(tasks):
        raise ValueError(f"task names must differ, got {[t.name for t in tasks]}")
    return tasks
