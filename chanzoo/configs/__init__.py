"""chanzoo's Hydra configs, shipped inside the package so installed wheels find them (``CONFIG_DIR``).

Importing this package registers the config resolvers the files use:

* ``${chanzoo.for_model:<name>,<value>}``: ``<value>`` while the enclosing config's ``name`` is ``<name>``, else
  ``null``. A model file's own presets (small_cnn's SE module) then stay with that model when a user switches to
  another one with ``model.name=<other>``.
"""
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent


def _for_model(model_name: str, value: Any, *, _parent_: Any) -> Any:
    return value if _parent_.get("name") == model_name else None


if not OmegaConf.has_resolver("chanzoo.for_model"):
    OmegaConf.register_new_resolver("chanzoo.for_model", _for_model)
