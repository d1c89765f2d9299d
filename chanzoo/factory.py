"""``create_model``: timm's ``create_model`` plus the channel-module switch and local pretrained files."""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import timm
import torch
from torch import nn

from chanzoo import hub
from chanzoo._names import unknown_name_error
from chanzoo.channel.registry import ChannelModuleSpec, accepted_kwargs, get_channel_module

_logger = logging.getLogger(__name__)

AttnFactory = Callable[..., nn.Module]
# timm module name -> how a channel-module factory enters that family's own slot (create_model kwargs).
_NATIVE_SLOTS: dict[str, Callable[[AttnFactory], dict[str, Any]]] = {
    "resnet": lambda factory: {"block_args": {"attn_layer": factory}},
}
ATTN_POSITIONS = ("auto", "native", "stage")


def register_attn_slot(timm_module: str, kwargs_for: Callable[[AttnFactory], dict[str, Any]]) -> None:
    """Declare how the models of ``timm_module`` take a channel module at construction (their native slot)."""
    _NATIVE_SLOTS[timm_module] = kwargs_for


def list_models(pattern: str | Sequence[str] = "", pretrained: bool = False, **kwargs: Any) -> list[str]:
    """Every model name ``create_model`` knows (timm's registry, which chanzoo's models join on import)."""
    return timm.list_models(pattern or "", pretrained=pretrained, **kwargs)


def _model_module(name: str) -> str:
    """The timm module (family) that registers ``name``, e.g. 'resnet' or 'davit'."""
    arch = timm.models.get_arch_name(name)
    for module in timm.models.list_modules():
        if timm.models.is_model_in_modules(arch, module):
            return module
    return ""


def _bind(factory: AttnFactory, attn_kwargs: dict[str, Any]) -> AttnFactory:
    """A factory ``f(channels, **slot_kwargs)`` with the user's kwargs bound; slot kwargs the module lacks are dropped."""

    def make(channels: int, **slot_kwargs: Any) -> nn.Module:
        return factory(channels, **accepted_kwargs(factory, slot_kwargs), **attn_kwargs)

    make.module_class = getattr(factory, "module_class", factory)  # type: ignore[attr-defined]
    return make


