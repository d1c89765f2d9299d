"""Accuracy of a classifier on every subset of its input channels (Bao et al., ChannelViT, ICLR 2024, Sec. 4).

A model whose ``forward`` takes ``channel_ids`` (ChannelViT) gets only the subset's channels and their ids. Any
other model gets the full-width input with the missing channels set to zero and the rest scaled by C / k, the
plain-ViT convention of Hierarchical Channel Sampling (``chanzoo.data.channel_sampling.drop_channels``).

``eval.py ckpt_path=... eval_channel_subsets=all`` (every non-empty subset) or
``eval_channel_subsets='[[0],[0,2],[intensity,edges]]'`` (indices or channel names) writes ``channel_subsets.csv``
and ``channel_subsets.md`` (subset, accuracy) beside ``metrics.json``.
"""
from __future__ import annotations

import csv
import inspect
import itertools
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from chanzoo.data.channel_sampling import drop_channels
from chanzoo.io import atomic_open, write_text_atomic

__all__ = ["parse_subsets", "evaluate_channel_subsets", "format_subset_table", "write_subset_table", "run_channel_subsets"]

_logger = logging.getLogger(__name__)
SubsetSpec = Union[str, Sequence[Sequence[Union[int, str]]]]


def parse_subsets(spec: SubsetSpec, channel_names: Sequence[str]) -> list[tuple[int, ...]]:
    """'all' -> every non-empty subset of the channels (by size, then index); or a list of index/name lists."""
    num_channels = len(channel_names)
    if isinstance(spec, str):
        if spec != "all":
            raise ValueError(f"eval_channel_subsets must be null, 'all' or a list of channel lists, got {spec!r}")
        return [s for k in range(1, num_channels + 1) for s in itertools.combinations(range(num_channels), k)]
    if not isinstance(spec, Sequence) or not spec:
        raise ValueError(f"eval_channel_subsets must be null, 'all' or a non-empty list of channel lists, got {spec!r}")
    subsets = []
    for subset in spec:
        if isinstance(subset, (str, int)) or not isinstance(subset, Sequence) or not subset:
            raise ValueError(f"each channel subset must be a non-empty list of channels, got {subset!r}")
        indices = []
        for channel in subset:
            if isinstance(channel, str) and channel in channel_names:
                indices.append(list(channel_names).index(channel))
            elif isinstance(channel, int) and not isinstance(channel, bool) and 0 <= channel < num_channels:
                indices.append(channel)
            else:
                raise ValueError(
                    f"channel {channel!r} in subset {list(subset)} is neither an index in 0..{num_channels - 1} "
                    f"nor one of the channel names {list(channel_names)}"
                )
        if len(set(indices)) != len(indices):
            raise ValueError(f"channel subset {list(subset)} names a channel twice")
        subsets.append(tuple(indices))
    return subsets


def _takes_channel_ids(model: nn.Module) -> bool:
    return "channel_ids" in inspect.signature(model.forward).parameters


@torch.no_grad()
def evaluate_channel_subsets(
    model: nn.Module,
    loader: DataLoader,
    subsets: Sequence[tuple[int, ...]],
    channel_names: Sequence[str],
    device: Optional[Union[str, torch.device]] = None,
) -> list[dict[str, Any]]:
    """Top-1 accuracy of ``model`` (in eval mode) on ``loader`` for each channel subset; one row per subset."""
    num_classes = getattr(model, "num_classes", 0)
    if not num_classes:
        raise ValueError("channel-subset evaluation needs a classifier (model.num_classes > 0)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval().to(device)
    with_ids = _takes_channel_ids(model)
    metrics = [MulticlassAccuracy(num_classes, average="micro").to(device) for _ in subsets]
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        for subset, metric in zip(subsets, metrics):
            index = torch.tensor(subset, device=device)
            if with_ids:
                logits = model(images[:, index], channel_ids=index)
            else:
                logits = model(drop_channels(images, index))
            metric.update(logits, targets)
    model.train(was_training)
    rows = []
    for subset, metric in zip(subsets, metrics):
        rows.append(
            {
                "subset": "+".join(channel_names[i] for i in subset),
                "channels": list(subset),
                "k": len(subset),
                "acc1": float(metric.compute()),
            }
        )
    return rows


def format_subset_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: subset, number of channels, top-1 accuracy (%)."""
    lines = ["| subset | k | top-1 (%) |", "|---|---|---|"]
    lines += [f"| {r['subset']} | {r['k']} | {100 * r['acc1']:.2f} |" for r in rows]
    return "\n".join(lines)


def write_subset_table(rows: Sequence[dict[str, Any]], out_dir: Union[str, Path]) -> tuple[Path, Path]:
    """Write ``channel_subsets.csv`` and ``channel_subsets.md`` into ``out_dir`` (each written whole, then renamed)."""
    out_dir = Path(out_dir)
    csv_path, md_path = out_dir / "channel_subsets.csv", out_dir / "channel_subsets.md"
    with atomic_open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("subset", "channels", "k", "acc1"))
        for r in rows:
            writer.writerow((r["subset"], " ".join(map(str, r["channels"])), r["k"], f"{r['acc1']:.6f}"))
    write_text_atomic(md_path, format_subset_table(rows) + "\n")
    return csv_path, md_path


def run_channel_subsets(
    model: nn.Module, datamodule: Any, spec: SubsetSpec, out_dir: Union[str, Path], device: Optional[torch.device] = None
) -> list[dict[str, Any]]:
    """``eval_channel_subsets``: evaluate ``spec`` on the datamodule's test loader and write the table."""
    in_chans = getattr(datamodule, "in_chans", None) or getattr(model, "in_chans")
    names = list(getattr(datamodule, "channel_names", None) or [f"c{i}" for i in range(in_chans)])
    subsets = parse_subsets(spec, names)
    rows = evaluate_channel_subsets(model, datamodule.test_dataloader(), subsets, names, device)
    csv_path, _ = write_subset_table(rows, out_dir)
    _logger.info("accuracy per channel subset (also in %s):\n%s", csv_path, format_subset_table(rows))
    return rows
