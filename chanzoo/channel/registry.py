"""Registry of channel modules: ``nn.Module(channels, **kwargs)`` mapping NCHW to NCHW, looked up by name."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Optional, Type, TypeVar, Union

from torch import nn

from chanzoo._names import unknown_name_error

ModuleT = TypeVar("ModuleT", bound=Type[nn.Module])
ChannelModuleSpec = Union[str, Type[nn.Module], Callable[..., nn.Module], None]

_CHANNEL_MODULES: dict[str, Callable[..., nn.Module]] = {}
_NO_MODULE = {"", "none", "identity"}


def register_channel_module(name: str, **defaults: Any) -> Callable[[ModuleT], ModuleT]:
    """Class decorator registering ``cls`` under ``name``; ``defaults`` are bound kwargs (e.g. a variant's kernel)."""

    def wrap(cls: ModuleT) -> ModuleT:
        if name in _CHANNEL_MODULES:
            raise ValueError(f"channel module name {name!r} is already registered")
        if defaults:
            def make(channels: int, **kwargs: Any) -> nn.Module:
                return cls(channels, **{**defaults, **kwargs})

            make.__name__ = make.__qualname__ = f"{cls.__name__}[{name}]"
            make.__doc__ = cls.__doc__
            make.module_class = cls  # type: ignore[attr-defined]
            _CHANNEL_MODULES[name] = make
        else:
            _CHANNEL_MODULES[name] = cls
        return cls

    return wrap


def list_channel_modules() -> list[str]:
    """Names of every registered channel module, sorted."""
    return sorted(_CHANNEL_MODULES)


def get_channel_module(spec: ChannelModuleSpec) -> Callable[..., nn.Module] | None:
    """Resolve a name, a class or a factory to a factory ``f(channels, **kw)``; ``None``/'none' give ``None``."""
    if spec is None or (isinstance(spec, str) and spec.lower() in _NO_MODULE):
        return None
    if isinstance(spec, str):
        key = spec.lower()
        if key not in _CHANNEL_MODULES:
            raise unknown_name_error("channel module", spec, list(_CHANNEL_MODULES) + ["none"])
        return _CHANNEL_MODULES[key]
    if isinstance(spec, nn.Module):
        raise TypeError(
            f"attn must be a channel-module name, class or factory, not a module instance ({type(spec).__name__}): "
            "one module per insertion point is built from it"
        )
    if callable(spec):
        return spec
    raise TypeError(f"attn must be a channel-module name, class or factory, got {type(spec).__name__}: {spec!r}")


def create_channel_module(name: ChannelModuleSpec, channels: int, **kwargs: Any) -> nn.Module:
    """Build the channel module ``name`` for ``channels`` input channels."""
    if not isinstance(channels, int) or isinstance(channels, bool) or channels <= 0:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    factory = get_channel_module(name)
    if factory is None:
        return nn.Identity()
    return factory(channels, **kwargs)


def _parameters(factory: Callable[..., nn.Module]) -> Optional[Mapping[str, inspect.Parameter]]:
    """The signature parameters of ``factory`` (or the class behind it), None where Python cannot tell."""
    try:
        return inspect.signature(getattr(factory, "module_class", factory)).parameters
    except (TypeError, ValueError):
        return None


def names_kwarg(factory: Callable[..., nn.Module], name: str) -> bool:
    """Whether ``factory`` (or the class behind it) has a parameter called ``name`` (``**kwargs`` does not count)."""
    return name in (_parameters(factory) or {})


def accepted_kwargs(factory: Callable[..., nn.Module], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``factory`` (or the class behind it) takes by name."""
    params = _parameters(factory)
    if params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}
