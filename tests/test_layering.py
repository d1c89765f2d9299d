"""Imports point down: ``import chanzoo`` and building a model need torch and timm only."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from support import REPO

FORBIDDEN = ("lightning", "pytorch_lightning", "hydra", "chanzoo.data", "chanzoo.tasks")


def _modules_after(code: str) -> set[str]:
    """The names in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return set(json.loads(result.stdout.splitlines()[-1]))


def _loaded(modules: set[str]) -> list[str]:
    return sorted(name for name in FORBIDDEN if name in modules)


def test_import_chanzoo_loads_no_lightning_hydra_or_data() -> None:
    assert _loaded(_modules_after("import chanzoo")) == []


def test_building_models_loads_no_lightning_hydra_or_data() -> None:
    code = "import chanzoo\nfor name in ('small_cnn', 'resnet18', 'vim2_nano', 'channelvit_tiny_p16'):\n" \
           "    chanzoo.create_model(name, attn='eca' if name == 'resnet18' else None)"
    assert _loaded(_modules_after(code)) == []
