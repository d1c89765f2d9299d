"""The profiler's command line: ``python -m chanzoo.profile`` (also the ``chanzoo-profile`` console script).

``python -m chanzoo.profile model=davit_tiny`` or ``model.name=<any timm/chanzoo model>`` [``batch_size=8
img_size=224 device=cpu accel.compile=auto accel.channels_last=auto amp=none mode=infer|train|all compare=false``]
profiles one model; ``models=[a,b,...]`` (or ``-m model=a,b``) sweeps many and also writes a Markdown table and a
scatter plot. Every output goes into the run folder unless ``docs_file=<file.md>`` (``plot_file=<file.png>``)
asks for a page to be updated, e.g. ``docs_file=docs/benchmarks.md``.

The measuring and writing functions live in ``chanzoo.profiling``; the public ones are re-exported here.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from hydra.experimental.callback import Callback

from chanzoo.configs import CONFIG_DIR
from chanzoo.io import write_json_atomic
from chanzoo.profiling.measure import (
    AMP_DTYPES,
    MODES,
    ProfileRow,
    Timing,
    Variant,
    check_choice,
    compare_variants,
    count_flops,
    count_params,
    fastest,
    flop_report,
    fvcore_macs,
    machine_name,
    peak_memory_mb,
    profile_model,
    sdpa_backends,
    time_interleaved,
)
from chanzoo.profiling.report import (
    DOCS_BEGIN,
    DOCS_END,
    docs_table,
    format_rows,
    scatter_plot,
    write_docs,
    write_rows,
)

__all__ = [
    "AMP_DTYPES", "DOCS_BEGIN", "DOCS_END", "MODES", "ProfileRow", "SweepDocs", "Timing", "Variant",
    "compare_variants", "count_flops", "count_params", "docs_table", "fastest", "flop_report", "format_rows",
    "fvcore_macs", "machine_name", "main", "peak_memory_mb", "profile_model", "scatter_plot", "sdpa_backends",
    "time_interleaved", "write_docs", "write_rows",
]

_logger = logging.getLogger(__name__)
SWEEP_DOCS_NAME = "benchmarks.md"  # the sweep's Markdown table in the run folder when no docs_file is given


def check_model_names(names: Sequence[str]) -> None:
    """Raise one ``ValueError`` naming every unknown model in ``names`` (with close matches), before any work."""
    import timm

    import chanzoo  # noqa: F401  (registers chanzoo's models with timm)
    from chanzoo._names import unknown_name_error

    unknown = [name for name in names if not isinstance(name, str) or not timm.is_model(name)]
    if unknown:
        raise ValueError("; ".join(str(unknown_name_error("model", name, timm.list_models())) for name in unknown))


def _sweep_overrides(name: str, task_overrides: Sequence[str]) -> list[str]:
    """The overrides that compose ``name``'s config: the command's own, with ``model=<name>`` where a config file
    exists and ``model.name=<name>`` (on the command's model config) otherwise."""
    own = [o for o in task_overrides if not o.lstrip("+~").startswith(("models=", "model=", "model.name="))]
    has_file = (CONFIG_DIR / "model" / f"{name}.yaml").is_file()
    return [*own, f"model={name}" if has_file else f"model.name={name}"]


def _configs_to_profile(cfg: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(model config, accel config) of each model the command profiles: ``cfg.model``, or each of ``cfg.models``
    composed like a run of its own. Every name is checked before anything is built."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    def plain(node: Any) -> dict[str, Any]:
        return OmegaConf.to_container(node, resolve=True)

    names = list(cfg.models) if cfg.get("models") else None
    check_model_names(names if names is not None else [cfg.model.name])
    if names is None:
        return [(plain(cfg.model), plain(cfg.accel))]
    task_overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    composed = [compose(config_name="profile", overrides=_sweep_overrides(name, task_overrides)) for name in names]
    return [(plain(c.model), plain(c.accel)) for c in composed]


def _variants(cfg: Any, accel: dict[str, Any]) -> list[Variant]:
    if cfg.compare:
        return compare_variants(torch.device(cfg.device), cfg.amp)
    chosen = (accel.get("compile", "auto"), accel.get("channels_last", "auto"))
    return [Variant("default" if chosen == ("auto", "auto") else "chosen", *chosen, cfg.amp)]


def sweep_files(docs_file: Optional[str], plot_file: Optional[str], out_dir: Path) -> tuple[Path, Path]:
    """Where a sweep's Markdown table and plot go: ``docs_file``/``plot_file`` when given, else the run folder."""
    docs = Path(docs_file) if docs_file else out_dir / SWEEP_DOCS_NAME
    return docs, Path(plot_file) if plot_file else docs.with_suffix(".png")


# Dense tasks the profiler splits into backbone and head: the head's classes and input size the papers count at
# (COCO: 80 classes, 1333x800; ADE20K: 150 classes, 512x512) unless head_classes / input_size are given.
DENSE_TASKS = {
    "chanzoo.tasks.detection.DetectionTask": (80, (3, 800, 1333)),
    "chanzoo.tasks.segmentation.SegmentationTask": (150, (3, 512, 512)),
}


def profile_dense(cfg: Any) -> dict[str, Any]:
    """Params and FLOPs of ``cfg.model`` as the backbone of the dense model ``cfg.task`` builds, backbone and head
    (neck + detection heads or decoder) separately; printed and written to dense_profile.json in the run folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from chanzoo.dense.backbone import PyramidBackbone
    from chanzoo.dense.profile import dense_profile
    from chanzoo.run import build_model

    task_cfg = OmegaConf.to_container(cfg.task, resolve=False)
    default_classes, default_size = DENSE_TASKS[task_cfg["_target_"]]
    num_classes = int(cfg.get("head_classes") or default_classes)
    input_size = list(cfg.input_size) if cfg.get("input_size") else list(default_size)
    check_model_names([cfg.model.name])
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    task_kwargs = {k: v for k, v in task_cfg.items() if k not in ("monitor", "monitor_mode", "num_classes")}
    task = instantiate(task_kwargs, model=model, optim={}, sched={}, num_classes=num_classes, _convert_="all")
    result = {"model": cfg.model.name, "task": task_cfg["_target_"].rsplit(".", 1)[-1], "head_classes": num_classes,
              # the backbone as the dense model calls it: the adapter (timm's feature wrapper, channel modules)
              **dense_profile(task.model, next(m for m in task.model.modules() if isinstance(m, PyramidBackbone)),
                              input_size)}
    lines = [f"{result['model']} in {result['task']} ({num_classes} classes), input {input_size}, backbone input "
             f"{result['backbone_input']}", f"{'part':<10} {'params (M)':>11} {'GFLOPs':>9}"]
    for part in ("backbone", "head"):
        lines.append(f"{part:<10} {result[part + '_params'] / 1e6:11.2f} {result[part + '_flops'] / 1e9:9.1f}")
    lines.append(f"{'total':<10} {result['params'] / 1e6:11.2f} {result['flops'] / 1e9:9.1f}")
    out_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
    write_json_atomic(out_dir / "dense_profile.json", result, sort_keys=True)
    print("\n".join(lines))  # the report itself is the command's output
    return result


def profile_cfg(cfg: Any) -> list[ProfileRow]:
    """Profile ``cfg.model`` or each of ``cfg.models``; print the table and write CSV/JSON into the run folder
    (plus, for a sweep, the Markdown table and plot: into ``docs_file``/``plot_file`` or the run folder)."""
    from hydra.core.hydra_config import HydraConfig

    from chanzoo.run import build_model

    check_choice("amp", cfg.amp, tuple(AMP_DTYPES))
    check_choice("compare", cfg.compare, (True, False))
    check_choice("mode", cfg.mode, MODES)
    configs = _configs_to_profile(cfg)
    rows: list[ProfileRow] = []
    for model_cfg, accel in configs:
        _logger.info("profiling %s", model_cfg["name"])
        rows += profile_model(
            lambda model_cfg=model_cfg: build_model(model_cfg), model_cfg["name"], batch_size=cfg.batch_size,
            img_size=cfg.img_size, device=cfg.device, variants=_variants(cfg, accel),
            compile_mode=accel.get("compile_mode"), mode=cfg.mode, warmup=cfg.warmup, repeats=cfg.repeats,
            fvcore=cfg.fvcore,
        )
    out_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
    csv_path, json_path = write_rows(rows, out_dir)
    dev = torch.device(cfg.device)
    if dev.type == "cuda":
        _logger.info("cudnn.benchmark=%s, SDPA backends: %s", torch.backends.cudnn.benchmark, sdpa_backends(dev))
    print(format_rows(rows))  # the report itself is the command's output
    _logger.info("rows written to %s and %s", csv_path, json_path)
    if cfg.get("models"):
        write_docs(rows, *sweep_files(cfg.get("docs_file"), cfg.get("plot_file"), out_dir))
    return rows


class SweepDocs(Callback):
    """Hydra callback: after ``-m model=a,b,...`` writes the Markdown table and plot from every job's profile.json,
    into ``docs_file``/``plot_file`` when given, else into the sweep folder."""

    def __init__(self, docs_file: Optional[str] = None, plot_file: Optional[str] = None) -> None:
        self.docs_file = docs_file
        self.plot_file = plot_file

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        """Gather the jobs' rows into the table."""
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = [ProfileRow(**d) for p in sorted(sweep_dir.glob("*/profile.json"), key=lambda p: p.parent.name)
                for d in json.loads(p.read_text())]
        if rows:
            write_docs(rows, *sweep_files(self.docs_file, self.plot_file, sweep_dir))


def main() -> None:
    """``python -m chanzoo.profile`` / ``chanzoo-profile``."""
    import hydra

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="profile")
    def run(cfg: Any) -> None:
        if cfg.get("task") is not None and cfg.task.get("_target_") in DENSE_TASKS:
            profile_dense(cfg)
        else:
            profile_cfg(cfg)

    run()


if __name__ == "__main__":
    main()
