"""What ``train.py`` and ``eval.py`` do, given their composed Hydra config."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_method, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch import nn

from chanzoo import hub
from chanzoo.acceleration import prepare_from_config, resolve_precision
from chanzoo.callbacks import (
    AtomicCheckpointIO,
    CompileTimer,
    EpochSeed,
    PlotCurves,
    RequireTrainingBatches,
    clean_stale_temp_files,
)
from chanzoo.configs import INIT_ONLY_KEYS  # importing chanzoo.configs registers the resolvers run configs use
from chanzoo.io import write_json_atomic
from chanzoo.progress import display_callbacks, drop_lightning_tips, instantiate_loggers
from chanzoo.tasks.channel_subsets import run_channel_subsets

_logger = logging.getLogger(__name__)
MODEL_CFG_KEY = "chanzoo_model_cfg"
TASK_CFG_KEY = "chanzoo_task_cfg"
PRECISION_KEY = "chanzoo_precision"  # the Lightning precision the checkpoint was trained in (eval.py's 'auto')


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


# Keys that model configs of earlier versions held and that now live in the ``accel`` group.
_MOVED_TO_ACCEL = ("compile", "compile_mode", "channels_last")


def build_model(model_cfg: DictConfig | dict) -> nn.Module:
    """The model of a ``model`` config (configs/model/_base.yaml): ``hydra.utils.instantiate`` of its ``_target_``
    with ``name`` as the model name, ``kwargs`` spread as keyword arguments and every other key as an argument.

    Configs stored by older checkpoints (no ``_target_``; ``compile``/``channels_last`` keys, now the ``accel``
    group's) are accepted: the target defaults to ``chanzoo.create_model`` and the moved keys are ignored.
    """
    cfg = dict(_plain(model_cfg))
    moved = {key: cfg.pop(key) for key in _MOVED_TO_ACCEL if key in cfg}
    if moved:
        _logger.info("model config keys %s are ignored: acceleration is set by the accel group (accel.*)", moved)
    cfg.setdefault("_target_", "chanzoo.create_model")
    name = cfg.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"model.name must be a timm or chanzoo model name, got {name!r}")
    model_kwargs = cfg.pop("kwargs", None) or {}
    return instantiate(cfg, name, _convert_="all", **model_kwargs)


def check_channels(model: nn.Module, datamodule: L.LightningDataModule, data_name: str) -> None:
    """The model's input channels must equal the data's (a mismatch otherwise fails deep inside the first conv)."""
    model_chans = getattr(model, "in_chans", None)
    if model_chans is None:  # the built first conv, not the pretrained cfg's input_size (weights' default, not ours)
        first_conv = getattr(model, "pretrained_cfg", {}).get("first_conv")
        model_chans = getattr(model.get_submodule(first_conv), "in_channels", None) if isinstance(first_conv, str) else None
    data_chans = getattr(datamodule, "in_chans", None)
    if model_chans is not None and data_chans is not None and int(model_chans) != int(data_chans):
        raise ValueError(
            f"model in_chans={model_chans} but data {data_name!r} has {data_chans} channel(s); "
            f"set model.in_chans={data_chans} (the default ${{data.in_chans}} does this)"
        )


def build_datamodule(data_cfg: DictConfig) -> L.LightningDataModule:
    """Instantiate the ``data`` config group (its ``name`` key only labels the run)."""
    kwargs = {k: v for k, v in _plain(data_cfg).items() if k != "name"}
    return instantiate(kwargs)


def _output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()


def resolve_resume(resume: Optional[str], runs_dir: Path, run_tag: str = "") -> Optional[str]:
    """``None``, a checkpoint path, or 'last': the newest ``last.ckpt`` under ``runs_dir`` of a run folder whose
    name ends in ``run_tag`` (the hash of the model config, so that 'last' never picks another model's run)."""
    if resume in (None, "", "none"):
        return None
    if resume == "last":
        found = sorted(runs_dir.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        candidates = [p for p in found if p.parent.parent.name.endswith(run_tag)]
        if not candidates:
            others = f"; runs of other model configs there: {[p.parent.parent.name for p in found]}" if found else ""
            raise FileNotFoundError(
                f"resume=last but no */checkpoints/last.ckpt of this model config (run folders ending in "
                f"{run_tag!r}) exists under {runs_dir}{others}. Give resume=<path/to/last.ckpt> to resume one of them"
            )
        return str(candidates[-1])
    if not Path(resume).is_file():
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint file (give a .ckpt path or 'last')")
    return str(resume)


def _architecture(model_cfg: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    return None if model_cfg is None else {k: v for k, v in model_cfg.items() if k not in INIT_ONLY_KEYS}


def check_checkpoint_fits(ckpt_path: str, task: L.LightningModule, model_cfg: dict[str, Any], argument: str) -> None:
    """Raise ``ValueError`` when the weights in ``ckpt_path`` do not fit ``task``, naming the model config stored in
    the checkpoint beside ``model_cfg`` (the one being built) and the first keys that differ."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001  (torch raises many types for an unreadable file)
        raise ValueError(f"{argument}={ckpt_path!r} is not a readable checkpoint: {err}") from None
    stored_state = checkpoint.get("state_dict")
    if not isinstance(stored_state, dict):
        raise ValueError(f"{argument}={ckpt_path!r} holds no 'state_dict' (not a Lightning checkpoint of chanzoo)")
    expected = {k: tuple(v.shape) for k, v in task.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in stored_state.items() if isinstance(v, torch.Tensor)}
    missing = sorted(expected.keys() - stored.keys())
    unexpected = sorted(stored.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & stored.keys() if expected[k] != stored[k])
    stored_cfg = checkpoint.get(MODEL_CFG_KEY)
    if missing or unexpected or reshaped:
        details = "; ".join(
            f"{len(keys)} {what} (e.g. {keys[0]!r})"
            for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape changes", reshaped))
            if keys
        )
        raise ValueError(
            f"{argument}={ckpt_path!r} was trained with model config {_architecture(stored_cfg)}, but this run builds "
            f"{_architecture(model_cfg)}: its weights do not fit ({details}). Resume with the same model config, or "
            "start a new run"
        )
    if stored_cfg is not None and _architecture(stored_cfg) != _architecture(model_cfg):
        _logger.warning("%s was trained with model config %s; this run uses %s (the weights fit)",
                        ckpt_path, _architecture(stored_cfg), _architecture(model_cfg))


def resolve_num_classes(model_cfg: dict[str, Any], datamodule: L.LightningDataModule, data_name: str) -> dict[str, Any]:
    """``model_cfg`` with ``num_classes`` taken from the datamodule when unset; a classifier width set by hand
    that differs from the data's class count is a ``ValueError`` naming both."""
    data_classes = getattr(datamodule, "num_classes", None)
    given = model_cfg.get("num_classes")
    if given is None:
        if data_classes:
            _logger.info("model.num_classes=%d from data %r", data_classes, data_name)
            return {**model_cfg, "num_classes": int(data_classes)}
        return model_cfg
    if given and data_classes and int(given) != int(data_classes):
        raise ValueError(
            f"model.num_classes={given} but data {data_name!r} has {data_classes} classes; leave model.num_classes "
            f"unset (null) to follow the data, or set it to {data_classes}"
        )
    return model_cfg


def build_task(task_cfg: DictConfig, model: nn.Module, cfg: DictConfig) -> L.LightningModule:
    """Instantiate the ``task`` group; its ``monitor``/``monitor_mode`` keys configure the checkpoint callback."""
    kwargs = {k: v for k, v in task_cfg.items() if k not in ("monitor", "monitor_mode")}
    return instantiate(kwargs, model=model, optim=_plain(cfg.optim), sched=_plain(cfg.sched), _convert_="all")


def check_monitor(task: L.LightningModule, monitor: Optional[str]) -> None:
    """A checkpoint monitor that the task never logs is a ``ValueError`` before training (not a crash after the
    first epoch)."""
    logged = getattr(task, "monitorable_metrics", None)
    if monitor is None or logged is None:
        return
    if monitor not in logged():
        raise ValueError(
            f"callbacks.checkpoint.monitor={monitor!r} is not logged by {type(task).__name__}; it logs "
            f"{logged()} (set task.monitor, or callbacks.checkpoint.monitor, to one of them)"
        )


def load_weights_report(model_cfg: dict[str, Any], model: nn.Module) -> None:
    """Count and log what ``model.pretrained_file`` loaded; none of the backbone is a ``ValueError``."""
    if model_cfg.get("pretrained_file"):
        hub.report_loaded(model, model_cfg["pretrained_file"])


def _trainer(cfg: DictConfig, out_dir: Path, callbacks: list[L.Callback], logger: Any = None,
             task: Optional[L.LightningModule] = None, trained_precision: Optional[str] = None) -> L.Trainer:
    """Lightning's Trainer from the ``trainer`` group; ``deterministic=true`` makes it turn on torch's
    deterministic algorithms; ``precision=auto`` is ``trained_precision`` (a checkpoint's, for evaluation) or else
    resolved for the device and ``task``. Progress and model summary come from ``chanzoo.progress.display_callbacks``."""
    drop_lightning_tips()
    return instantiate(
        cfg.trainer,
        precision=resolve_precision(cfg.trainer.get("precision", "32-true"), cfg.trainer.get("accelerator", "auto"),
                                    task, trained_precision),
        callbacks=callbacks + display_callbacks(cfg.trainer, callbacks, cfg.get("progress_interval", 30)),
        enable_model_summary=False,  # display_callbacks adds the one-line summary if the trainer config asks
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        logger=logger if logger else False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(out_dir),
        deterministic=bool(cfg.get("deterministic")),
    )


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    write_json_atomic(path, payload, sort_keys=True)


def _metrics_dict(results: list[dict[str, Any]]) -> dict[str, float]:
    return {k: float(v) for result in results for k, v in result.items()}


class _StoreModelConfig(L.Callback):
    """Keeps the model and task configs inside each checkpoint, so ``eval.py ckpt_path=...`` can rebuild the model
    and score it with its own task (a restoration checkpoint needs no ``task=restoration``) in the precision it was
    trained in."""

    def __init__(self, model_cfg: dict[str, Any], task_cfg: dict[str, Any]) -> None:
        self.model_cfg = model_cfg
        self.task_cfg = task_cfg

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[MODEL_CFG_KEY] = self.model_cfg
        checkpoint[TASK_CFG_KEY] = self.task_cfg
        checkpoint[PRECISION_KEY] = str(trainer.precision)


def _task_chosen_on_command_line() -> bool:
    """Whether the user picked the ``task`` group (``task=...``) for this run."""
    if not HydraConfig.initialized():
        return False
    return any(o.lstrip("+~").split("=", 1)[0] == "task" for o in HydraConfig.get().overrides.task)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the task on the data, then test the best checkpoint; returns the final metrics (also in metrics.json)."""
    if cfg.task.get("runner"):  # a task that runs its own loop, e.g. task=continual (a sequence of tasks)
        return get_method(cfg.task.runner)(cfg)
    out_dir = _output_dir()
    for folder in (out_dir, out_dir / "checkpoints"):
        clean_stale_temp_files(folder)
    ckpt_path = resolve_resume(cfg.get("resume"), out_dir.parent, str(cfg.get("run_tag") or ""))
    if ckpt_path is not None:
        clean_stale_temp_files(Path(ckpt_path).parent)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data)
    model_cfg = resolve_num_classes(_plain(cfg.model), datamodule, cfg.data.get("name", "data"))
    model = build_model(model_cfg)
    load_weights_report(model_cfg, model)
    model = prepare_from_config(model, _plain(cfg.accel), cfg.trainer.get("accelerator", "auto"), inference=False)
    check_channels(model, datamodule, cfg.data.get("name", "data"))
    if hasattr(datamodule, "set_model"):
        datamodule.set_model(model)
    task = build_task(cfg.task, model, cfg)

    checkpoint = instantiate(cfg.callbacks.checkpoint, dirpath=str(out_dir / "checkpoints"))
    check_monitor(task, checkpoint.monitor)
    if ckpt_path is not None:
        check_checkpoint_fits(ckpt_path, task, model_cfg, "resume")
    callbacks: list[L.Callback] = [
        checkpoint, PlotCurves(), _StoreModelConfig(model_cfg, _plain(cfg.task)), RequireTrainingBatches(), CompileTimer(),
    ]
    callbacks += [instantiate(c) for name, c in cfg.callbacks.items() if name != "checkpoint" and c is not None]
    if cfg.get("deterministic"):
        callbacks.append(EpochSeed(cfg.seed))
    trainer = _trainer(cfg, out_dir, callbacks, instantiate_loggers(cfg.get("logger"), out_dir), task)

    start = time.perf_counter()
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if checkpoint.best_model_score is not None:
        metrics[f"best/{checkpoint.monitor}"] = float(checkpoint.best_model_score)
    if cfg.get("test_after_fit", True):  # fast_dev_run: one batch through the test stage as well
        best = checkpoint.best_model_path or None
        metrics.update(_metrics_dict(trainer.test(task, datamodule=datamodule, ckpt_path=best, weights_only=False)))
    metrics["fit_seconds"] = fit_seconds
    if trainer.is_global_zero:
        _write_json(out_dir / "metrics.json", metrics)
        _logger.info("final metrics (also in %s):\n%s", out_dir / "metrics.json", format_table(metrics))
    return metrics


def format_table(metrics: dict[str, float]) -> str:
    """A two-column text table of ``metrics``."""
    width = max((len(k) for k in metrics), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in sorted(metrics.items())]
    return "\n".join(lines)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint (``ckpt_path``) or a model's pretrained weights on ``data``; writes metrics.json."""
    out_dir = _output_dir()
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = cfg.get("ckpt_path")
    model_cfg = _plain(cfg.model) if cfg.get("model") and not OmegaConf.is_missing(cfg.model, "name") else None
    checkpoint = None
    if ckpt_path:
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if model_cfg is None:
            if MODEL_CFG_KEY not in checkpoint:
                raise ValueError(f"{ckpt_path} does not record its model config: pass model=<name> too")
            model_cfg = checkpoint[MODEL_CFG_KEY]
            model_cfg.update({"pretrained": False, "pretrained_file": None})
    if model_cfg is None:
        raise ValueError("eval.py needs ckpt_path=<file.ckpt> or model=<name> (e.g. model.pretrained=true)")
    datamodule = build_datamodule(cfg.data)
    model_cfg = resolve_num_classes(model_cfg, datamodule, cfg.data.get("name", "data"))
    model = build_model(model_cfg)
    load_weights_report(model_cfg, model)
    model = prepare_from_config(model, _plain(cfg.accel), cfg.trainer.get("accelerator", "auto"), inference=True)
    check_channels(model, datamodule, cfg.data.get("name", "data"))
    if hasattr(datamodule, "set_model"):
        datamodule.set_model(model)
    task_cfg = cfg.task
    if checkpoint is not None and TASK_CFG_KEY in checkpoint and not _task_chosen_on_command_line():
        task_cfg = OmegaConf.create(checkpoint[TASK_CFG_KEY])  # the task the checkpoint was trained with
    task = build_task(task_cfg, model, cfg)
    if checkpoint is not None:
        check_checkpoint_fits(ckpt_path, task, model_cfg, "ckpt_path")
        task.load_state_dict(checkpoint["state_dict"])
    trained_precision = checkpoint.get(PRECISION_KEY) if checkpoint is not None else None
    trainer = _trainer(cfg, out_dir, callbacks=[CompileTimer()], logger=None, task=task,
                       trained_precision=trained_precision)
    metrics = _metrics_dict(trainer.test(task, datamodule=datamodule))
    payload = {"metrics": metrics, "ckpt_path": ckpt_path, "model": model_cfg["name"], "data": cfg.data.get("name")}
    if cfg.get("eval_channel_subsets"):
        payload["channel_subsets"] = run_channel_subsets(
            task.model, datamodule, _plain(cfg.eval_channel_subsets), out_dir, trainer.strategy.root_device
        )
    _write_json(out_dir / "metrics.json", payload)
    _logger.info("metrics written to %s:\n%s", out_dir / "metrics.json", format_table(metrics))
    return metrics