def _apply_stage_attn(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: run the stage's own ``channel_attn`` child on its output (plain function: deepcopy-safe)."""
    return module.channel_attn(output)


class _ChannelsLastAttn(nn.Module):
    """Runs an NCHW channel module on the NHWC stage outputs of models such as Swin."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def insert_stage_attention(model: nn.Module, factory: AttnFactory) -> list[str]:
    """Insert one channel module after each stage listed in ``model.feature_info``; returns the stage names.

    Entries without parameters (a stem activation such as ResNet's ``act1``) are not stages and are passed over.

    The module becomes a ``channel_attn`` child of the stage, so the backbone's own state-dict keys are unchanged
    (pretrained weights still load) and the new keys read ``<stage>.channel_attn.*``.
    """
    feature_info = getattr(model, "feature_info", None)
    if not feature_info:
        raise ValueError(
            f"{type(model).__name__} has no feature_info, so attn_position='stage' cannot find its stages; "
            "use a model with a native attn slot or one that lists its stages in feature_info"
        )
    entries = feature_info.get_dicts() if hasattr(feature_info, "get_dicts") else list(feature_info)
    channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"
    stage_names = []
    for entry in entries:
        name, channels = entry["module"], int(entry["num_chs"])
        stage = model.get_submodule(name)
        if not any(True for _ in stage.parameters()):
            continue  # a stem activation such as ResNet's act1 is listed in feature_info but is not a stage
        if hasattr(stage, "channel_attn"):
            raise ValueError(f"stage {name!r} of {type(model).__name__} already carries a channel module")
        attn = factory(channels)
        stage.add_module("channel_attn", _ChannelsLastAttn(attn) if channels_last else attn)
        if not isinstance(stage, nn.Sequential):  # a Sequential runs its new last child by itself
            stage.register_forward_hook(_apply_stage_attn)
        stage_names.append(name)
    return stage_names


def create_model(
    model_name: str,
    pretrained: bool = False,
    num_classes: Optional[int] = None,
    in_chans: Optional[int] = None,
    attn: ChannelModuleSpec = None,
    attn_kwargs: Optional[dict[str, Any]] = None,
    attn_position: str = "auto",
    pretrained_file: Optional[str] = None,
    **kwargs: Any,
) -> nn.Module:
    """Create any timm or chanzoo model by name, optionally carrying a channel module.

    Args:
        model_name: a name from ``list_models()`` (with or without a pretrained tag, e.g. 'davit_tiny.msft_in1k').
        pretrained: load the model's default pretrained weights (fetched once, verified and cached by
            ``chanzoo.hub``; without network and cache this fails in seconds, naming the source).
        num_classes: classifier width; a value unlike the weights' re-initialises the head.
        in_chans: input channels; a value unlike the weights' adapts the first conv as timm does.
        attn: channel module by name (``list_channel_modules()``), class or factory; ``None``/'none' for none.
        attn_kwargs: keyword arguments for every channel module built.
        attn_position: 'native' (the family's own attn slot), 'stage' (after each stage in ``feature_info``) or
            'auto' (native where the family has a slot, else stage).
        pretrained_file: a local ``.safetensors``/``.pth`` file to load instead of downloading; torch files must
            load with ``torch.load(weights_only=True)``. Official DaViT/InceptionNeXt/ECA-Net releases are converted.
        **kwargs: passed to the model (drop_path_rate, features_only, out_indices, ...).
    """
    if not isinstance(model_name, str) or not timm.is_model(model_name):
        raise unknown_name_error("model", model_name, timm.list_models())
    if attn_position not in ATTN_POSITIONS:
        raise ValueError(f"attn_position must be one of {ATTN_POSITIONS}, got {attn_position!r}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if pretrained_file is not None or pretrained:
        overlay = kwargs.get("pretrained_cfg_overlay")
        kwargs["pretrained_cfg_overlay"] = (
            hub.pretrained_file_overlay(pretrained_file, overlay)
            if pretrained_file is not None
            else hub.resolve_pretrained_overlay(model_name, overlay)
        )
        filter_fn = hub.checkpoint_filter_for(_model_module(model_name))
        if filter_fn is not None:
            kwargs.setdefault("pretrained_filter_fn", filter_fn)
        pretrained = True

    factory = get_channel_module(attn)
    if factory is not None:
        factory = _bind(factory, dict(attn_kwargs or {}))
    elif attn_kwargs:
        raise ValueError(f"attn_kwargs={attn_kwargs!r} given without a channel module (attn={attn!r})")

    slot = _NATIVE_SLOTS.get(_model_module(model_name))
    use_native = factory is not None and slot is not None and attn_position in ("auto", "native")
    if factory is not None and attn_position == "native" and slot is None:
        raise ValueError(
            f"model {model_name!r} has no native channel-attention slot (families with one: "
            f"{sorted(_NATIVE_SLOTS)}); use attn_position='stage' to insert {attn!r} after each stage"
        )
    if use_native:
        for key, value in slot(factory).items():
            kwargs[key] = {**kwargs[key], **value} if isinstance(kwargs.get(key), dict) else value

    features_only = factory is not None and not use_native and kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None) if features_only else None
    try:
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if pretrained and "loading state_dict" in str(err):  # torch's report of keys/shapes that do not fit
            source = kwargs["pretrained_cfg_overlay"]["file"]
            raise ValueError(f"the weights in {source!r} do not fit {model_name!r}: {err}") from err
        raise

    if factory is not None and not use_native:
        stages = insert_stage_attention(model, factory)
        _logger.info("inserted channel module %r after stages %s of %s", attn, stages, model_name)
        if features_only:
            from timm.models._features import FeatureGetterNet

            model = FeatureGetterNet(model, out_indices=out_indices if out_indices is not None else 4)
    elif factory is not None:
        _logger.info("channel module %r placed in the native slot of %s", attn, model_name)
    return model
