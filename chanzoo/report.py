"""Ablation report of a Hydra multirun: one row per run (channel module, params, FLOPs, throughput, best top-1).

``python -m chanzoo.report <multirun folder> [--out DIR] [--batch-size N] [--repeats N]`` reads every run's saved
config (``.hydra/config.yaml``) and its Lightning ``CSVLogger`` metrics (``metrics.csv``, column ``val/acc1``),
rebuilds each run's model from its config to measure parameters, FLOPs (``torch.utils.flop_counter``, 2 per
multiply-add, reported as MACs) and inference throughput (all models timed in turn, in one process, on a batch of
``--batch-size`` images at the run's own input size ``data.in_chans`` x ``data.img_size``), and writes ``report.md``,
``report.csv`` and ``report.png`` (a bar chart of best top-1 and of throughput per module). The throughput column's
header names that input size and batch, since img/s at Fashion-MNIST's 1x28x28 is not comparable to 224x224 figures.

A multirun of continual-learning runs (``task=continual``, each with a ``continual.json``) gets the methods'
comparison instead: average accuracy, backward transfer, forgetting, whether earlier tasks' predictions stayed
unchanged, parameters added per task and training time, and ``report.png`` holds each run's accuracy-matrix heatmap.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import OmegaConf

from chanzoo.continual import metrics as continual_metrics
from chanzoo.data.fashion_mnist import NATIVE_SIDE, smallest_input_side
from chanzoo.profile import count_flops, count_params, time_interleaved
from chanzoo.run import build_model

_logger = logging.getLogger(__name__)

CONFIG_FILE = Path(".hydra") / "config.yaml"  # Hydra's saved composed config of a run
METRICS_FILE = "metrics.csv"  # Lightning's CSVLogger file in each run folder (chanzoo.run.train)
METRIC = "val/acc1"  # the classification task's top-1 validation accuracy column
CONTINUAL_FILE = "continual.json"  # what a continual-learning run writes (chanzoo.continual.runner)
NO_MODULE = "none"


@dataclass
class ReportRow:
    """One run of the sweep."""

    run: str
    module: str
    params: int
    gmacs: float
    throughput: float  # images per second, measured at ``input_shape`` in batches of ``batch_size``
    input_shape: str  # "CxHxW" of the timed images
    batch_size: int
    best_top1: float  # in [0, 1]; NaN when the run logged no validation accuracy


def find_runs(folder: Path) -> list[Path]:
    """Run folders under ``folder`` (each holding ``.hydra/config.yaml``), in Hydra's job order."""
    if not folder.is_dir():
        raise ValueError(f"multirun folder {str(folder)!r} does not exist")
    runs = [p.parent.parent for p in folder.rglob(str(CONFIG_FILE))]
    if not runs:
        raise ValueError(f"multirun folder {str(folder)!r} holds no run (no */{CONFIG_FILE})")

    def job_order(run: Path) -> tuple[float, str]:
        return (int(run.name) if run.name.isdigit() else math.inf, run.relative_to(folder).as_posix())

    return sorted(runs, key=job_order)


def best_metric(csv_file: Path, column: str = METRIC) -> float:
    """Highest value of ``column`` in a CSVLogger ``metrics.csv``; NaN if the file or the column is missing."""
    if not csv_file.is_file():
        _logger.warning("%s is missing: no %s for this run", csv_file, column)
        return math.nan
    with csv_file.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if column not in (reader.fieldnames or []):
            _logger.warning("%s has no %r column (columns: %s)", csv_file, column, reader.fieldnames)
            return math.nan
        values = [float(row[column]) for row in reader if row.get(column) not in (None, "")]
    return max(values) if values else math.nan


def module_name(model_cfg: dict[str, Any]) -> str:
    """The run's channel module as written in its config ('none' for none)."""
    attn = model_cfg.get("attn")
    return NO_MODULE if attn in (None, "", "none", "identity") else str(attn)


def build_rows(folder: Path, batch_size: int = 32, repeats: int = 10, device: str = "cpu") -> list[ReportRow]:
    """Measure and collect one ``ReportRow`` per run of the multirun ``folder``."""
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size and repeats must be >= 1, got batch_size={batch_size}, repeats={repeats}")
    dev = torch.device(device)
    entries = []
    for run in find_runs(folder):
        cfg = OmegaConf.load(run / CONFIG_FILE)
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        model_cfg.update({"pretrained": False, "pretrained_file": None})  # the architecture alone sets the costs
        model = build_model(model_cfg).eval().to(dev)
        size = cfg.data.img_size
        if size == "auto":  # what the Fashion-MNIST datamodule resolves it to for this model (28 px or more)
            size = smallest_input_side(model, NATIVE_SIDE)
        size = int(size)
        x = torch.zeros(batch_size, int(cfg.data.in_chans), size, size, device=dev)
        flops, _ = count_flops(model, x[:1])
        entries.append((run, model_cfg, model, x, flops))
    with torch.no_grad():
        timings = time_interleaved(
            {str(run): (lambda m=model, x=x: m(x)) for run, _, model, x, _ in entries}, dev, repeats=repeats
        )
    return [
        ReportRow(
            run=run.relative_to(folder).as_posix(),
            module=module_name(model_cfg),
            params=count_params(model)[0],
            gmacs=flops / 2e9,
            throughput=batch_size / timings[str(run)].median,
            input_shape="x".join(str(d) for d in x.shape[1:]),
            batch_size=batch_size,
            best_top1=best_metric(run / METRICS_FILE),
        )
        for run, model_cfg, model, _, flops in entries
    ]


