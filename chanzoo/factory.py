"""``create_model``: timm's ``create_model`` plus the channel-module switch and local pretrained files."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import timm
import torch
from torch import nn

from chanzoo import hub
from chanzoo._names import unknown_name_error
from chanzoo.channel.registry import ChannelModuleSpec, accepted_kwargs, get_channel_module, names_kwarg

_logger = logging.getLogger(__name__)

AttnFactory = Callable[..., nn.Module]
# The model kwargs that pass a channel-module factory in at construction (e.g. ResNet's block_args.attn_layer).
AttnKwargs = Callable[[AttnFactory], dict[str, Any]]
# Places a channel-module factory into a built model; returns the (path, channels) of every module placed.
AttnPlacer = Callable[[nn.Module, AttnFactory], list[tuple[str, int]]]
ATTN_POSITIONS = ("auto", "native", "stage")


@dataclass(frozen=True)
class AttnSlot:
    """The native channel-module slot of one model family (a timm module, see ``model_family``).

    Exactly one of ``kwargs_for`` (construction-time kwargs) and ``place`` (put into the built model) is set.
    ``inplace_safe``: the family's blocks never read the slot's input again, so modules that take ``inplace``
    may scale the features in place.
    """

    family: str
    kwargs_for: Optional[AttnKwargs] = None
    place: Optional[AttnPlacer] = None
    inplace_safe: bool = False

    def __post_init__(self) -> None:
        if (self.kwargs_for is None) == (self.place is None):
            raise TypeError(f"the attn slot of {self.family!r} takes exactly one of kwargs_for and place")


_ATTN_SLOTS: dict[str, AttnSlot] = {}


def register_attn_slot(
    timm_module: str,
    kwargs_for: Optional[AttnKwargs] = None,
    *,
    place: Optional[AttnPlacer] = None,
    inplace_safe: bool = False,
) -> None:
    """Declare the native channel-module slot of the models of ``timm_module``.

    Give exactly one of ``kwargs_for`` (the model kwargs that pass a factory in at construction, e.g. ResNet's
    ``block_args.attn_layer``) or ``place`` (a function that puts modules into the built model, for families whose
    entry points already pass their own attention layer, e.g. MobileNetV3's ``se_layer``). ``inplace_safe``: the
    family's blocks never read the slot's input again, so modules taking an ``inplace`` argument (SE, ECA, cSE)
    get ``inplace=True`` and scale the features in place at inference.
    """
    _ATTN_SLOTS[timm_module] = AttnSlot(timm_module, kwargs_for, place, inplace_safe)


def attn_slot(family: str) -> Optional[AttnSlot]:
    """The native channel-module slot registered for ``family``, or ``None``."""
    return _ATTN_SLOTS.get(family)


def _se_slot_channels(block: nn.Module) -> int:
    """Channels entering the ``se`` slot of a timm MBConv-family block: the width of the last layer before it."""
    channels = 0
    for name, child in block.named_children():
        if name == "se":
            break
        channels = int(getattr(child, "num_features", 0) or getattr(child, "out_channels", 0) or channels)
    if not channels:
        raise ValueError(f"cannot tell the channels of the se slot of {type(block).__name__}")
    return channels


def place_in_se_slots(model: nn.Module, factory: AttnFactory) -> list[tuple[str, int]]:
    """Native slot of timm's MobileNetV2/V3 and EfficientNet families: the ``se`` attribute of each block.

    Where the architecture has squeeze-excite blocks (MobileNetV3, EfficientNet) each one is replaced, so the new
    module sits where the paper put attention; an architecture without any (MobileNetV2, MNASNet-B1) gets the module
    in every block. The module acts on the block's expanded (depthwise) channels.
    """
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, "se", None), nn.Module)]
    has_se = any(not isinstance(block.se, nn.Identity) for _, block in blocks)
    placed = []
    for name, block in blocks:
        if has_se and isinstance(block.se, nn.Identity):
            continue
        channels = _se_slot_channels(block)
        block.se = factory(channels)
        placed.append((f"{name}.se", channels))
    return placed


# In these families the slot's input is a fresh BatchNorm/conv output that the block does not read again.
register_attn_slot("resnet", lambda factory: {"block_args": {"attn_layer": factory}}, inplace_safe=True)
register_attn_slot("efficientnet", place=place_in_se_slots, inplace_safe=True)
register_attn_slot("mobilenetv3", place=place_in_se_slots, inplace_safe=True)


def list_models(pattern: str | Sequence[str] = "", pretrained: bool = False, **kwargs: Any) -> list[str]:
    """Every model name ``create_model`` knows (timm's registry, which chanzoo's models join on import)."""
    return timm.list_models(pattern or "", pretrained=pretrained, **kwargs)


def model_family(model: Union[str, nn.Module]) -> str:
    """A model's family: the timm module that registers it, e.g. 'resnet' or 'davit' (for chanzoo's models, the
    file name in ``chanzoo/models``). ``model`` is a name ('davit_tiny.msft_in1k') or a built model; a model that
    timm's registry does not know (no ``pretrained_cfg``) is named by the module its class comes from.
    """
    if isinstance(model, nn.Module):
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        family = model_family(arch) if isinstance(arch, str) else ""
        return family or type(model).__module__.rsplit(".", 1)[-1]
    arch = timm.models.get_arch_name(model)
    return next((m for m in timm.models.list_modules() if timm.models.is_model_in_modules(arch, m)), "")


def _bind(factory: AttnFactory, attn_kwargs: dict[str, Any]) -> AttnFactory:
    """A factory ``f(channels, **slot_kwargs)`` with the user's kwargs bound; slot kwargs the module lacks are
    dropped."""

    def make(channels: int, **slot_kwargs: Any) -> nn.Module:
        return factory(channels, **accepted_kwargs(factory, slot_kwargs), **attn_kwargs)

    make.module_class = getattr(factory, "module_class", factory)  # type: ignore[attr-defined]
    return make


def _recording(factory: AttnFactory, built: list[tuple[nn.Module, int]]) -> AttnFactory:
    """``factory`` that also appends each module it builds, with its channel count, to ``built``."""

    def make(channels: int, **slot_kwargs: Any) -> nn.Module:
        module = factory(channels, **slot_kwargs)
        built.append((module, channels))
        return module

    make.module_class = getattr(factory, "module_class", factory)  # type: ignore[attr-defined]
    return make


def _apply_stage_attn(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: run the stage's own ``channel_attn`` child on its output (plain function: deepcopy-safe)."""
    if isinstance(output, torch.fx.Proxy):  # torch.fx tracing: shapes are not known yet
        return module.channel_attn(output)
    if not isinstance(output, torch.Tensor) or output.ndim != 4:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(
            f"the stage {type(module).__name__} returned {shape}, but its channel module needs a 4-D feature map"
        )
    return module.channel_attn(output)


