"""Channel-attention modules, each registered by name (see ``list_channel_modules``).

Every module file of this package is imported here, so a new file's ``@register_channel_module`` classes are
registered by ``import chanzoo`` without a line to add.
"""
import importlib
import pkgutil

from chanzoo.channel.registry import (
    create_channel_module,
    get_channel_module,
    list_channel_modules,
    register_channel_module,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["create_channel_module", "get_channel_module", "list_channel_modules", "register_channel_module"]
