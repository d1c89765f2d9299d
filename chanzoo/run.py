"""What ``train.py`` and ``eval.py`` do, given their composed Hydra config."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_method, instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from torch import nn

from chanzoo.acceleration import prepare_from_config
from chanzoo.callbacks import AtomicCheckpointIO, EpochSeed, PlotCurves
from chanzoo.factory import create_model
from chanzoo.tasks.channel_subsets import run_channel_subsets

_logger = logging.getLogger(__name__)
MODEL_CFG_KEY = "chanzoo_model_cfg"


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def build_model(model_cfg: DictConfig | dict) -> nn.Module:
    """``chanzoo.create_model`` from a ``model`` config group."""
    cfg = _plain(model_cfg)
    return create_model(
        cfg["name"],
        pretrained=bool(cfg.get("pretrained", False)),
        pretrained_file=cfg.get("pretrained_file"),
        num_classes=cfg.get("num_classes"),
        in_chans=cfg.get("in_chans"),
        attn=cfg.get("attn"),
        attn_kwargs=cfg.get("attn_kwargs") or None,
        attn_position=cfg.get("attn_position", "auto"),
        **{k: cfg[k] for k in ("features_only", "out_indices") if cfg.get(k)},  # multi-scale feature maps
        **(cfg.get("kwargs") or {}),
    )


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


def resolve_resume(resume: Optional[str], runs_dir: Path) -> Optional[str]:
    """``None``, a checkpoint path, or 'last': the newest ``last.ckpt`` under ``runs_dir``."""
    if resume in (None, "", "none"):
        return None
    if resume == "last":
        candidates = sorted(runs_dir.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(f"resume=last but no */checkpoints/last.ckpt exists under {runs_dir}")
        return str(candidates[-1])
    if not Path(resume).is_file():
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint file (give a .ckpt path or 'last')")
    return str(resume)


def _trainer(cfg: DictConfig, out_dir: Path, callbacks: list[L.Callback], logger: Any = None) -> L.Trainer:
    """Lightning's Trainer from the ``trainer`` group; ``deterministic=true`` makes it turn on torch's
    deterministic algorithms."""
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=logger if logger is not None else False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(out_dir),
        deterministic=bool(cfg.get("deterministic")),
    )


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _metrics_dict(results: list[dict[str, Any]]) -> dict[str, float]:
    return {k: float(v) for result in results for k, v in result.items()}


class _StoreModelConfig(L.Callback):
    """Keeps the model config inside each checkpoint, so ``eval.py ckpt_path=...`` can rebuild the model."""

    def __init__(self, model_cfg: dict[str, Any]) -> None:
        self.model_cfg = model_cfg

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[MODEL_CFG_KEY] = self.model_cfg


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the task on the data, then test the best checkpoint; returns the final metrics (also in metrics.json)."""
    if cfg.task.get("runner"):  # a task that runs its own loop, e.g. task=continual (a sequence of tasks)
        return get_method(cfg.task.runner)(cfg)
    out_dir = _output_dir()
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data)
    model = build_model(cfg.model)
    model = prepare_from_config(model, _plain(cfg.model), cfg.trainer.get("accelerator", "auto"), inference=False)
    check_channels(model, datamodule, cfg.data.get("name", "data"))
    if hasattr(datamodule, "set_model"):
        datamodule.set_model(model)
    task = instantiate(cfg.task, model=model, optim=_plain(cfg.optim), sched=_plain(cfg.sched), _convert_="all")

    checkpoint = instantiate(cfg.callbacks.checkpoint, dirpath=str(out_dir / "checkpoints"))
    callbacks: list[L.Callback] = [checkpoint, PlotCurves(), _StoreModelConfig(_plain(cfg.model))]
    callbacks += [instantiate(c) for name, c in cfg.callbacks.items() if name != "checkpoint" and c is not None]
    if cfg.get("deterministic"):
        callbacks.append(EpochSeed(cfg.seed))
    logger = CSVLogger(save_dir=str(out_dir), name="", version="")
    trainer = _trainer(cfg, out_dir, callbacks, logger)
    ckpt_path = resolve_resume(cfg.get("resume"), out_dir.parent)

    start = time.perf_counter()
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if checkpoint.best_model_score is not None:
        metrics[f"best/{checkpoint.monitor}"] = float(checkpoint.best_model_score)
    if cfg.get("test_after_fit", True) and not trainer.fast_dev_run:
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
    model_cfg = _plain(cfg.get("model"))
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
    model = build_model(model_cfg)
    model = prepare_from_config(model, model_cfg, cfg.trainer.get("accelerator", "auto"), inference=True)
    check_channels(model, datamodule, cfg.data.get("name", "data"))
    if hasattr(datamodule, "set_model"):
        datamodule.set_model(model)
    task = instantiate(cfg.task, model=model, optim=_plain(cfg.optim), sched=_plain(cfg.sched), _convert_="all")
    if checkpoint is not None:
        task.load_state_dict(checkpoint["state_dict"])
    trainer = _trainer(cfg, out_dir, callbacks=[], logger=None)
    metrics = _metrics_dict(trainer.test(task, datamodule=datamodule))
    payload = {"metrics": metrics, "ckpt_path": ckpt_path, "model": model_cfg["name"], "data": cfg.data.get("name")}
    if cfg.get("eval_channel_subsets"):
        payload["channel_subsets"] = run_channel_subsets(
            task.model, datamodule, _plain(cfg.eval_channel_subsets), out_dir, trainer.strategy.root_device
        )
    _write_json(out_dir / "metrics.json", payload)
    _logger.info("metrics written to %s:\n%s", out_dir / "metrics.json", format_table(metrics))
    return metrics