def throughput_label(rows: Sequence[ReportRow]) -> str:
    """What the throughput figures were measured at, e.g. ``img/s at 1x28x28, batch 32``; an input size shared by
    all rows goes into the label, otherwise each figure carries its own (see ``markdown_table``)."""
    shapes = {r.input_shape for r in rows}
    batches = sorted({r.batch_size for r in rows})
    where = f"{next(iter(shapes))}, " if len(shapes) == 1 else ""
    return f"img/s at {where}batch {', '.join(str(b) for b in batches)}"


def markdown_table(rows: Sequence[ReportRow]) -> str:
    """The report as a Markdown table; params and throughput also relative to the run without a module, if any.

    The throughput header states the input size and batch it was measured at; when the runs' input sizes differ,
    each figure is followed by its own size."""
    base = next((r for r in rows if r.module == NO_MODULE), None)
    mixed_sizes = len({r.input_shape for r in rows}) > 1
    lines = [
        f"| run | module | params | params vs none | GMACs | throughput ({throughput_label(rows)}) | vs none "
        "| best top-1 (%) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        extra = f"+{r.params - base.params:,}" if base else "-"
        speed = f"{r.throughput / base.throughput:.2f}x" if base else "-"
        top1 = "-" if math.isnan(r.best_top1) else f"{100 * r.best_top1:.2f}"
        throughput = f"{r.throughput:.1f}" + (f" ({r.input_shape})" if mixed_sizes else "")
        lines.append(
            f"| {r.run} | {r.module} | {r.params:,} | {extra} | {r.gmacs:.4f} | {throughput} | {speed} | {top1} |"
        )
    return "\n".join(lines) + "\n"


def bar_chart(rows: Sequence[ReportRow], path: Path) -> None:
    """Two bar panels per run: best top-1 and throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.module}\n({r.run})" for r in rows]
    fig, (ax_acc, ax_speed) = plt.subplots(1, 2, figsize=(max(6.0, 1.4 * len(rows)) * 2 / 1.5, 4))
    ax_acc.bar(labels, [0.0 if math.isnan(r.best_top1) else 100 * r.best_top1 for r in rows], color="tab:blue")
    ax_acc.set_ylabel("best val top-1 (%)")
    ax_speed.bar(labels, [r.throughput for r in rows], color="tab:orange")
    ax_speed.set_ylabel(f"inference throughput ({throughput_label(rows)})")
    for ax in (ax_acc, ax_speed):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: Sequence[ReportRow], out_dir: Path) -> tuple[Path, Path, Path]:
    """Write ``report.md``, ``report.csv`` and ``report.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, table, png = out_dir / "report.md", out_dir / "report.csv", out_dir / "report.png"
    md.write_text(markdown_table(rows))
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ReportRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    bar_chart(rows, png)
    return md, table, png


def continual_results(folder: Path) -> Optional[list[dict[str, Any]]]:
    """Each run's ``continual.json`` (run folder added as ``run``) if every run of ``folder`` is a continual run;
    ``None`` if none is; a ``ValueError`` for a mix."""
    runs = find_runs(folder)
    files = [run / CONTINUAL_FILE for run in runs]
    present = [f.is_file() for f in files]
    if not any(present):
        return None
    if not all(present):
        missing = [str(r.relative_to(folder)) for r, p in zip(runs, present) if not p]
        raise ValueError(f"multirun folder {str(folder)!r} mixes continual runs with others (no {CONTINUAL_FILE} in "
                         f"{missing}); report them apart")
    return [{**json.loads(f.read_text()), "run": r.relative_to(folder).as_posix()} for r, f in zip(runs, files)]


def write_continual_report(results: Sequence[dict[str, Any]], out_dir: Path) -> tuple[Path, Path, Path]:
    """``report.md`` (the methods' comparison and each run's accuracy matrix), ``report.csv`` and ``report.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, table, png = out_dir / "report.md", out_dir / "report.csv", out_dir / "report.png"
    rows = [{"run": r["run"], **continual_metrics.comparison_row(r)} for r in results]
    text = continual_metrics.comparison_table(rows)
    panels = []
    for r, row in zip(results, rows):
        names = [t["name"] for t in r["tasks"]]
        matrix = [[math.nan if v is None else v for v in line] for line in r["accuracy"]]
        text += f"\n{row['method']} (run {r['run']}): accuracy (%) after training task i (rows) on task j\n\n"
        text += continual_metrics.matrix_table(matrix, names)
        panels.append((matrix, names, f"{row['method']}: avg {row['avg_acc']:.2f}%"))
    md.write_text(text)
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    continual_metrics.save_heatmaps(panels, png)
    return md, table, png


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chanzoo.report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a Hydra multirun folder (runs/multirun/<time>)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the multirun folder)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size for the throughput measurement")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per model")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = continual_results(args.folder)
    if results is not None:
        paths = write_continual_report(results, args.out or args.folder)
        _logger.info("%swritten: %s", paths[0].read_text(), ", ".join(str(p) for p in paths))
        return
    rows = build_rows(args.folder, args.batch_size, args.repeats, args.device)
    paths = write_report(rows, args.out or args.folder)
    _logger.info("%s\nwritten: %s", markdown_table(rows), ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
