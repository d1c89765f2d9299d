"""chanzoo.hub: local weight files, verified downloads (against a local HTTP server) and refusal of unsafe pickles."""
from __future__ import annotations

import hashlib
import http.server
import logging
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from skimage import data as skdata

import chanzoo
from chanzoo import hub


# ------------------------------------------------------------------------------------------------ local HTTP server
class _Server:
    """A 127.0.0.1 server for one payload; ``mode`` is 'ok', 'cut' (closes mid-body) or 'hang' (never answers)."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.mode, self.requests = payload, "ok", []
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body: bool) -> None:
                outer.requests.append((self.command, self.path))
                if outer.mode == "hang":
                    outer.release.wait(30)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()
                if body:
                    self.wfile.write(outer.payload[: len(outer.payload) // 2] if outer.mode == "cut" else outer.payload)
                    self.wfile.flush()
                if outer.mode == "cut":
                    self.close_connection = True

            def do_GET(self) -> None:  # noqa: N802
                self._answer(body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(body=False)

            def log_message(self, *args: object) -> None:
                """Keep the test output free of the server's per-request log lines."""

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def small_weights(tmp_path: Path) -> tuple[bytes, torch.nn.Module]:
    """A real small_cnn state dict saved as torch bytes (what a weights server would hold)."""
    torch.manual_seed(0)
    model = chanzoo.create_model("small_cnn", num_classes=10, in_chans=1, attn="se").eval()
    path = tmp_path / "source" / "src.pth"
    path.parent.mkdir()
    torch.save(model.state_dict(), path)
    return path.read_bytes(), model


@pytest.fixture
def server(small_weights: tuple[bytes, torch.nn.Module]):
    srv = _Server(small_weights[0])
    yield srv
    srv.close()


def _sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _digit_batch() -> torch.Tensor:
    """Four real 8x8 handwritten digits (sklearn), upsampled to 28x28 like Fashion-MNIST."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:4], dtype=torch.float32).unsqueeze(1) / 16.0
    return torch.nn.functional.interpolate(images, size=28, mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------------------- downloads
def test_download_then_cache_hit_without_request(server: _Server, tmp_path: Path) -> None:
    url = f"{server.url}/weights/small.pth"
    path = hub.download(url, sha256=_sha(server.payload), folder=tmp_path / "cache", timeout=5)
    assert path.read_bytes() == server.payload
    assert len(server.requests) == 1
    again = hub.download(url, sha256=_sha(server.payload), folder=tmp_path / "cache", timeout=5)
    assert again == path and len(server.requests) == 1  # served from the cache: no second request
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["small.pth"]  # no temporary file left


def test_sha256_mismatch_raises_and_leaves_nothing(server: _Server, tmp_path: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(hub.ChecksumMismatchError, match=wrong):
        hub.download(f"{server.url}/small.pth", sha256=wrong, folder=tmp_path / "cache", timeout=5)
    assert list((tmp_path / "cache").iterdir()) == []


def test_connection_cut_mid_file_leaves_no_trusted_file(server: _Server, tmp_path: Path) -> None:
    server.mode = "cut"
    with pytest.raises(hub.DownloadError, match="small.pth"):
        hub.download(f"{server.url}/small.pth", folder=tmp_path / "cache", timeout=5)
    assert list((tmp_path / "cache").iterdir()) == []
    server.mode = "ok"  # the next run downloads afresh instead of trusting a partial file
    path = hub.download(f"{server.url}/small.pth", sha256=_sha(server.payload), folder=tmp_path / "cache", timeout=5)
    assert path.read_bytes() == server.payload and len(server.requests) == 2


def test_server_that_never_answers_times_out(server: _Server, tmp_path: Path) -> None:
    server.mode = "hang"
    start = time.monotonic()
    with pytest.raises(hub.DownloadError, match="pretrained_file"):
        hub.download(f"{server.url}/small.pth", folder=tmp_path / "cache", timeout=1)
    assert time.monotonic() - start < 10
    assert list((tmp_path / "cache").iterdir()) == []


def test_pretrained_true_downloads_verifies_and_loads(
    server: _Server, small_weights: tuple[bytes, torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """create_model(pretrained=True) on a cfg whose url and sha256 point at the local server."""
    payload, reference = small_weights
    monkeypatch.setenv("CHANZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(hub._SHA256, "small_cnn", _sha(payload))
    overlay = {"url": f"{server.url}/small_cnn.pth", "hf_hub_id": None}
    kwargs = dict(num_classes=10, in_chans=1, attn="se", pretrained_cfg_overlay=overlay)
    model = chanzoo.create_model("small_cnn", pretrained=True, **kwargs).eval()
    x = _digit_batch()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    chanzoo.create_model("small_cnn", pretrained=True, **kwargs)
    assert len(server.requests) == 1

    monkeypatch.setitem(hub._SHA256, "small_cnn", "f" * 64)
    overlay["url"] = f"{server.url}/other_name.pth"
    with pytest.raises(hub.ChecksumMismatchError):
        chanzoo.create_model("small_cnn", pretrained=True, **kwargs)
    assert not (tmp_path / "cache" / "other_name.pth").exists()


def test_offline_hub_fails_fast_naming_hub_id_and_local_file(
    server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No reachable hub and no cached copy: an error within 30 s naming the hub id and model.pretrained_file."""
    from huggingface_hub import constants

    server.mode = "hang"
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("CHANZOO_HUB_TIMEOUT", "2")
    start = time.monotonic()
    with pytest.raises(hub.DownloadError) as info:
        chanzoo.create_model("davit_tiny", pretrained=True)
    assert time.monotonic() - start < 30
    assert "timm/davit_tiny.msft_in1k" in str(info.value) and "model.pretrained_file" in str(info.value)
    weight_requests = [r for r in server.requests if "davit_tiny" in r[1]]
    assert len(weight_requests) == 1  # one attempt, no retries (huggingface_hub may also make its own API calls)


