"""Parameter groups of a dense model: a backbone learning-rate multiplier and layer-wise decay for ViT backbones.

Each group carries ``lr_scale``, which timm's schedulers multiply into the scheduled learning rate; its ``lr`` is
set to ``base_lr * lr_scale`` too, so the scales also hold without a scheduler.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn


def dense_param_groups(
    model: nn.Module,
    backbone: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float = 1.0,
    layer_decay: Optional[float] = None,
) -> list[dict[str, Any]]:
    """Optimizer groups: ``backbone`` (a module inside ``model``) at ``lr * backbone_lr_mult`` (times timm's
    layer-wise decay per block when ``layer_decay`` is set, from the backbone's ``group_matcher``), the rest of
    ``model`` (neck, heads) at ``lr``. Norms and biases get no weight decay, as in timm."""
    if backbone_lr_mult < 0:
        raise ValueError(f"backbone_lr_mult={backbone_lr_mult} must be >= 0")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay={layer_decay} must be in (0, 1]")
    if layer_decay is not None:
        backbone_groups = param_groups_layer_decay(backbone, weight_decay=weight_decay, layer_decay=layer_decay)
    else:
        backbone_groups = param_groups_weight_decay(backbone, weight_decay=weight_decay)
    backbone_ids = {id(p) for p in backbone.parameters()}
    head_params = [(n, p) for n, p in model.named_parameters() if id(p) not in backbone_ids and p.requires_grad]
    head_groups = param_groups_weight_decay(_Named(head_params), weight_decay=weight_decay) if head_params else []
    groups = []
    for group in backbone_groups:
        scale = float(group.get("lr_scale", 1.0)) * backbone_lr_mult
        groups.append({**group, "lr_scale": scale, "lr": lr * scale})
    for group in head_groups:
        groups.append({**group, "lr_scale": 1.0, "lr": lr})
    return [g for g in groups if g["params"]]


class _Named(nn.Module):
    """Presents (name, parameter) pairs as a module, for timm's grouping helpers."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        super().__init__()
        self._named = named

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:  # type: ignore[override]
        return iter(self._named)
