"""chanzoo's Hydra configs, shipped inside the package so installed wheels find them (``CONFIG_DIR``).

Importing this package registers the ``chanzoo_hash`` resolver that ``config.yaml`` uses to name run folders
(``run_tag``), so that any code composing the configs (the entry points, tests, notebooks) can resolve them.
"""
import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent
# model-config keys that choose how weights start or run, not which weights a checkpoint holds
INIT_ONLY_KEYS = frozenset({"pretrained", "pretrained_file", "compile", "compile_mode", "channels_last"})


def config_hash(node: Any, length: int = 6) -> str:
    """A short, stable hash of a config node (``INIT_ONLY_KEYS`` left out): tells runs of different models apart."""
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    if isinstance(plain, dict):
        plain = {k: v for k, v in plain.items() if k not in INIT_ONLY_KEYS}
    return hashlib.sha1(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:length]


if not OmegaConf.has_resolver("chanzoo_hash"):
    OmegaConf.register_new_resolver("chanzoo_hash", config_hash)
