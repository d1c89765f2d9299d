"""Training throughput of chanzoo's Lightning pipeline against a plain PyTorch loop, side by side.

Same model (SmallCNN + SE), same Fashion-MNIST batches and augmentation, same optimizer and schedule; validation
and checkpointing off in both so only the per-step overhead of the pipeline is compared.

    .venv/bin/python benchmarks/train_overhead.py [--steps 150] [--rounds 3] [--batch-size 128]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import lightning as L
import torch

import chanzoo
from chanzoo.data.fashion_mnist import MEAN, STD, FashionMNISTDataModule, random_shift_flip
from chanzoo.tasks import ClassificationTask
from chanzoo.tasks.optim import build_optimizer, build_scheduler

OPTIM = {"name": "adamw", "lr": 3e-3, "weight_decay": 0.05}
SCHED = {"name": "cosine", "warmup_epochs": 0, "min_lr": 1e-5}


class _StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.images = warmup, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start, self.images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.images += len(batch[0])
            self.end = time.perf_counter()


def lightning_throughput(steps: int, warmup: int, batch_size: int) -> float:
    dm = FashionMNISTDataModule(batch_size=batch_size, seed=0)
    task = ClassificationTask(chanzoo.create_model("small_cnn", attn="se"), OPTIM, SCHED, label_smoothing=0.1)
    timer = _StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps + warmup, limit_val_batches=0, logger=False,
        enable_checkpointing=False, callbacks=[timer], enable_model_summary=False, enable_progress_bar=True,
    )
    trainer.fit(task, datamodule=dm)
    return timer.images / (timer.end - timer.start)


def plain_throughput(steps: int, warmup: int, batch_size: int) -> float:
    dm = FashionMNISTDataModule(batch_size=batch_size, seed=0)
    dm.setup()
    model = chanzoo.create_model("small_cnn", attn="se").train()
    optimizer = build_optimizer(model, OPTIM, batch_size)
    scheduler = build_scheduler(optimizer, SCHED, 1, len(dm.train_set) // batch_size)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    images_seen, start = 0, 0.0
    for step, batch in enumerate(dm.train_dataloader()):
        if step == warmup:
            start, images_seen = time.perf_counter(), 0
        if step == steps + warmup:
            break
        images, labels = _augment(dm, batch)
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(step + 1)
        images_seen += len(labels)
    return images_seen / (time.perf_counter() - start)


def _augment(dm: FashionMNISTDataModule, batch):
    """The datamodule's training-time batch transform, outside a Trainer."""
    images, labels = batch
    images = random_shift_flip(images.float().div_(255.0), dm.pad, dm.hflip, dm.augment_generator)
    return (images - MEAN) / STD, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    plain, pipeline = [], []
    for _ in range(args.rounds):  # alternate so drift on a shared machine hits both alike
        plain.append(plain_throughput(args.steps, args.warmup, args.batch_size))
        pipeline.append(lightning_throughput(args.steps, args.warmup, args.batch_size))
    p, q = statistics.median(plain), statistics.median(pipeline)
    print(f"threads: {torch.get_num_threads()}  batch: {args.batch_size}  steps/round: {args.steps}  rounds: {args.rounds}")
    print(f"plain PyTorch loop : {p:8.1f} img/s  (rounds: {', '.join(f'{v:.0f}' for v in plain)})")
    print(f"chanzoo Lightning  : {q:8.1f} img/s  (rounds: {', '.join(f'{v:.0f}' for v in pipeline)})")
    print(f"ratio pipeline/plain: {q / p:.3f}x  (target >= 0.95x)")


if __name__ == "__main__":
    main()
