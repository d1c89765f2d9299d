"""Task sequences: class subsets of Fashion-MNIST and of an image folder, one image folder per task, and the errors
a wrong sequence gets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chanzoo.continual.sequence import build_sequence
from chanzoo.data.fashion_mnist import load_fashion_mnist

FMNIST = {"_target_": "chanzoo.data.FashionMNISTDataModule", "subset": 2000, "batch_size": 50, "eval_batch_size": 100}


def test_split_fashion_mnist_keeps_each_pair_relabelled() -> None:
    tasks = build_sequence({"data": FMNIST, "classes_per_task": 2})
    assert [t.classes for t in tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    _, train_labels = load_fashion_mnist(split="train")
    _, test_labels = load_fashion_mnist(split="test")
    source = tasks[0].datamodule
    for task in tasks:
        dm = task.datamodule
        assert dm.num_classes == 2 and dm.batch_size == 50
        for split, labels in (("test_set", test_labels[:400]),):
            for new, old in enumerate(task.classes):
                assert int((getattr(dm, split).tensors[1] == new).sum()) == int((labels == old).sum())
        # train + val of all tasks partition the source's 2000 training images
        assert set(torch.unique(dm.train_set.tensors[1]).tolist()) == {0, 1}
    total = sum(len(t.datamodule.train_set) + len(t.datamodule.val_set) for t in tasks)
    assert total == 2000 and int(torch.isin(train_labels[:2000], torch.tensor([2, 3])).sum()) == len(
        tasks[1].datamodule.train_set) + len(tasks[1].datamodule.val_set)
    # the views share the source's batch hooks: a test batch comes out normalised as in a plain run
    images, labels = tasks[1].datamodule.on_after_batch_transfer(next(iter(tasks[1].datamodule.test_dataloader())), 0)
    raw = tasks[1].datamodule.test_set.tensors[0][:100].float() / 255
    torch.testing.assert_close(images, (raw - 0.2860) / 0.3530)
    assert source is not tasks[1].datamodule and labels.max() == 1


def write_folder(root: Path, photos: dict[str, np.ndarray], classes: dict[str, list[str]]) -> Path:
    """An ImageNet-layout folder: <root>/{train,val}/<class>/*.png, crops of real photos."""
    for split, offset in (("train", 0), ("val", 40)):
        for name, sources in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, photo in enumerate(sources):
                for k in range(3):
                    crop = photos[photo][offset + 30 * k: offset + 30 * k + 96, 60 * i: 60 * i + 96]
                    Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{i}_{k}.png")
    return root


FOLDER = {"_target_": "chanzoo.data.ImageFolderDataModule", "img_size": 32, "batch_size": 4, "num_workers": 0,
          "auto_augment": None, "re_prob": 0.0, "color_jitter": None}


def test_image_folder_class_subsets_by_name_and_one_task_per_root(
    photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    root = write_folder(tmp_path / "pets", photos, {"astronaut": ["astronaut"], "cat": ["chelsea"],
                                                    "coffee": ["coffee"], "rocket": ["rocket"]})
    tasks = build_sequence({"data": {**FOLDER, "root": str(root)},
                            "tasks": [{"classes": ["rocket", "cat"], "name": "a"}, {"classes": [0, 2], "name": "b"}]})
    assert [t.class_names for t in tasks] == [["rocket", "cat"], ["astronaut", "coffee"]]
    images, _ = next(iter(tasks[0].datamodule.test_dataloader()))
    assert images.shape == (4, 3, 32, 32) and len(tasks[0].datamodule.test_set) == 6
    rocket = tasks[0].datamodule.test_set
    assert [rocket[i][1] for i in range(6)] == [1, 1, 1, 0, 0, 0]  # cat -> 1, rocket -> 0 (folder order: cat first)

    other = write_folder(tmp_path / "more", photos, {"a": ["coffee"], "b": ["rocket"], "c": ["chelsea"]})
    tasks = build_sequence({"data": FOLDER, "roots": [str(root), str(other)]})
    assert [(t.name, t.num_classes) for t in tasks] == [("pets", 4), ("more", 3)]
    assert len(tasks[1].datamodule.train_set) == 9


@pytest.mark.parametrize("spec, message", [
    ({"data": FMNIST, "classes_per_task": 3}, "classes_per_task=3 does not divide the data's 10 classes"),
    ({"data": FMNIST, "classes_per_task": 2, "tasks": [{"classes": [0, 1]}]}, "exactly one of classes_per_task"),
    ({"data": FMNIST, "tasks": [{"classes": [0, 12]}]}, r"class 12 must be a class id in 0\.\.9"),
    ({"data": FMNIST, "tasks": [{"classes": ["Trouser", "Bag"]}]}, "class 'Trouser' is not a class name"),
    ({"data": FMNIST, "tasks": [{"classes": [3, 3]}]}, "must be at least two distinct classes"),
    ({"data": FMNIST, "tasks": [{"classes": [0, 1], "labels": 2}]}, r"unknown key\(s\) \['labels'\]"),
    ({"roots": ["/nowhere"]}, "roots: needs `data`"),
    ({"data": {**FMNIST, "batch_size": 400}, "classes_per_task": 2},
     r"task .task0. has 3\d\d training samples, fewer than one batch of data.batch_size=400"),
])
def test_sequence_errors_name_the_problem(spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_sequence(spec)
