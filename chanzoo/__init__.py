"""chanzoo: vision backbones and channel-attention modules on timm, with a Hydra + Lightning pipeline."""
from chanzoo import models  # noqa: F401  (registers chanzoo's models with timm)
from chanzoo.channel import create_channel_module, list_channel_modules, register_channel_module
from chanzoo.factory import create_model, list_models

__version__ = "0.1.0"
__all__ = [
    "create_channel_module",
    "create_model",
    "list_channel_modules",
    "list_models",
    "register_channel_module",
]
