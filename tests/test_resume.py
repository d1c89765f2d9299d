"""Resume after SIGKILL gives bit-identical final weights; checkpoints are written atomically."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from chanzoo.callbacks import AtomicCheckpointIO
from support import REPO, only_run_dir, run_entry

RUN = ["deterministic=true", "data.subset=2500", "trainer.max_epochs=3", "test_after_fit=false", "data.batch_size=64"]


def _final_weights(ckpt_path):
    return torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run_bit_for_bit(tmp_path):
    full = run_entry("train.py", RUN, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    reference = _final_weights(only_run_dir(tmp_path / "full", "small_cnn_fashion_mnist") / "checkpoints/last.ckpt")

    runs = tmp_path / "killed"
    env = {**os.environ, "CHANZOO_RUNS": str(runs)}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *RUN], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    last = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(runs.glob("*/*/checkpoints/last.ckpt"))
        if found:
            last = found[0]
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last is not None, "the run wrote no epoch-end checkpoint before it ended"
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert killed_at < 2, "the run had already finished; nothing was resumed"

    resumed = run_entry("train.py", [*RUN, f"resume={last}"], tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = _final_weights(only_run_dir(tmp_path / "resumed", "small_cnn_fashion_mnist") / "checkpoints/last.ckpt")
    assert final.keys() == reference.keys()
    for key in reference:
        assert torch.equal(final[key], reference[key]), key


def test_resume_last_finds_newest_and_bad_path_is_named(tmp_path):
    from chanzoo.run import resolve_resume

    with pytest.raises(FileNotFoundError, match="resume=last but no"):
        resolve_resume("last", tmp_path)
    for name in ("2026-01-01_00-00-00", "2026-01-02_00-00-00"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "last.ckpt").write_bytes(b"x")
        time.sleep(0.01)
    assert resolve_resume("last", tmp_path).endswith("2026-01-02_00-00-00/checkpoints/last.ckpt")
    with pytest.raises(FileNotFoundError, match="resume='nope.ckpt'"):
        resolve_resume("nope.ckpt", tmp_path)


class _FailsMidWrite:
    """Pickles to a few bytes, then raises: a crash in the middle of writing a checkpoint."""

    def __reduce__(self):
        raise RuntimeError("disk went away")


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"weights": torch.arange(1000.0), "epoch": 0}, path)
    with pytest.raises(RuntimeError, match="disk went away"):
        io.save_checkpoint({"weights": torch.zeros(10**6), "boom": _FailsMidWrite()}, path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 0 and torch.equal(ckpt["weights"], torch.arange(1000.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_sigkill_during_write_leaves_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 0}, path)
    writer = (
        "import sys, torch\n"
        "from chanzoo.callbacks import AtomicCheckpointIO\n"
        "big = {'w%d' % i: torch.randn(2**20) for i in range(64)}\n"  # 256 MiB takes a while to write
        f"AtomicCheckpointIO().save_checkpoint(big, {str(path)!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not list(tmp_path.glob(".last.ckpt.*.tmp")):
        time.sleep(0.01)
    writing = list(tmp_path.glob(".last.ckpt.*.tmp"))  # the writer got as far as its temporary file
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert writing, f"the writer never started writing (exit code {proc.returncode}): {stderr[-2000:]}"
    assert proc.returncode == -signal.SIGKILL, f"the writer ended by itself before the kill: {stderr[-2000:]}"
    assert torch.load(path, weights_only=True) == {"epoch": 0}


@pytest.mark.slow
def test_resume_last_through_train_py_picks_the_run_of_the_same_model_config(tmp_path):
    """Two runs of one network with different channel modules share runs/<run_name>/; resume=last continues the
    one whose model config is being built, and its last.ckpt ends at the new epoch and step."""
    tiny = ["data.subset=400", "data.batch_size=32", "test_after_fit=false", "trainer.enable_progress_bar=false"]
    se = run_entry("train.py", [*tiny, "trainer.max_epochs=1"], tmp_path)
    assert se.returncode == 0, se.stderr[-3000:]
    time.sleep(1.1)  # run folders are named by the second
    eca = run_entry("train.py", [*tiny, "trainer.max_epochs=1", "model.attn=eca"], tmp_path)
    assert eca.returncode == 0, eca.stderr[-3000:]
    run_dirs = sorted((tmp_path / "small_cnn_fashion_mnist").iterdir())
    assert len(run_dirs) == 2 and run_dirs[0].name[-6:] != run_dirs[1].name[-6:]  # the folder names differ by config
    se_last = run_dirs[0] / "checkpoints" / "last.ckpt"
    assert torch.load(se_last, map_location="cpu", weights_only=True)["chanzoo_model_cfg"]["attn"] == "se"

    resumed = run_entry("train.py", [*tiny, "trainer.max_epochs=2", "resume=last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {se_last}" in resumed.stdout + resumed.stderr
    [new_dir] = set((tmp_path / "small_cnn_fashion_mnist").iterdir()) - set(run_dirs)
    assert new_dir.name.endswith(run_dirs[0].name[-7:])
    last = torch.load(new_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] == 2 * ((400 - 80) // 32)

    other = run_entry("train.py", [*tiny, "trainer.max_epochs=2", "resume=last", "model.attn=psa_s"], tmp_path)
    assert other.returncode == 1
    assert "resume=last but no */checkpoints/last.ckpt of this model config" in other.stderr
    assert run_dirs[1].name in other.stderr and "Traceback" not in other.stderr
