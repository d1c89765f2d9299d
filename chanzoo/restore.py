"""Restore an image file or a folder of images: ``python -m chanzoo.restore model=rgt_s_x4 input=in.png output=out.png``.

Options (Hydra ``key=value``): ``model=<config>`` and ``model.pretrained_file=<weights>`` (or ``model.pretrained=true``),
``tile=<pixels>`` / ``tile_overlap=<pixels>`` for tiled inference of large images, ``device=auto|cpu|cuda``.
A model without weights (neither ``model.pretrained_file`` nor ``model.pretrained=true``) is refused unless
``allow_random_weights=true`` says that random weights are meant. The output folder must be writable before anything
runs.
A folder ``input`` writes one PNG per image into the folder ``output``; a progress bar counts images (and tiles).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from chanzoo.data.restoration import IMAGE_SUFFIXES, image_to_tensor, load_image, model_scale
from chanzoo.entry import check_writable_dir, hydra_entry
from chanzoo.ops.tiling import tiled_forward

_logger = logging.getLogger(__name__)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def plan_files(input_path: str, output_path: str) -> list[tuple[Path, Path]]:
    """(source, destination) pairs: one file to one file, or every image of a folder into a folder (as PNG)."""
    source, dest = Path(input_path).expanduser(), Path(output_path).expanduser()
    if source.is_file():
        if dest.is_dir():
            return [(source, dest / f"{source.stem}.png")]
        return [(source, dest)]
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"input={input_path!r} is a folder without images (looked for {list(IMAGE_SUFFIXES)})")
        if dest.exists() and not dest.is_dir():
            raise ValueError(f"input={input_path!r} is a folder, so output={output_path!r} must be a folder too")
        return [(f, dest / f"{f.stem}.png") for f in files]
    raise ValueError(f"input={input_path!r} is neither an image file nor a folder")


@torch.no_grad()
def restore_image(
    model: torch.nn.Module,
    image: np.ndarray,
    scale: int,
    tile: Optional[int] = None,
    tile_overlap: int = 32,
    device: torch.device = torch.device("cpu"),
    progress: Optional[Any] = None,
) -> np.ndarray:
    """Run ``model`` on an RGB uint8 HWC image and return the restored RGB uint8 image (``scale`` x larger)."""
    x = image_to_tensor(image)[None].to(device)
    if tile is not None:
        y = tiled_forward(model, x, tile, tile_overlap, scale, progress=progress)
    else:
        y = model(x)
    return y[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def restore(cfg: Any) -> list[Path]:
    """Restore ``cfg.input`` into ``cfg.output`` with the model of ``cfg.model``; returns the files written."""
    from chanzoo.run import build_model, load_weights_report

    has_weights = bool(cfg.model.get("pretrained_file")) or bool(cfg.model.get("pretrained"))
    if not has_weights and not cfg.get("allow_random_weights", False):
        raise ValueError(
            f"model={cfg.model.name!r} has no weights: give model.pretrained_file=<weights.pth> (or "
            "model.pretrained=true); set allow_random_weights=true if random weights are really meant"
        )
    pairs = plan_files(str(cfg.input), str(cfg.output))
    for folder in sorted({dest.parent for _, dest in pairs}):
        check_writable_dir(folder, "output")
    device = _device(str(cfg.device))
    model = build_model(cfg.model)
    load_weights_report(dict(cfg.model), model)
    model = model.eval().to(device)
    scale = model_scale(model)
    tile = cfg.get("tile")
    written = []
    bar = tqdm(pairs, desc="images", unit="img", disable=not cfg.get("progress", True))
    for source, dest in bar:
        image = load_image(source)
        tiles = None
        if tile is not None and cfg.get("progress", True):
            tiles = tqdm(desc=f"{source.name} tiles", unit="tile", leave=False)

        def tick(done: int, total: int, bar: Optional[tqdm] = tiles) -> None:
            if bar is not None:
                bar.total = total
                bar.update(1)

        out = restore_image(model, image, scale, tile, int(cfg.tile_overlap), device, tick)
        if tiles is not None:
            tiles.close()
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(out).save(dest)
        written.append(dest)
        _logger.info("%s (%dx%d) -> %s (%dx%d)", source, image.shape[1], image.shape[0], dest, out.shape[1], out.shape[0])
    return written


def _run(cfg: Any) -> None:
    restore(cfg)


main = hydra_entry("restore", _run)
main.__doc__ = "``python -m chanzoo.restore``."


if __name__ == "__main__":
    main()
