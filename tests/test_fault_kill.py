"""kill -9 at random moments of a run that checkpoints every step: every checkpoint left loads, the next start removes
the temporary files of the folder it resumes, and ``resume=last`` continues from the newest step."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from support import REPO

KILLS = 10
RUN = [
    "data.subset=300", "data.batch_size=8", "data.eval_batch_size=60", "trainer.max_epochs=1000",
    "+callbacks.checkpoint.every_n_train_steps=1", "test_after_fit=false", "trainer.enable_progress_bar=false",
    "trainer.num_sanity_val_steps=0", "accel.compile=false",
]


def _step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def _newest_last(runs: Path) -> tuple[Path, int] | None:
    found = [(p, _step(p)) for p in runs.glob("*/*/checkpoints/last.ckpt")]
    return max(found, key=lambda item: item[1]) if found else None


@pytest.mark.slow
def test_kill_9_never_breaks_a_checkpoint_and_resume_continues(tmp_path):
    rng = random.Random(0)
    runs = tmp_path / "runs"
    env = {**os.environ, "CHANZOO_RUNS": str(runs), "PYTHONUNBUFFERED": "1"}
    resumed_steps = []
    for kill in range(KILLS):
        newest = _newest_last(runs)
        stale = []
        if newest is not None:  # a temporary file as a kill in the middle of a write leaves it
            stale_tmp = newest[0].parent / f".last.ckpt.kill{kill:02d}.tmp"
            stale_tmp.write_bytes(b"\0" * 4096)
            stale = [p for p in newest[0].parent.iterdir() if p.name.endswith(".tmp")]
        before = set(runs.glob("*/*"))
        log = tmp_path / f"run{kill}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, str(REPO / "train.py"), *RUN, *(["resume=last"] if newest else [])],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            )
            deadline = time.monotonic() + 300
            new_last = None
            while time.monotonic() < deadline and proc.poll() is None and new_last is None:
                found = [d / "checkpoints" / "last.ckpt" for d in set(runs.glob("*/*")) - before]
                new_last = next((p for p in found if p.is_file()), None)
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))  # a random moment: often in the middle of a checkpoint write
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert new_last is not None, log.read_text()[-3000:]
        for ckpt in runs.glob("*/*/checkpoints/*.ckpt"):  # every checkpoint left behind loads
            torch.load(ckpt, map_location="cpu", weights_only=True)
        if newest is not None:
            assert not [p for p in stale if p.exists()], "the next start left temporary files of the folder it resumed"
            assert f"Restoring states from the checkpoint path at {newest[0]}" in log.read_text()
            # the first checkpoint of the resumed run was written one step after the newest one
            first_steps = [_step(p) for p in new_last.parent.glob("*.ckpt")]
            assert min(first_steps) >= newest[1] + 1
            resumed_steps.append(newest[1])
    assert len(resumed_steps) == KILLS - 1
    assert resumed_steps == sorted(resumed_steps) and resumed_steps[-1] > resumed_steps[0]
