"""ClassificationTask's training options on Fashion-MNIST: label smoothing, mixup / cutmix targets (timm's ``Mixup``)
and the EMA model (timm's ``ModelEmaV3``), each against a computation written out here."""
from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chanzoo
from chanzoo.data.fashion_mnist import MEAN, STD, FashionMNISTDataModule, load_fashion_mnist
from chanzoo.tasks import ClassificationTask

OPTIM = {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0}
SCHED = {"name": "none"}


def _batch(n: int = 16, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised Fashion-MNIST training images (n, 1, 28, 28) and their labels."""
    images, labels = load_fashion_mnist(split="train")
    return (images[start : start + n].float() / 255 - MEAN) / STD, labels[start : start + n]


def _task(**kwargs) -> ClassificationTask:
    torch.manual_seed(0)
    model = chanzoo.create_model("small_cnn", num_classes=10, in_chans=1)
    return ClassificationTask(model, optim=OPTIM, sched=SCHED, **kwargs)


def _recorded_training_step(task: ClassificationTask, images: torch.Tensor, labels: torch.Tensor):
    """Run one training step; returns (images the model saw, targets and logits the loss saw, the loss)."""
    seen = {}
    hooks = [
        task.model.register_forward_pre_hook(lambda module, args: seen.setdefault("images", args[0].clone())),
        task.train_loss.register_forward_hook(lambda module, args, out: seen.update(logits=args[0], targets=args[1])),
    ]
    loss = task.training_step([images.clone(), labels.clone()], 0)
    for hook in hooks:
        hook.remove()
    return seen["images"], seen["targets"], seen["logits"], loss


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_label_smoothing_loss_equals_the_smoothed_cross_entropy():
    """Training loss with smoothing eps: (1 - eps) * NLL of the true class + eps * mean over classes of -log p."""
    images, labels = _batch()
    eps = 0.1
    task = _task(label_smoothing=eps)
    with torch.no_grad():  # confident predictions, where smoothing makes a difference
        task.model.get_classifier().weight.mul_(50)
    _, targets, logits, loss = _recorded_training_step(task, images, labels)
    assert torch.equal(targets, labels)  # no mixup: hard labels, smoothed inside the loss
    log_p = F.log_softmax(logits.detach().double(), dim=1)
    manual = ((1 - eps) * -log_p.gather(1, labels[:, None])[:, 0] + eps * -log_p.mean(1)).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    plain = F.cross_entropy(logits.detach().double(), labels)
    assert abs(loss.item() - plain.item()) > 0.03  # smoothing changed the loss
    # evaluation reports the unsmoothed loss
    with torch.no_grad():
        assert task.eval_loss(logits, labels).item() == pytest.approx(plain.item(), rel=1e-5)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixup_and_cutmix_mix_images_and_targets_as_timm_defines(kind):
    """Batch mode: each image mixed with the batch's reverse (flip(0)); targets lam * y + (1 - lam) * y.flip(0) with
    y the label-smoothed one-hot (off eps / C, on 1 - eps + eps / C), lam read back from the images (mixup: the
    blend factor; cutmix: 1 - box area / image area); the loss is the soft-target cross-entropy."""
    images, labels = _batch()
    eps, classes = 0.1, 10
    mixup = {"mixup_alpha": 0.8, "cutmix_alpha": 0.0, "prob": 1.0, "mode": "batch"}
    if kind == "cutmix":
        mixup.update(mixup_alpha=0.0, cutmix_alpha=1.0)
    task = _task(label_smoothing=eps, mixup=mixup)
    np.random.seed(3)  # timm draws lam and the box with numpy
    seen, targets, logits, loss = _recorded_training_step(task, images, labels)
    other = images.flip(0)
    if kind == "mixup":
        lam = ((seen - other) * (images - other)).sum() / (images - other).square().sum()
        torch.testing.assert_close(seen, lam * images + (1 - lam) * other, rtol=0, atol=1e-5)
    else:
        pasted = (seen != images).any(dim=(0, 1))  # the box: pixels taken from the reversed batch
        rows, cols = pasted.any(1).nonzero()[:, 0], pasted.any(0).nonzero()[:, 0]
        box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
        expected = images.clone()
        expected[..., box[0], box[1]] = other[..., box[0], box[1]]
        assert torch.equal(seen, expected)
        lam = torch.tensor(1 - (box[0].stop - box[0].start) * (box[1].stop - box[1].start) / (28 * 28))
    assert 0.05 < float(lam) < 0.95, float(lam)  # a real mix, not one of the two images
    smoothed = torch.full((len(labels), classes), eps / classes).scatter_(1, labels[:, None], 1 - eps + eps / classes)
    torch.testing.assert_close(targets, lam * smoothed + (1 - lam) * smoothed.flip(0), rtol=0, atol=1e-5)
    assert targets.sum(1).allclose(torch.ones(len(labels)))
    manual = -(targets * F.log_softmax(logits.detach(), dim=1)).sum(1).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


class _RecordWeights(L.Callback):
    """The raw model's weights and the global step after every optimisation step."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})
        self.steps.append(trainer.global_step)


def test_ema_weights_follow_the_moving_average_of_the_trained_weights():
    """After n steps with decay d, the EMA model holds e_n with e_1 = w_1 (timm's first update copies) and
    e_k = d * e_(k-1) + (1 - d) * w_k, for parameters and float buffers alike; it differs from the raw weights and
    is the model validated as ``val_ema/*``."""
    decay = 0.6
    task = _task(ema_decay=decay)
    dm = FashionMNISTDataModule(subset=400, batch_size=32, eval_batch_size=80, seed=0)
    recorder = _RecordWeights()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", callbacks=[recorder])
    trainer.fit(task, datamodule=dm)
    assert recorder.steps == list(range(1, 11))  # 320 training images / 32
    manual = dict(recorder.states[0])
    for state in recorder.states[1:]:
        manual = {k: decay * manual[k] + (1 - decay) * v if v.is_floating_point() else v for k, v in state.items()}
    ema, raw = task.model_ema.module.state_dict(), task.model.state_dict()
    assert ema.keys() == manual.keys()
    for key, value in manual.items():
        if value.is_floating_point():
            torch.testing.assert_close(ema[key], value, rtol=1e-5, atol=1e-6, msg=key)
    moved = [k for k in raw if raw[k].is_floating_point() and not torch.allclose(ema[k], raw[k], atol=1e-4)]
    assert len(moved) > len(raw) // 2, "the EMA is (almost) the raw model"

    images, labels = dm.val_set.tensors
    with torch.no_grad():
        ema_model = task.model_ema.module.eval()
        accuracy = (ema_model((images.float() / 255 - MEAN) / STD).argmax(1) == labels).float().mean().item()
    assert float(trainer.callback_metrics["val_ema/acc1"]) == pytest.approx(accuracy, abs=1e-6)
