"""chanzoo's Hydra configs, shipped inside the package so installed wheels find them (``CONFIG_DIR``).

Importing this package registers the config resolvers the files use, so that any code composing the configs (the
entry points, tests, notebooks) can resolve them:

* ``${chanzoo.for_model:<name>,<value>}``: ``<value>`` while the enclosing config's ``name`` is ``<name>``, else
  ``null``. A model file's own presets (small_cnn's SE module) then stay with that model when a user switches to
  another one with ``model.name=<other>``.
* ``${chanzoo_hash:<node>}``: a short hash of a config node, which ``config.yaml`` uses to name run folders
  (``run_tag``).
"""
import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent
# model-config keys that choose how weights start or run, not which weights a checkpoint holds
INIT_ONLY_KEYS = frozenset({"pretrained", "pretrained_file", "compile", "compile_mode", "channels_last"})


def _for_model(model_name: str, value: Any, *, _parent_: Any) -> Any:
    return value if _parent_.get("name") == model_name else None


def config_hash(node: Any, length: int = 6) -> str:
    """A short, stable hash of a config node (``INIT_ONLY_KEYS`` left out): tells runs of different models apart."""
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    if isinstance(plain, dict):
        plain = {k: v for k, v in plain.items() if k not in INIT_ONLY_KEYS}
    return hashlib.sha1(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:length]


if not OmegaConf.has_resolver("chanzoo.for_model"):
    OmegaConf.register_new_resolver("chanzoo.for_model", _for_model)
if not OmegaConf.has_resolver("chanzoo_hash"):
    OmegaConf.register_new_resolver("chanzoo_hash", config_hash)
