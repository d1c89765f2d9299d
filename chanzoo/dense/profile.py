"""Parameters and FLOPs of a dense model, backbone and head (neck + heads/decoder) separately."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


def dense_profile(model: nn.Module, backbone: nn.Module, input_size: Sequence[int]) -> dict[str, Any]:
    """Params and FLOPs (``chanzoo.profile.count_flops``: 2 per multiply-add) of ``backbone`` (a module inside
    ``model``) and of the rest of ``model``, for one image of ``input_size`` (C, H, W) in eval mode.

    A torchvision detector takes the image as a list and resizes it first (``min_size``/``max_size``), so the
    backbone is counted at the size it is actually given; the heads of a two-stage detector are counted on the
    proposals and detections this input produces (with trained weights on a real image the mask head's share can
    differ).
    """
    from chanzoo.profile import count_flops, count_params  # the project's counter (its CLI module: loaded on use)

    if len(input_size) != 3:
        raise ValueError(f"input_size={list(input_size)} must be [channels, height, width]")
    image = torch.zeros(*input_size)
    is_detector = hasattr(model, "transform") and hasattr(model, "backbone")
    seen: list[torch.Size] = []
    handle = backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    was_training = model.training
    model.eval()
    try:
        total_flops, _ = count_flops(model, [image] if is_detector else image[None])
    finally:
        handle.remove()
        model.train(was_training)
    if not seen:
        raise ValueError(f"{type(backbone).__name__} is not called by {type(model).__name__}'s forward")
    backbone_flops, _ = count_flops(backbone.eval(), torch.zeros(seen[0]))
    backbone.train(was_training)
    total_params, _ = count_params(model)
    backbone_params, _ = count_params(backbone)
    return {
        "input_size": list(input_size),
        "backbone_input": list(seen[0][1:]),
        "backbone_params": backbone_params,
        "head_params": total_params - backbone_params,
        "params": total_params,
        "backbone_flops": backbone_flops,
        "head_flops": total_flops - backbone_flops,
        "flops": total_flops,
    }