def test_model_without_weights_names_it() -> None:
    with pytest.raises(ValueError, match="'small_cnn' has no pretrained weights"):
        chanzoo.create_model("small_cnn", pretrained=True)


def test_sha256_declared_through_generate_default_cfgs() -> None:
    digest = _sha(b"weights")
    cfgs = hub.generate_default_cfgs({"zz_hub_probe.test": {"url": "http://127.0.0.1/x.pth", "sha256": digest}})
    assert "sha256" not in vars(cfgs["zz_hub_probe"].cfgs["test"])
    assert hub._SHA256.pop("zz_hub_probe.test") == digest
    with pytest.raises(ValueError, match="'abc'"):
        hub.generate_default_cfgs({"zz_hub_probe.bad": {"url": "http://127.0.0.1/x.pth", "sha256": "abc"}})


# ----------------------------------------------------------------------------------------------------- local files
@pytest.fixture
def inext() -> torch.nn.Module:
    torch.manual_seed(0)
    return chanzoo.create_model("inception_next_atto").eval()


def _photo_batch() -> torch.Tensor:
    """Two real photographs (astronaut, coffee) at 64x64, ImageNet-normalised."""
    from skimage.transform import resize

    images = [resize(img(), (64, 64), anti_aliasing=True) for img in (skdata.astronaut, skdata.coffee)]
    x = torch.tensor(np.stack(images), dtype=torch.float32).permute(0, 3, 1, 2)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_checkpoint_loads_through_pretrained_file(inext: torch.nn.Module, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"inext{suffix}"
    state = {k: v.contiguous() for k, v in inext.state_dict().items()}
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    loaded = chanzoo.create_model("inception_next_atto", pretrained_file=str(path)).eval()
    x = _photo_batch()
    with torch.no_grad():
        assert torch.equal(loaded(x), inext(x))


def test_fine_tuning_resets_head_adapts_stem_and_logs_keys(
    inext: torch.nn.Module, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "inext.pth"
    torch.save(inext.state_dict(), path)
    with caplog.at_level(logging.INFO):
        model = chanzoo.create_model("inception_next_atto", pretrained_file=str(path), num_classes=7, in_chans=1)
    assert "head.fc2.weight" in caplog.text and "head.fc2.bias" in caplog.text  # the log names keys not loaded
    assert model.head.fc2.weight.shape == (7, model.head.fc2.in_features)
    assert torch.equal(model.head.fc1.weight, inext.head.fc1.weight)
    # timm's single-channel adaptation sums the RGB filters of the first conv
    assert torch.allclose(model.stem[0].weight, inext.stem[0].weight.sum(1, keepdim=True))


def test_checkpoint_that_does_not_fit_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "small_cnn.pth"
    torch.save(chanzoo.create_model("small_cnn", num_classes=10, in_chans=1).state_dict(), path)
    with pytest.raises(ValueError, match="small_cnn.pth"):
        chanzoo.create_model("inception_next_atto", pretrained_file=str(path))


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("/no/such/weights.pth", ValueError, "'/no/such/weights.pth' is not a file"),
        (3, TypeError, "pretrained_file must be a path"),
    ],
)
def test_bad_pretrained_file_values(value: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        chanzoo.create_model("small_cnn", pretrained_file=value)


def test_unknown_suffix_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported suffix"):
        chanzoo.create_model("small_cnn", pretrained_file=str(path))


class _Payload:
    """Unpickling this object creates ``marker``: the code-running pickle a weights file must never be."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save", "torch.save legacy"])
def test_code_running_pickle_is_refused_and_does_not_run(tmp_path: Path, writer: str) -> None:
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()  # the payload is live: plain unpickling runs it

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    checkpoint = {"state_dict": {"w": torch.zeros(1)}, "payload": _Payload(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(checkpoint))
    else:
        torch.save(checkpoint, path, _use_new_zipfile_serialization=writer == "torch.save")
    with pytest.raises(ValueError, match="refused") as info:
        chanzoo.create_model("small_cnn", pretrained_file=str(path))
    assert "evil.pth" in str(info.value) and "weights_only" in str(info.value)
    assert "open" in str(info.value)  # names what the pickle would have imported
    assert not marker.exists()
