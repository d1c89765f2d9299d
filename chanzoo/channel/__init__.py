"""Channel-attention modules, each registered by name (see ``list_channel_modules``)."""
from chanzoo.channel import eca, ela, psa, scse, se  # noqa: F401  (registers the modules)
from chanzoo.channel.registry import (
    create_channel_module,
    get_channel_module,
    list_channel_modules,
    register_channel_module,
)

__all__ = ["create_channel_module", "get_channel_module", "list_channel_modules", "register_channel_module"]
