"""What continual-learning papers report, from the accuracy matrix ``R[i][j]`` (accuracy on task j after training
task i; NaN for tasks not trained yet): average accuracy after the last task, backward transfer (Lopez-Paz &
Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017) and forgetting (Chaudhry et al.,
"Riemannian Walk for Incremental Learning", ECCV 2018); plus the table and heatmap of R."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

Matrix = Sequence[Sequence[float]]


def _square(matrix: Matrix) -> np.ndarray:
    r = np.asarray(matrix, dtype=float)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square and non-empty, got shape {r.shape}")
    return r


def average_accuracy(matrix: Matrix) -> float:
    """Mean accuracy over all tasks after the last one was trained: mean_j R[T-1][j]."""
    return float(np.mean(_square(matrix)[-1]))


def backward_transfer(matrix: Matrix) -> float:
    """BWT = mean over j < T-1 of R[T-1][j] - R[j][j]: negative when learning later tasks hurt earlier ones."""
    r = _square(matrix)
    if len(r) < 2:
        return 0.0
    return float(np.mean([r[-1, j] - r[j, j] for j in range(len(r) - 1)]))


def forgetting(matrix: Matrix) -> float:
    """Mean over j < T-1 of the drop from task j's best accuracy (max over i < T-1 of R[i][j]) to its final one."""
    r = _square(matrix)
    if len(r) < 2:
        return 0.0
    return float(np.mean([np.nanmax(r[j:-1, j]) - r[-1, j] for j in range(len(r) - 1)]))


def matrix_table(matrix: Matrix, names: Sequence[str]) -> str:
    """R as a Markdown table in percent (rows: after training task i; columns: tested on task j)."""
    r = _square(matrix)
    lines = ["| after \\ on | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for i, row in enumerate(r):
        cells = ["" if math.isnan(v) else f"{100 * v:.2f}" for v in row]
        lines.append(f"| {names[i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw_heatmap(ax: Any, matrix: Matrix, names: Sequence[str], title: str) -> None:
    """R in percent on a matplotlib ``ax``, one annotated cell per (trained, tested) pair."""
    r = 100 * _square(matrix)
    low = min(50.0, float(np.nanmin(r))) if np.isfinite(r).any() else 0.0  # one scale for all panels: 50..100 %
    ax.imshow(np.ma.masked_invalid(r), vmin=low, vmax=100, cmap="viridis")
    for (i, j), value in np.ndenumerate(r):
        if not math.isnan(value):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7, color="white" if value < 80 else "k")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("tested on task")
    ax.set_ylabel("after training task")
    ax.set_title(title, fontsize=9)


def save_heatmaps(
    panels: Sequence[tuple[Matrix, Sequence[str], str]], path: Path, columns: Optional[int] = None
) -> Path:
    """A PNG with one heatmap per (matrix, task names, title) panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = columns or min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.4 * rows), squeeze=False)
    for ax, (matrix, names, title) in zip(axes.flat, panels):
        draw_heatmap(ax, matrix, names, title)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


COMPARISON_COLUMNS = (
    ("method", "method"), ("avg_acc", "avg acc (%)"), ("bwt", "BWT (pts)"), ("forgetting", "forgetting (pts)"),
    ("exact_zero_forgetting", "predictions unchanged"), ("params_per_task", "params added / task"),
    ("params_per_task_pct", "% of backbone"), ("train_seconds", "train time (s)"),
)


def comparison_row(result: dict[str, Any]) -> dict[str, Any]:
    """One row of the method comparison from a run's ``continual.json``."""
    added = [a + h for a, h in zip(result["params_added"], result["head_params"])]
    method = result["method"] + (f" ({result.get('clr_variant', 'reduced_v1')})" if result["method"] == "clr" else "")
    return {
        "method": method,
        "avg_acc": 100 * result["avg_acc"],
        "bwt": 100 * result["bwt"],
        "forgetting": 100 * result["forgetting"],
        "exact_zero_forgetting": result["exact_zero_forgetting"],
        "params_per_task": float(np.mean(added)),
        "params_per_task_pct": 100 * float(np.mean(added)) / result["backbone_params"],
        "train_seconds": float(np.sum(result["train_seconds"])),
    }


def comparison_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of ``comparison_row`` as a Markdown table."""
    lines = ["| " + " | ".join(title for _, title in COMPARISON_COLUMNS) + " |",
             "|---|" + "---:|" * (len(COMPARISON_COLUMNS) - 1)]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['avg_acc']:.2f} | {row['bwt']:+.2f} | {row['forgetting']:.2f} | "
            f"{'yes' if row['exact_zero_forgetting'] else 'no'} | {row['params_per_task']:,.0f} | "
            f"{row['params_per_task_pct']:.3f} | {row['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"
