"""Helpers shared by the test modules (import as ``from support import ...``; tests/ is on pytest's pythonpath)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def run_entry(script: str, overrides: Sequence[str], runs_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python <script> <overrides>`` from the repo root with runs written under ``runs_dir``."""
    env = {**os.environ, "CHANZOO_RUNS": str(runs_dir), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def only_run_dir(runs_dir: Path, run_name: str) -> Path:
    """The single timestamped run folder of ``run_name`` under ``runs_dir``."""
    dirs = sorted((runs_dir / run_name).iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]
