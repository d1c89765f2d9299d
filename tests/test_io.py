"""chanzoo.io: atomic writes keep the old file on failure, leave no temporary file and follow the umask."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from chanzoo.io import (
    TEMP_GLOB,
    atomic_open,
    torch_save_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_writers_replace_the_file_whole_with_the_umasks_mode(tmp_path: Path, umask_027: int) -> None:
    target = tmp_path / "sub" / "metrics.json"  # the folder is created
    write_json_atomic(target, {"acc1": 0.91})
    assert json.loads(target.read_text()) == {"acc1": 0.91}
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask_027  # 0640, not mkstemp's 0600
    write_text_atomic(target, "second")
    assert target.read_text() == "second"
    write_bytes_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert list(target.parent.glob(TEMP_GLOB)) == []


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk gone"):
        with atomic_open(target, "w") as handle:
            handle.write("half a tab")
            assert len(list(tmp_path.glob(TEMP_GLOB))) == 1  # staged beside the target, hidden
            raise RuntimeError("disk gone")
    assert target.read_text() == "old\n"
    assert list(tmp_path.glob(TEMP_GLOB)) == []


def test_torch_save_atomic_round_trips(tmp_path: Path) -> None:
    state = {"weight": torch.arange(6.0).reshape(2, 3)}
    path = torch_save_atomic(state, tmp_path / "w.pth")
    assert torch.equal(torch.load(path, weights_only=True)["weight"], state["weight"])


def test_bad_mode_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"):
        with atomic_open(tmp_path / "x", "a"):
            pass
