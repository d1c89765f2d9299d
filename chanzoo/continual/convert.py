"""Official CLR task checkpoints (gyhandy/Channel-wise-Lightweight-Reprogramming) in chanzoo's layout.

The official training script saves the whole task model's ``state_dict``: the torchvision ResNet sits under
``model.``, each reprogrammed conv is a block whose frozen conv is ``original_block`` and whose depthwise
reprogramming conv is ``Ghos_Mod.0``; BatchNorm layers and the classifier keep torchvision's names, which timm's
ResNets share. chanzoo's ``CLRConv2d`` names the two ``anchor`` and ``reprogram``. So::

    model.layer1.0.conv1.original_block.weight -> layer1.0.conv1.anchor.weight
    model.layer1.0.conv1.Ghos_Mod.0.weight     -> layer1.0.conv1.reprogram.weight
    model.layer1.0.bn1.running_mean            -> layer1.0.bn1.running_mean

A checkpoint holds the frozen anchor convs too (the BatchNorm layers in it are the task's own).
``python -m chanzoo.continual.convert official.pth task.safetensors --model resnet18`` writes the task's own tensors
as a chanzoo task file for ``chanzoo.channel.clr.load_task`` on a reprogrammed anchor of the same weights (timm's
``resnet18.tv_in1k`` is torchvision's ImageNet ResNet-18, the official anchor).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from chanzoo import hub
from chanzoo.channel.clr import reprogram, save_tensors, task_state_dict

_logger = logging.getLogger(__name__)

OFFICIAL_WRAPPERS = ("module.", "model.")  # DataParallel, then the official Res_Ghost's `model` attribute
OFFICIAL_NAMES = {"original_block": "anchor", "Ghos_Mod.0": "reprogram"}


def read_state_dict(path: str, argument: str = "path") -> dict[str, Any]:
    """Tensors of a ``.safetensors`` file or a torch file readable with ``torch.load(weights_only=True)``."""
    file = hub.check_weights_file(path, argument=argument)
    if file.suffix == ".safetensors":
        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official keys renamed to chanzoo's (see the module docstring); tensors unchanged."""
    converted = {}
    for key, value in state.items():
        for prefix in OFFICIAL_WRAPPERS:
            if key.startswith(prefix):
                key = key[len(prefix):]
        for official, ours in OFFICIAL_NAMES.items():
            key = key.replace(f".{official}.", f".{ours}.")
        converted[key] = value
    if not any(".reprogram." in k for k in converted):
        raise ValueError("the state dict has no `Ghos_Mod.0` tensor: it is not an official CLR checkpoint")
    return converted


def official_variant(state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(variant, kernel size) of a converted official state dict, read from which convs carry which kernels."""
    wrapped = [k[: -len(".reprogram.weight")] for k in state if k.endswith(".reprogram.weight")]
    pointwise = [p for p in wrapped if tuple(state[f"{p}.anchor.weight"].shape[-2:]) == (1, 1)]
    kernels = {tuple(state[f"{p}.reprogram.weight"].shape[-2:]) for p in wrapped if p not in pointwise}
    if len(kernels) != 1:
        raise ValueError(f"the reprogramming convs of the checkpoint have mixed kernel sizes {sorted(kernels)}")
    kernel_size = next(iter(kernels))[0]
    if not pointwise:
        return "reduced_v1", kernel_size
    pointwise_kernels = {tuple(state[f"{p}.reprogram.weight"].shape[-2:]) for p in pointwise}
    return ("reduced_v2" if pointwise_kernels == {(1, 1)} else "base"), kernel_size


def load_official_checkpoint(
    model: nn.Module, checkpoint: dict[str, torch.Tensor] | str, load_anchor: bool = True
) -> nn.Module:
    """Make ``model`` (a plain timm ResNet, or one already reprogrammed the same way) the official task model.

    The checkpoint's variant and kernel size decide how ``model`` is reprogrammed (if it is not yet); its classifier
    width sets the head. With ``load_anchor`` the frozen anchor weights come from the checkpoint too; without, the
    checkpoint's anchor must equal ``model``'s (a task state only means something on its own anchor).

    Returns:
        ``model``, reprogrammed, holding the checkpoint's task.
    """
    state = read_state_dict(checkpoint, "checkpoint") if isinstance(checkpoint, str) else dict(checkpoint)
    state = convert_official_state_dict(state)
    variant, kernel_size = official_variant(state)
    if not any(".reprogram." in k for k in model.state_dict()):
        reprogram(model, kernel_size=kernel_size, variant=variant)
    expected = model.state_dict()
    head_key = next((k for k in task_state_dict(model) if k.endswith(".weight") and k in state
                     and state[k].ndim == 2), None)
    if head_key is not None and state[head_key].shape != expected[head_key].shape:
        model.reset_classifier(int(state[head_key].shape[0]))
        model.get_classifier().requires_grad_(True)
        expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"official checkpoint ({variant}, k={kernel_size}) does not fit {type(model).__name__}: missing keys "
            f"{missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    task_keys = set(task_state_dict(model))
    if not load_anchor:
        differ = [k for k in expected if k not in task_keys and not torch.equal(expected[k], state[k])]
        if differ:
            raise ValueError(
                f"the checkpoint's anchor differs from the model's in {len(differ)} tensors (first: {differ[0]}); "
                "load it with load_anchor=True or build the model with the checkpoint's anchor weights"
            )
        state = {k: v for k, v in state.items() if k in task_keys}
    model.load_state_dict(state, strict=load_anchor)
    _logger.info("official CLR checkpoint loaded: variant %s, kernel %d, %d task tensors", variant, kernel_size,
                 len(task_keys))
    return model


def main(argv: Optional[Sequence[str]] = None) -> None:
    from chanzoo.factory import create_model

    parser = argparse.ArgumentParser(prog="python -m chanzoo.continual.convert", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="an official task checkpoint (.pth)")
    parser.add_argument("out", help="the chanzoo task file to write (.safetensors)")
    parser.add_argument("--model", default="resnet18", help="the anchor architecture (timm name)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = load_official_checkpoint(create_model(args.model), args.checkpoint)
    save_tensors(task_state_dict(model), Path(args.out))
    _logger.info("written %s", args.out)


if __name__ == "__main__":
    main()
