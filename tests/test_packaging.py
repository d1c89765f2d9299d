"""The built wheel carries what an installed chanzoo needs: its configs and C++ source, its CLIs run from anywhere.

The wheel is built from a copy of the package (nothing is written into the repo), installed with
``pip install --no-deps --target`` into a temporary folder (never into the running environment), and used from
another folder with only that folder on ``PYTHONPATH``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data

import chanzoo
from support import REPO

pytestmark = pytest.mark.slow
TINY_RGT = {"embed_dim": 32, "num_heads": 2, "depth": [2], "drop_path_rate": 0.0}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The folder the built wheel is installed into."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO / "chanzoo", src / "chanzoo", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    build = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(root / "dist"),
                            str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (root / "dist").glob("chanzoo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.startswith("chanzoo/configs/") and n.endswith(".yaml")}
    package = REPO / "chanzoo"
    expected = {f"chanzoo/{p.relative_to(package).as_posix()}" for p in (package / "configs").rglob("*.yaml")}
    assert shipped == expected
    assert "chanzoo/ops/csrc/selective_scan.cpp" in names
    target = root / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(target),
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    return target


def _run(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``args`` in ``cwd`` with only the installed folder on ``PYTHONPATH`` (not the repo)."""
    env = {**os.environ, "PYTHONPATH": str(site), "CHANZOO_RUNS": str(cwd / "runs"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_installed_package_is_imported_not_the_repo(installed: Path, tmp_path: Path) -> None:
    result = _run([sys.executable, "-c", "import chanzoo; print(chanzoo.__file__)"], installed, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Path(result.stdout.strip()).is_relative_to(installed)


def test_installed_profiler_runs_from_another_folder(installed: Path, tmp_path: Path) -> None:
    result = _run([sys.executable, "-m", "chanzoo.profile", "model.name=resnet18", "batch_size=1", "img_size=32",
                   "repeats=1", "warmup=0", "fvcore=false"], installed, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "profile").iterdir()
    (row,) = json.loads((run_dir / "profile.json").read_text())
    params = sum(p.numel() for p in timm.create_model("resnet18", num_classes=1000).parameters())
    assert row["model"] == "resnet18" and round(row["params_m"] * 1e6) == params
    assert row["img_size"] == 32 and row["infer_img_s"] > 0
    # the console script composes the same packaged configs
    script = _run([str(installed / "bin" / "chanzoo-profile"), "--cfg", "job", "model.name=resnet18"], installed,
                  tmp_path)
    assert script.returncode == 0, script.stderr[-3000:]
    assert "name: resnet18" in script.stdout and "_target_: chanzoo.create_model" in script.stdout


def test_installed_restore_cli_upscales_a_photo_with_the_given_weights(installed: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = chanzoo.create_model("rgt_s_x2", **TINY_RGT).eval()
    torch.save(model.state_dict(), tmp_path / "rgt_tiny.pth")
    photo = data.chelsea()[40:64, 100:132]  # 24 x 32 crop of a bundled photo (the cat's face)
    Image.fromarray(photo).save(tmp_path / "cat.png")
    kwargs = [f"+model.kwargs.{k}={json.dumps(v)}" for k, v in TINY_RGT.items()]
    result = _run([sys.executable, "-m", "chanzoo.restore", "model=rgt_s_x2",
                   f"model.pretrained_file={tmp_path / 'rgt_tiny.pth'}", *kwargs, f"input={tmp_path / 'cat.png'}",
                   f"output={tmp_path / 'cat_x2.png'}", "device=cpu", "progress=false"], installed, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    restored = np.asarray(Image.open(tmp_path / "cat_x2.png"))
    assert restored.shape == (48, 64, 3)
    with torch.no_grad():
        x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
        expected = model(x)[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    assert np.abs(restored.astype(int) - expected.astype(int)).max() <= 1  # the saved weights, not random ones
