"""Export a model for deployment: ``python -m chanzoo.export model=resnet18 format=onnx|pt2|safetensors``.

Options (Hydra ``key=value``): ``model=<config>`` (or ``model.name=<any timm/chanzoo name>``) and/or
``ckpt_path=<train.py .ckpt>`` (the model config stored in the checkpoint is used when ``model`` is not given),
``model.pretrained_file=<weights>`` or ``model.pretrained=true``, ``output=<file or folder>``,
``img_size=<pixels>``, ``image=<photo to verify on>``, ``tolerance=<max relative error>``.

* ``onnx``: ``torch.export`` then the dynamo-based ``torch.onnx`` exporter (the TorchScript exporter is deprecated);
  the file is run in onnxruntime and compared with the eager model (max abs error logged; a relative error above
  ``tolerance`` fails the command). Scaled-dot-product attention is decomposed into matmul/softmax first: the ONNX
  translation of the fused op takes 4-D query/key/value only (window attention uses 5-D).
* ``pt2``: a ``torch.export`` program (``torch.export.save``), loaded back and compared with the eager model.
* ``safetensors``: ``model.safetensors`` + timm's ``config.json`` in a folder, written by timm's ``save_for_hf``;
  ``timm.create_model('local-dir:<folder>')`` or ``timm.create_model(name, pretrained=True,
  pretrained_cfg_overlay=dict(file='<folder>/model.safetensors'))`` load it back (checked after writing).

The batch dimension is dynamic in ``onnx`` and ``pt2`` (``dynamic_batch=true``); the image size is fixed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from chanzoo.configs import CONFIG_DIR

_logger = logging.getLogger(__name__)

FORMATS = ("onnx", "pt2", "safetensors")
EXAMPLE_BATCH = 2  # exported with batch 2: torch.export specializes a dimension of size 1
CHANZOO_KEYS = ("attn", "attn_kwargs", "attn_position")  # config.json entry for what chanzoo.create_model adds
_SDPA_OPS = (
    torch.ops.aten.scaled_dot_product_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
)
_PORTABLE_NAMESPACES = ("aten", "prims")


def load_model(model_cfg: Optional[dict[str, Any]], ckpt_path: Optional[str] = None) -> tuple[nn.Module, dict]:
    """The eval-mode model of ``model_cfg`` (a ``model`` config group) and/or a ``train.py`` checkpoint.

    A checkpoint supplies its stored model config when ``model_cfg`` is None, and its weights (the task's
    ``model.*`` entries) either way. Returns the model and the model config it was built from.
    """
    from chanzoo.run import MODEL_CFG_KEY, build_model

    state = None
    if ckpt_path:
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if model_cfg is None:
            if MODEL_CFG_KEY not in checkpoint:
                raise ValueError(f"ckpt_path={ckpt_path!r} does not record its model config: pass model=<name> too")
            model_cfg = dict(checkpoint[MODEL_CFG_KEY])
        model_cfg = {**model_cfg, "pretrained": False, "pretrained_file": None}
        prefix = "model."
        state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if model_cfg is None:
        raise ValueError("export needs model=<config or model name> or ckpt_path=<train.py checkpoint>")
    model = build_model(model_cfg)
    if state is not None:
        model.load_state_dict(state)
    return model.eval(), model_cfg


def input_size(model: nn.Module, img_size: Optional[int] = None) -> tuple[int, int, int]:
    """(C, H, W) the model is exported for: its pretrained cfg's ``input_size``, ``img_size`` replacing H and W."""
    channels, height, width = model.pretrained_cfg["input_size"]
    channels = getattr(model, "in_chans", None) or channels
    if img_size is not None:
        height = width = int(img_size)
    return int(channels), int(height), int(width)


def example_input(model: nn.Module, size: tuple[int, int, int], image: Optional[str] = None,
                  batch: int = EXAMPLE_BATCH) -> torch.Tensor:
    """A normalized input batch: ``image`` (resized, as the model's preprocessing expects) or a seeded uniform
    [0, 1] image, normalized with the model's mean/std."""
    channels, height, width = size
    if image is not None:
        from PIL import Image

        with Image.open(image) as photo:
            photo = photo.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BICUBIC)
            pixels = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255.0)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)
        if pixels.shape[0] != channels:
            raise ValueError(f"image={image!r} gives {pixels.shape[0]} channels, the model takes {channels}")
        pixels = pixels[None].expand(batch, -1, -1, -1)
    else:
        pixels = torch.rand(batch, channels, height, width, generator=torch.Generator().manual_seed(0))
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg.get("mean", (0.0,))).view(-1, 1, 1)
    std = torch.tensor(cfg.get("std", (1.0,))).view(-1, 1, 1)
    if len(mean) != channels:  # e.g. a 3-channel cfg on a 1-channel model: the average, as timm's data config does
        mean, std = mean.mean().view(1, 1, 1), std.mean().view(1, 1, 1)
    return ((pixels - mean) / std).contiguous()


