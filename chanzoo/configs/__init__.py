"""chanzoo's Hydra configs, shipped inside the package so installed wheels find them (``CONFIG_DIR``)."""
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
