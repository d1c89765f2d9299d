"""Pictures of predictions beside the ground truth (torchvision's drawing utilities), for a run's folder."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid, save_image

SCORE_THRESHOLD = 0.3  # predicted boxes drawn


def _palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct colours per class (the VOC palette's bit pattern)."""
    colours = []
    for index in range(num_classes):
        r = g = b = 0
        for bit in range(8):
            r |= ((index >> 0) & 1) << (7 - bit)
            g |= ((index >> 1) & 1) << (7 - bit)
            b |= ((index >> 2) & 1) << (7 - bit)
            index >>= 3
        colours.append((r, g, b))
    return colours


def _grid(tiles: list[torch.Tensor], columns: int) -> torch.Tensor:
    """Tiles of any sizes (float, [0, 1]) padded with white to the largest, in rows of ``columns``."""
    height, width = max(t.shape[1] for t in tiles), max(t.shape[2] for t in tiles)
    padded = [torch.nn.functional.pad(t, (0, width - t.shape[2], 0, height - t.shape[1]), value=1.0) for t in tiles]
    return make_grid(padded, nrow=columns, padding=2, pad_value=1.0)


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def detection_figure(
    images: Sequence[torch.Tensor],
    predictions: Sequence[dict[str, torch.Tensor]],
    targets: Sequence[dict[str, torch.Tensor]],
    class_names: Sequence[str],
    path: Path,
) -> None:
    """Save rows of (ground truth, prediction) for each image: boxes with class names, masks where present."""
    palette = _palette(len(class_names) + 1)
    tiles = []
    for image, pred, target in zip(images, predictions, targets):
        keep = pred["scores"] >= SCORE_THRESHOLD
        for boxes, labels, masks in (
            (target["boxes"], target["labels"], target.get("masks")),
            (pred["boxes"][keep], pred["labels"][keep], pred["masks"][keep, 0] > 0.5 if "masks" in pred else None),
        ):
            tile = _to_uint8(image.cpu())
            colours = [palette[int(label)] for label in labels]
            if masks is not None and len(masks):
                tile = draw_segmentation_masks(tile, masks.bool().cpu(), alpha=0.4, colors=colours)
            names = [class_names[int(label) - 1] for label in labels]
            tile = draw_bounding_boxes(tile, boxes.cpu(), labels=names, colors=colours, width=1)
            tiles.append(tile.float() / 255)
    save_image(_grid(tiles, 2), path)


def segmentation_figure(
    images: torch.Tensor,
    predictions: torch.Tensor,
    masks: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    path: Path,
    ignore_index: int = 255,
) -> None:
    """Save rows of (image, ground truth, prediction) label maps over the image; ``images`` are normalised."""
    palette = torch.tensor(_palette(num_classes), dtype=torch.uint8)
    mean_t, std_t = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    tiles = []
    for image, pred, mask in zip(images.cpu(), predictions.cpu(), masks.cpu()):
        tile = _to_uint8(image * std_t + mean_t)
        tiles.append(tile.float() / 255)
        for labels in (mask, pred):
            coloured = palette[labels.clamp(max=num_classes - 1)].permute(2, 0, 1)
            coloured[:, labels == ignore_index] = 255
            tiles.append((tile.float() * 0.4 + coloured.float() * 0.6) / 255)
    save_image(_grid(tiles, 3), path)