def _root_cause(err: BaseException) -> str:
    """The innermost exception of a chain, as ``Type: first line``."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def export_program(model: nn.Module, x: torch.Tensor, name: str, fmt: str,
                   dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` on ``x``; a failure becomes a ValueError naming the model and the reason."""
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    try:
        return torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes)
    except Exception as err:
        hint = " (try dynamic_batch=false)" if dynamic_batch and "batch" in str(err) else ""
        raise ValueError(f"model {name!r} cannot be exported to {fmt}: torch.export failed with "
                         f"{_root_cause(err)}{hint}") from err


def custom_ops(program: torch.export.ExportedProgram) -> list[str]:
    """Names of the ops of ``program`` outside ATen/prims (custom C++ kernels such as ``chanzoo::...``)."""
    found = {str(node.target.name()) for node in program.graph.nodes
             if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
             and node.target.namespace not in _PORTABLE_NAMESPACES}
    return sorted(found)


def _errors(reference: torch.Tensor, output: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max |reference|)."""
    reference = reference.detach().float().numpy()
    error = float(np.abs(np.asarray(output, dtype=np.float32) - reference).max())
    return error, error / max(float(np.abs(reference).max()), 1e-12)


def _name_batch_axis(path: Path) -> None:
    """Call the dynamic first axis of the ONNX inputs and outputs ``batch`` (the exporter names it after its symbol)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_param = "batch"
    onnx.save(proto, str(path))