class _ChannelsLastAttn(nn.Module):
    """Runs an NCHW channel module on the NHWC stage outputs of models such as Swin."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def feature_stages(model: nn.Module) -> list[tuple[str, int]]:
    """(module name, channels) of each stage in ``model.feature_info``.

    Entries without parameters (a stem activation such as ResNet's ``act1``) are not stages and are passed over.
    """
    feature_info = getattr(model, "feature_info", None)
    if not feature_info:
        raise ValueError(
            f"{type(model).__name__} has no feature_info, so attn_position='stage' cannot find its stages; "
            "use a model with a native attn slot or one that lists its stages in feature_info"
        )
    entries = feature_info.get_dicts() if hasattr(feature_info, "get_dicts") else list(feature_info)
    return [
        (entry["module"], int(entry["num_chs"]))
        for entry in entries
        if any(True for _ in model.get_submodule(entry["module"]).parameters())
    ]


def split_stage_kwargs(attn_kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Split ``attn_kwargs`` into kwargs shared by every module and per-stage lists (one value per stage)."""
    shared = {k: v for k, v in attn_kwargs.items() if not isinstance(v, (list, tuple))}
    per_stage = {k: list(v) for k, v in attn_kwargs.items() if isinstance(v, (list, tuple))}
    return shared, per_stage


def _check_stage_count(per_stage: dict[str, list[Any]], stages: Sequence[str], model_name: str) -> None:
    for key, values in per_stage.items():
        if len(values) != len(stages):
            raise ValueError(
                f"attn_kwargs[{key!r}]={values!r} gives {len(values)} values, but a list means one value per stage "
                f"and {model_name} has {len(stages)} stages {list(stages)}"
            )


def _stage_kwargs(per_stage: dict[str, list[Any]], index: int) -> dict[str, Any]:
    return {key: values[index] for key, values in per_stage.items()}


def apply_stage_kwargs(
    model: nn.Module,
    placed: Sequence[tuple[str, int]],
    factory: AttnFactory,
    per_stage: dict[str, list[Any]],
    model_name: str,
) -> None:
    """Rebuild each placed module (path, channels) with the per-stage kwargs of the stage it lies in.

    A module belongs to the first ``feature_info`` stage that contains it or comes after it (timm lists only the
    stages where the resolution changes, e.g. MobileNetV3's blocks.3 belongs to the stage ending at blocks.4).
    """
    stages = [name for name, _ in feature_stages(model)]
    _check_stage_count(per_stage, stages, model_name)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    stage_ends = [
        max(i for name, i in order.items() if name == stage or name.startswith(stage + ".")) for stage in stages
    ]
    for path, channels in placed:
        index = next((i for i, end in enumerate(stage_ends) if order[path] <= end), len(stages) - 1)
        model.set_submodule(path, factory(channels, **_stage_kwargs(per_stage, index)))


def insert_stage_attention(
    model: nn.Module, factory: AttnFactory, per_stage: Optional[dict[str, list[Any]]] = None, model_name: str = ""
) -> list[str]:
    """Insert one channel module after each stage listed in ``model.feature_info``; returns the stage names.

    ``per_stage`` maps a module kwarg to one value per stage. The module becomes a ``channel_attn`` child of the
    stage, so the backbone's own state-dict keys are unchanged (pretrained weights still load) and the new keys read
    ``<stage>.channel_attn.*``.
    """
    if getattr(model, "num_prefix_tokens", None) is not None:
        raise ValueError(
            f"{model_name or type(model).__name__} is a token model: its stages output (B, N, C) token sequences, "
            "not feature maps, and it has no native channel-attention slot, so a channel module cannot be placed"
        )
    stages = feature_stages(model)
    per_stage = per_stage or {}
    _check_stage_count(per_stage, [name for name, _ in stages], model_name or type(model).__name__)
    channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"
    stage_names = []
    for index, (name, channels) in enumerate(stages):
        stage = model.get_submodule(name)
        if hasattr(stage, "channel_attn"):
            raise ValueError(f"stage {name!r} of {type(model).__name__} already carries a channel module")
        attn = factory(channels, **_stage_kwargs(per_stage, index))
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
    features_only: bool = False,
    out_indices: Optional[Sequence[int]] = None,
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
        attn_kwargs: keyword arguments for every channel module built; a list value gives one value per stage
            (e.g. ``{'kernel_size': [3, 5, 5, 7]}``, the kernels of ECA-Net's released ResNet-50).
        attn_position: 'native' (the family's own attn slot), 'stage' (after each stage in ``feature_info``) or
            'auto' (native where the family has a slot, else stage).
        pretrained_file: a local ``.safetensors``/``.pth`` file to load instead of downloading; torch files must
            load with ``torch.load(weights_only=True)``. Official DaViT/InceptionNeXt/ECA-Net releases are converted.
        features_only: return the feature maps of the stages (timm's ``features_only``) instead of logits.
        out_indices: the stages ``features_only`` returns (default: all).
        **kwargs: passed to the model (drop_path_rate, img_size, ...).
    """
    if not isinstance(model_name, str) or not timm.is_model(model_name):
        raise unknown_name_error("model", model_name, timm.list_models())
    if attn_position not in ATTN_POSITIONS:
        raise ValueError(f"attn_position must be one of {ATTN_POSITIONS}, got {attn_position!r}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if features_only:
        kwargs["features_only"] = True
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
    family = model_family(model_name)
    if pretrained_file is not None or pretrained:
        overlay = kwargs.get("pretrained_cfg_overlay")
        kwargs["pretrained_cfg_overlay"] = (
            hub.pretrained_file_overlay(pretrained_file, overlay)
            if pretrained_file is not None
            else hub.resolve_pretrained_overlay(model_name, overlay)
        )
        filter_fn = hub.checkpoint_filter_for(family)
        if filter_fn is not None:
            kwargs.setdefault("pretrained_filter_fn", filter_fn)
        pretrained = True

    base_factory = get_channel_module(attn)
    shared_kwargs, per_stage = split_stage_kwargs(dict(attn_kwargs or {}))
    if base_factory is None and attn_kwargs:
        raise ValueError(f"attn_kwargs={attn_kwargs!r} given without a channel module (attn={attn!r})")

    slot = attn_slot(family)
    use_native = base_factory is not None and slot is not None and attn_position in ("auto", "native")
    if use_native and slot.inplace_safe and names_kwarg(base_factory, "inplace"):
        shared_kwargs = {"inplace": True, **shared_kwargs}
    factory = None if base_factory is None else _bind(base_factory, shared_kwargs)
    if factory is not None and attn_position == "native" and slot is None:
        raise ValueError(
            f"model {model_name!r} has no native channel-attention slot (families with one: "
            f"{sorted(_ATTN_SLOTS)}); use attn_position='stage' to insert {attn!r} after each stage"
        )
    placer = use_native and slot.place is not None
    built: list[tuple[nn.Module, int]] = []  # modules a construction-time slot builds, to re-build per stage
    if use_native and not placer:
        for key, value in slot.kwargs_for(_recording(factory, built) if per_stage else factory).items():
            kwargs[key] = {**kwargs[key], **value} if isinstance(kwargs.get(key), dict) else value

    # stage modules are inserted into the full model, which is then wrapped to return the stages' features
    wrap_features = factory is not None and not use_native and kwargs.pop("features_only", False)
    wrap_indices = kwargs.pop("out_indices", None) if wrap_features else None
    # Modules placed after construction must be in place before the weights load, so the load waits for them.
    load_later = pretrained and (placer or (use_native and bool(per_stage)))
    try:
        model = timm.create_model(model_name, pretrained=pretrained and not load_later, **kwargs)
        if use_native:
            if placer:
                placed = slot.place(model, factory)
            else:
                paths = {id(module): name for name, module in model.named_modules()}
                placed = [(paths[id(module)], channels) for module, channels in built]
            if per_stage:
                stage_factory = _bind(base_factory, shared_kwargs)
                apply_stage_kwargs(model, placed, stage_factory, per_stage, model_name)
        if load_later:
            timm.models.load_pretrained(
                model,
                pretrained_cfg=model.pretrained_cfg,
                num_classes=model.num_classes,
                in_chans=kwargs.get("in_chans", 3),
                filter_fn=kwargs.get("pretrained_filter_fn"),
            )
    except RuntimeError as err:
        if pretrained and "loading state_dict" in str(err):  # torch's report of keys/shapes that do not fit
            source = kwargs["pretrained_cfg_overlay"].get("file") or model_name
            raise ValueError(f"the weights in {source!r} do not fit {model_name!r}: {err}") from err
        raise

    if factory is not None and not use_native:
        stages = insert_stage_attention(model, factory, per_stage, model_name)
        _logger.info("inserted channel module %r after stages %s of %s", attn, stages, model_name)
        if wrap_features:
            from timm.models._features import FeatureGetterNet

            model = FeatureGetterNet(model, out_indices=wrap_indices if wrap_indices is not None else 4)
    elif factory is not None:
        _logger.info("channel module %r placed in the native slot of %s", attn, model_name)
    return model
