"""Overhead of chanzoo's dense tasks: training steps per second through ``DetectionTask`` / ``SegmentationTask``
under Lightning against a plain PyTorch loop over the same model, optimizer, data and batch, side by side in one
run; and COCO mAP evaluation time with the faster_coco_eval backend against pycocotools on the same predictions.

    python benchmarks/dense_overhead.py --steps 30 --rounds 2

Data: scikit-image's coins photo (each coin's box and mask from Otsu's threshold), at ``--size`` pixels, repeated
into batches of ``--batch`` images.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchmetrics.detection import MeanAveragePrecision

import chanzoo
from chanzoo.tasks.detection import DetectionTask
from chanzoo.tasks.segmentation import SegmentationTask

OPTIM = {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4}


def coins(size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(image 3xHxW in [0, 1], detection target, semantic mask) of the coins photo at ``size`` px (shorter side)."""
    from skimage import data, filters, measure, morphology, transform

    gray = data.coins()
    scale = size / min(gray.shape)
    gray = transform.rescale(gray, scale, anti_aliasing=True)
    labels = measure.label(morphology.closing(gray > filters.threshold_otsu(gray), morphology.disk(1)))
    regions = [r for r in measure.regionprops(labels) if 100 * scale**2 <= r.area <= 3000 * scale**2]
    boxes = [[r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]] for r in regions]
    classes = [2 if r.area > 2000 * scale**2 else 1 for r in regions]
    masks = np.stack([labels == r.label for r in regions])
    semantic = np.zeros(gray.shape, dtype=np.int64)
    for mask, cls in zip(masks, classes):
        semantic[mask] = cls
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(classes),
              "masks": torch.from_numpy(masks).to(torch.uint8)}
    return torch.from_numpy(np.repeat(gray[None], 3, axis=0)).float(), target, torch.from_numpy(semantic)


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, sample: Any, length: int) -> None:
        self.sample, self.length = sample, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.sample


def _detection_collate(batch: list) -> tuple[list, list]:
    return [b[0] for b in batch], [b[1] for b in batch]


class _StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.steps = warmup, 0.0, 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if idx >= self.warmup:
            self.steps += 1
            self.elapsed = time.perf_counter() - self.start


def through_task(make_task: Callable[[], L.LightningModule], loader: DataLoader, warmup: int) -> float:
    """Training steps per second of ``Trainer.fit`` on the task (after ``warmup`` steps)."""
    timer = _StepTimer(warmup)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer])
    trainer.fit(make_task(), train_dataloaders=loader)
    return timer.steps / timer.elapsed


def plain_loop(model: torch.nn.Module, loader: DataLoader, warmup: int, loss_fn: Callable[..., torch.Tensor]) -> float:
    """Training steps per second of a hand-written loop: forward, loss, zero_grad, backward, step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIM["lr"], weight_decay=OPTIM["weight_decay"])
    model.train()
    steps, start = 0, 0.0
    for index, batch in enumerate(loader):
        if index == warmup:
            start = time.perf_counter()
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += index >= warmup
    return steps / (time.perf_counter() - start)


def throughput(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    image, target, semantic = coins(args.size)
    det_loader = DataLoader(_Repeat((image, target), args.batch * (args.steps + args.warmup)), batch_size=args.batch,
                            collate_fn=_detection_collate)
    normalized = (image - 0.45) / 0.225
    seg_loader = DataLoader(_Repeat((normalized, semantic), args.batch * (args.steps + args.warmup)),
                            batch_size=args.batch)

    def detection_task() -> DetectionTask:
        torch.manual_seed(0)
        return DetectionTask(chanzoo.create_model(args.model, num_classes=0), OPTIM, {"name": "none"}, num_classes=2,
                             head="fcos", min_size=args.size, max_size=args.size * 2)

    def segmentation_task() -> SegmentationTask:
        torch.manual_seed(0)
        return SegmentationTask(chanzoo.create_model(args.model, num_classes=0), OPTIM, {"name": "none"},
                                num_classes=3, decoder="fpn")

    def detection_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return sum(model(batch[0], batch[1]).values())

    def segmentation_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], ignore_index=255)

    rows = []
    for name, make_task, loader, loss_fn in (
        ("detection (FCOS)", detection_task, det_loader, detection_loss),
        ("segmentation (FPN)", segmentation_task, seg_loader, segmentation_loss),
    ):
        task_rates, plain_rates = [], []
        for _ in range(args.rounds):  # alternate, so that load changes on the machine hit both alike
            plain_rates.append(plain_loop(make_task().model, loader, args.warmup, loss_fn))
            task_rates.append(through_task(make_task, loader, args.warmup))
        rows.append((name, statistics.median(task_rates), statistics.median(plain_rates)))
    return rows


def map_eval_times(num_images: int, rounds: int) -> dict[str, float]:
    """Seconds for ``compute()`` of box mAP over ``num_images`` coins images with fixed perturbed predictions."""
    _, target, _ = coins(303)
    rng = np.random.default_rng(0)
    preds, gts = [], []
    for _ in range(num_images):
        boxes = target["boxes"] + torch.from_numpy(rng.normal(0, 3, target["boxes"].shape)).float()
        scores = torch.from_numpy(rng.uniform(0.05, 1.0, len(boxes))).float()
        preds.append({"boxes": boxes, "scores": scores, "labels": target["labels"]})
        gts.append({"boxes": target["boxes"], "labels": target["labels"]})
    times: dict[str, list[float]] = {"faster_coco_eval": [], "pycocotools": []}
    for _ in range(rounds):
        for backend in times:
            metric = MeanAveragePrecision(iou_type="bbox", backend=backend)
            metric.update(preds, gts)
            start = time.perf_counter()
            metric.compute()
            times[backend].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternating task / plain measurements")
    parser.add_argument("--map-images", type=int, default=500)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"{args.model}, {args.size} px, batch {args.batch}, {args.steps} steps x {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"{'training':<20} {'task steps/s':>13} {'plain steps/s':>14} {'ratio':>6}")
    for name, task_rate, plain_rate in throughput(args):
        print(f"{name:<20} {task_rate:>13.2f} {plain_rate:>14.2f} {task_rate / plain_rate:>6.3f}")
    times = map_eval_times(args.map_images, args.rounds)
    print(f"box mAP compute over {args.map_images} images: faster_coco_eval {times['faster_coco_eval']:.3f} s, "
          f"pycocotools {times['pycocotools']:.3f} s ({times['pycocotools'] / times['faster_coco_eval']:.1f}x)")


if __name__ == "__main__":
    main()