def export_onnx(model: nn.Module, x: torch.Tensor, path: Path, name: str, dynamic_batch: bool = True,
                opset: Optional[int] = None) -> tuple[float, float]:
    """Write ``model`` as ONNX at ``path``; returns onnxruntime's (max abs, relative) error against eager on ``x``."""
    import onnxruntime

    program = export_program(model, x, name, "onnx", dynamic_batch)
    unsupported = custom_ops(program)
    if unsupported:
        raise ValueError(f"model {name!r} cannot be exported to onnx: it calls the custom op(s) {unsupported} "
                         "(C++ kernels), which have no ONNX translation")
    table = {op: fn for op, fn in torch.export.default_decompositions().items() if op in _SDPA_OPS}
    program = program.run_decompositions(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.onnx.export(program, (x,), str(path), dynamo=True, input_names=["input"], output_names=["output"],
                          opset_version=opset, verbose=False)
    except Exception as err:
        raise ValueError(f"model {name!r} cannot be exported to onnx: {_root_cause(err)}") from err
    if dynamic_batch:
        _name_batch_axis(path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    output = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        return _errors(model(x), output)


def export_pt2(model: nn.Module, x: torch.Tensor, path: Path, name: str,
               dynamic_batch: bool = True) -> tuple[float, float]:
    """Write ``model``'s ``torch.export`` program at ``path``, load it back and return its error against eager."""
    program = export_program(model, x, name, "pt2", dynamic_batch)
    ops = custom_ops(program)
    if ops:
        _logger.info("%s calls %s: loading %s needs `import chanzoo` first", name, ops, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        return _errors(model(x), loaded(x))


def chanzoo_args(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """What ``chanzoo.create_model`` adds to the timm model of ``model_cfg`` (its channel module), or {}."""
    if model_cfg.get("attn") in (None, "none"):
        return {}
    return {k: model_cfg[k] for k in CHANZOO_KEYS if model_cfg.get(k) is not None}


def _unserializable(args: dict[str, Any]) -> list[str]:
    """Keys of ``args`` whose values JSON cannot hold (e.g. the channel-module factory of a native slot)."""
    keys = []
    for key, value in args.items():
        try:
            json.dumps(value)
        except TypeError:
            keys.append(key)
    return keys


def load_folder(folder: str | Path, **kwargs: Any) -> nn.Module:
    """The model of a folder written by ``format=safetensors``, through ``chanzoo.create_model`` (timm's
    ``local-dir:`` loader when the model has no channel module)."""
    import timm

    import chanzoo

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    extra = config.get("chanzoo") or {}
    if not extra:
        return timm.create_model(f"local-dir:{folder}", pretrained=True, **kwargs)
    return chanzoo.create_model(
        config["architecture"], pretrained_file=str(folder / "model.safetensors"),
        pretrained_cfg_overlay=dict(config["pretrained_cfg"]), **{**config.get("model_args", {}), **extra, **kwargs},
    )


def export_safetensors(model: nn.Module, x: torch.Tensor, folder: Path, model_cfg: dict[str, Any],
                       img_size: Optional[int] = None) -> tuple[float, float]:
    """Write ``model.safetensors`` + timm's ``config.json`` into ``folder``, load it back with ``load_folder`` and
    return the reloaded model's error against ``model`` on ``x``. ``img_size`` replaces the cfg's input size."""
    from timm.models import save_for_hf
    from timm.models._input import get_model_args

    extra = chanzoo_args(model_cfg)
    # arguments that only carry the channel module (recorded under config.json's "chanzoo" instead)
    dropped = _unserializable(get_model_args(model))
    if dropped and not extra:
        raise ValueError(f"model {model_cfg['name']!r} cannot be saved with its timm config.json: "
                         f"its arguments {dropped} are not JSON-serializable")
    folder.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(folder), model_args=dict.fromkeys(dropped), safe_serialization=True,
                model_config={"chanzoo": extra} if extra else None,
                data_config={"input_size": tuple(x.shape[1:])} if img_size is not None else None)
    if dropped:
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        config["model_args"] = {k: v for k, v in config["model_args"].items() if k not in dropped}
        config_path.write_text(json.dumps(config, indent=2))
    reloaded = load_folder(folder).eval()
    with torch.no_grad():
        return _errors(model(x), reloaded(x))


def default_output(name: str, fmt: str) -> Path:
    """``<name>.onnx``, ``<name>.pt2`` or the folder ``<name>/`` in the working folder."""
    return Path(name if fmt == "safetensors" else f"{name}.{fmt}")


def export(cfg: Any) -> dict[str, Any]:
    """Export the model of ``cfg`` (the composed ``export`` config); returns what was written and measured."""
    from omegaconf import DictConfig, OmegaConf

    fmt = str(cfg.format)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    model_cfg = cfg.get("model")
    if isinstance(model_cfg, DictConfig):  # no model.name: the checkpoint's stored config
        model_cfg = None if OmegaConf.is_missing(model_cfg, "name") else OmegaConf.to_container(model_cfg, resolve=True)
    model, model_cfg = load_model(model_cfg, cfg.get("ckpt_path"))
    name = model_cfg["name"]
    size = input_size(model, cfg.get("img_size"))
    x = example_input(model, size, cfg.get("image"))
    output = Path(cfg.output) if cfg.get("output") else default_output(name, fmt)
    if fmt == "pt2" and output.suffix != ".pt2":
        raise ValueError(f"output={str(output)!r}: format=pt2 writes a .pt2 archive, so the name must end in .pt2")
    dynamic = bool(cfg.get("dynamic_batch", True))
    if fmt == "onnx":
        abs_err, rel_err = export_onnx(model, x, output, name, dynamic, cfg.get("opset"))
        checked = "onnxruntime"
    elif fmt == "pt2":
        abs_err, rel_err = export_pt2(model, x, output, name, dynamic)
        checked = "torch.export.load"
    else:
        abs_err, rel_err = export_safetensors(model, x, output, model_cfg, cfg.get("img_size"))
        checked = "reloaded model"
    source = cfg.get("image") or "a seeded uniform image"
    _logger.info("wrote %s (%s, input %s); %s vs eager on %s: max abs error %.3g (relative %.3g)",
                 output, fmt, (EXAMPLE_BATCH, *size), checked, source, abs_err, rel_err)
    tolerance = cfg.get("tolerance")
    if tolerance is not None and rel_err > float(tolerance):
        raise ValueError(f"model {name!r}: the {fmt} export at {output} differs from the eager model by "
                         f"{rel_err:.3g} (relative), more than tolerance={tolerance}")
    return {"model": name, "format": fmt, "output": str(output), "max_abs_error": abs_err,
            "relative_error": rel_err, "input_size": list(size)}


def main() -> None:
    """``python -m chanzoo.export``."""
    import hydra

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
    def run(cfg: Any) -> None:
        export(cfg)

    run()


if __name__ == "__main__":
    main()
