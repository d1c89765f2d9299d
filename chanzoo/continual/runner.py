"""The continual-learning run: a task sequence learned by one method on one anchor, every task tested after every
later one (``python train.py task=continual ...``, dispatched here by ``chanzoo.run.train``)."""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch import nn

from chanzoo.channel.clr import classifier_name, save_tensors
from chanzoo.continual.convert import read_state_dict
from chanzoo.continual.methods import ContinualMethod, create_method
from chanzoo.continual.metrics import (
    average_accuracy,
    backward_transfer,
    comparison_row,
    comparison_table,
    forgetting,
    matrix_table,
    save_heatmaps,
)
from chanzoo.continual.sequence import SequenceTask, build_sequence
from chanzoo.continual.training import fit_task, predict
from chanzoo.run import build_model

_logger = logging.getLogger(__name__)

RESULTS_FILE = "continual.json"
ANCHOR_SOURCES = ("first_task", "checkpoint", "model")
FitFn = Callable[[ContinualMethod, SequenceTask, int], float]


class ContinualRunner:
    """Learns ``tasks`` in order with ``method``; after each task, tests it and every earlier task.

    ``R[i][j]`` is the test accuracy on task j after task i was trained. Each task's test logits right after its own
    training are kept, and every later test of that task is compared with them bit for bit (``torch.equal``):
    ``identical[i][j]`` says whether task j's predictions after task i are exactly those.

    Args:
        method: the continual method (holds the model).
        tasks: the sequence.
        fit: trains ``method.model`` on a task (given the method, the task and its index); returns seconds.
        device: where predictions run.
        task_dir: if given, each task's kept state goes to ``task_dir/<index>_<name>.safetensors``.
    """

    def __init__(
        self,
        method: ContinualMethod,
        tasks: list[SequenceTask],
        fit: FitFn,
        device: torch.device | str = "cpu",
        task_dir: Optional[Path] = None,
    ) -> None:
        if not tasks:
            raise ValueError("a continual run needs at least one task")
        self.method, self.tasks, self.fit, self.task_dir = method, tasks, fit, task_dir
        self.device = torch.device(device)
        n = len(tasks)
        self.accuracy = [[math.nan] * n for _ in range(n)]
        self.identical: list[list[Optional[bool]]] = [[None] * n for _ in range(n)]
        self.states: list[dict[str, torch.Tensor]] = []
        self.reference: list[torch.Tensor] = []
        self.train_seconds: list[float] = []
        self.task_files: list[str] = []

    def task_file(self, index: int) -> Path:
        if self.task_dir is None:
            raise ValueError("this runner keeps no task files (task_dir=None)")
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.tasks[index].name)
        return self.task_dir / f"{index}_{name}.safetensors"

    def predict(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Test logits and labels of task ``index`` with its kept state."""
        model = self.method.use_task(self.states[index])
        return predict(model, self.tasks[index].datamodule, self.device)

    def learn(self, index: int) -> None:
        """Train task ``index`` (the next one), keep its state, then test it and every earlier task."""
        if index != len(self.states):
            raise ValueError(f"tasks are learned in order: next is task {len(self.states)}, got {index}")
        task = self.tasks[index]
        self.method.start_task(task.num_classes)
        self.train_seconds.append(self.fit(self.method, task, index))
        self.states.append(self.method.task_state())
        if self.task_dir is not None:
            self.task_files.append(str(save_tensors(self.states[-1], self.task_file(index))))
        for j in range(index + 1):
            logits, labels = self.predict(j)
            if j == index:
                self.reference.append(logits)
            self.accuracy[index][j] = (logits.argmax(1) == labels).float().mean().item()
            self.identical[index][j] = torch.equal(logits, self.reference[j])
        row = ", ".join(f"{100 * a:.2f}" for a in self.accuracy[index][: index + 1])
        _logger.info("after task %d (%s, %.1f s): accuracy %% on tasks 0..%d: %s", index, task.name,
                     self.train_seconds[-1], index, row)

    def results(self) -> dict[str, Any]:
        """Everything the run measured (JSON-ready); the matrix metrics once every task is learned."""
        if len(self.states) != len(self.tasks):
            raise ValueError(f"{len(self.states)} of {len(self.tasks)} tasks learned; results need all of them")
        added = [self.method.added_parameters(state) for state in self.states]
        earlier = [self.identical[i][j] for i in range(len(self.tasks)) for j in range(i)]
        return {
            "method": self.method.name,
            "tasks": [
                {"name": t.name, "classes": t.classes, "class_names": t.class_names,
                 "train_samples": len(t.datamodule.train_set), "test_samples": len(t.datamodule.test_set)}
                for t in self.tasks
            ],
            "accuracy": [[None if math.isnan(v) else v for v in row] for row in self.accuracy],
            "identical": self.identical,
            "avg_acc": average_accuracy(self.accuracy),
            "bwt": backward_transfer(self.accuracy),
            "forgetting": forgetting(self.accuracy),
            "exact_zero_forgetting": all(earlier),
            "params_added": [a for a, _ in added],
            "head_params": [h for _, h in added],
            "backbone_params": self.method.backbone_params,
            "train_seconds": self.train_seconds,
            "task_files": self.task_files,
        }


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def _device(accelerator: str) -> torch.device:
    return torch.device("cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu")


def load_backbone(model: nn.Module, path: str) -> None:
    """Load the weights of a ``train.py`` checkpoint or a state-dict file into ``model``, all but its classifier."""
    state = read_state_dict(path, argument="task.anchor.path")
    if isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint: the task holds the network as `model`
        state = {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
    head = f"{classifier_name(model)}."
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    expected = {k for k in model.state_dict() if not k.startswith(head)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"task.anchor.path={path!r} does not fit {type(model).__name__}: missing keys {missing[:5]}, unexpected "
            f"keys {unexpected[:5]}"
        )
    wrong = [k for k in state if state[k].shape != model.state_dict()[k].shape]
    if wrong:
        raise ValueError(
            f"task.anchor.path={path!r} does not fit {type(model).__name__}: shapes differ for {wrong[:5]}"
        )
    model.load_state_dict(state, strict=False)


def anchor_cache_key(cfg: DictConfig) -> str:
    """A digest of everything that decides the anchor trained on the first task."""
    keys = ("model", "continual", "optim", "sched", "trainer", "seed", "deterministic")
    payload = {k: _plain(cfg.get(k)) for k in keys}
    payload["anchor"] = {k: v for k, v in _plain(cfg.task.anchor).items() if k != "cache_dir"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_anchor(cfg: DictConfig, first: SequenceTask, out_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The anchor network (head sized for the first task) and a record of where it came from.

    ``task.anchor.source``: 'model' (the model config as built, e.g. timm weights through ``model.pretrained`` or
    ``model.pretrained_file``), 'checkpoint' (``task.anchor.path``: a ``train.py`` .ckpt or a state-dict file; its
    classifier is not loaded) or 'first_task' (trained on the first task for ``task.anchor.epochs``, cached under
    ``task.anchor.cache_dir`` so that the methods of a multirun share one anchor).
    """
    spec = _plain(cfg.task.anchor)
    source = spec.get("source")
    if source not in ANCHOR_SOURCES:
        raise ValueError(f"task.anchor.source must be one of {list(ANCHOR_SOURCES)}, got {source!r}")
    model_cfg = {**_plain(cfg.model), "num_classes": first.num_classes}
    if source == "checkpoint":
        if not spec.get("path"):
            raise ValueError("task.anchor.source=checkpoint needs task.anchor.path=<.ckpt or weights file>")
        model = build_model({**model_cfg, "pretrained": False, "pretrained_file": None})
        load_backbone(model, str(spec["path"]))
        return model, {"source": source, "path": str(spec["path"])}
    model = build_model(model_cfg)
    if source == "model":
        return model, {"source": source, "pretrained": bool(model_cfg.get("pretrained")),
                       "pretrained_file": model_cfg.get("pretrained_file")}
    cache = Path(spec["cache_dir"]) / f"{anchor_cache_key(cfg)}.safetensors" if spec.get("cache_dir") else None
    info: dict[str, Any] = {"source": source, "task": first.name, "epochs": int(spec["epochs"])}
    if cache is not None and cache.is_file():
        model.load_state_dict(load_file(str(cache)))
        _logger.info("anchor: %s (trained on task %s earlier)", cache, first.name)
        return model, {**info, **json.loads(cache.with_suffix(".json").read_text()), "cached": str(cache)}
    L.seed_everything(int(cfg.seed), workers=True)
    seconds = fit_task(model, first.datamodule, _plain(cfg.trainer), _plain(cfg.optim), _plain(cfg.sched),
                       out_dir / "anchor", max_epochs=int(spec["epochs"]))
    logits, labels = predict(model, first.datamodule, _device(cfg.trainer.get("accelerator", "auto")))
    info.update(train_seconds=seconds, test_acc=(logits.argmax(1) == labels).float().mean().item())
    _logger.info("anchor trained on task %s in %.1f s: test accuracy %.2f%%", first.name, seconds,
                 100 * info["test_acc"])
    if cache is not None:
        save_tensors(model.state_dict(), cache)
        cache.with_suffix(".json").write_text(json.dumps(info))
    return model, info


def write_results(result: dict[str, Any], out_dir: Path) -> dict[str, float]:
    """``continual.json``, ``accuracy_matrix.md`` (R and the summary table), ``accuracy_matrix.png`` and
    ``metrics.json`` (flat ``continual/*`` figures) in ``out_dir``; returns the flat figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS_FILE).write_text(json.dumps(result, indent=2))
    names = [t["name"] for t in result["tasks"]]
    matrix = [[math.nan if v is None else v for v in row] for row in result["accuracy"]]
    row = comparison_row(result)
    text = f"# {row['method']} on {result.get('sequence', 'the sequence')}\n\nAccuracy (%) R[i][j]:\n\n"
    text += matrix_table(matrix, names) + "\n" + comparison_table([row])
    (out_dir / "accuracy_matrix.md").write_text(text)
    save_heatmaps([(matrix, names, f"{row['method']}: avg {row['avg_acc']:.2f}%, BWT {row['bwt']:+.2f}")],
                  out_dir / "accuracy_matrix.png")
    metrics = {f"continual/{k}": float(v) for k, v in row.items() if k != "method"}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    _logger.info("continual results (also in %s):\n%s\n%s", out_dir, matrix_table(matrix, names),
                 comparison_table([row]))
    return metrics


def _output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()


def run_continual(cfg: DictConfig) -> dict[str, float]:
    """Learn the ``continual`` sequence with ``task.method``; writes the results into the run folder."""
    out_dir = _output_dir()
    L.seed_everything(int(cfg.seed), workers=True)
    task_cfg = _plain(cfg.task)
    tasks = build_sequence(_plain(cfg.continual))
    anchor, anchor_info = build_anchor(cfg, tasks[0], out_dir)
    clr_cfg = task_cfg.get("clr") or {}
    method = create_method(task_cfg["method"], anchor, clr_variant=clr_cfg.get("variant", "reduced_v1"),
                           clr_kernel_size=int(clr_cfg.get("kernel_size", 3)))
    trainer_cfg, optim, sched = _plain(cfg.trainer), _plain(cfg.optim), _plain(cfg.sched)

    def fit(method: ContinualMethod, task: SequenceTask, index: int) -> float:
        L.seed_everything(int(cfg.seed) + index, workers=True)
        return fit_task(
            method.model, task.datamodule, trainer_cfg, optim, sched, out_dir / "tasks" / f"{index}_{task.name}",
            frozen_modules=method.frozen_modules(), regularizer=float(task_cfg.get("regularizer") or 0.0),
            label_smoothing=float(task_cfg.get("label_smoothing") or 0.0),
        )

    task_dir = out_dir / "tasks" if task_cfg.get("save_task_files", True) else None
    runner = ContinualRunner(method, tasks, fit, _device(cfg.trainer.get("accelerator", "auto")), task_dir)
    for index in range(len(tasks)):
        runner.learn(index)
    result = runner.results()
    result.update(sequence=cfg.continual.get("name", "sequence"), anchor=anchor_info,
                  clr_variant=clr_cfg.get("variant", "reduced_v1"), regularizer=task_cfg.get("regularizer"),
                  model=cfg.model.name)
    return write_results(result, out_dir)
