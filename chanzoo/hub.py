"""Pretrained weights: local files, verified downloads and converters for official checkpoints.

chanzoo keeps timm's ``pretrained_cfg`` machinery underneath: timm's ``load_pretrained`` still applies the family's
``checkpoint_filter_fn``, drops the classifier when ``num_classes`` differs, adapts the first conv when ``in_chans``
differs and logs the keys it did not load. This module decides *which local file* timm reads:

* ``pretrained_file=<path>`` (``pretrained_file_overlay``): a ``.safetensors`` file, or a torch file that
  ``torch.load(weights_only=True)`` can read. A pickle that needs anything beyond tensors and plain containers is
  refused with a ``ValueError`` before timm sees it; nothing in it runs.
* ``pretrained=True`` (``resolve_pretrained_overlay``): the model's cfg names ``hf_hub_id`` (fetched with
  huggingface_hub into its usual cache) or ``url`` (fetched by ``download`` into ``cache_dir()``). Every network
  operation has a timeout (``CHANZOO_HUB_TIMEOUT``, default 10 s) and no retries, so an offline machine without a
  cached file fails in seconds with an error naming the source and how to pass a local file instead.

Interface for model families
----------------------------
A family declares its weights with ``chanzoo.hub.generate_default_cfgs`` in place of timm's, using timm's cfg
fields plus one of chanzoo's::

    default_cfgs = generate_default_cfgs({
        'rgt_s.x2_df2k': _cfg(
            url='https://.../RGT_S_x2.pth',          # or hf_hub_id='org/repo' (+ hf_hub_filename=...)
            sha256='9f86d081884c7d65...',           # hex digest of the file; verified after download
            license='apache-2.0',                   # licence of the weights, shown in docs/models.md
            origin_url='https://github.com/...',    # where the weights were published
        ),
    })

``sha256`` is removed before timm builds its ``PretrainedCfg`` and kept here (``weights_sha256('arch.tag')``).
A download whose digest differs raises ``ChecksumMismatchError`` and the file is deleted. Downloads are written to
a hidden temporary file in the cache folder (``chanzoo.io.atomic_open``) and renamed into place only once complete
and verified, so an interrupted download leaves nothing a later run would trust. A file already at its final cache
path was verified when it was written and is used without a network request.

Converters (timm's ``checkpoint_filter_fn(state_dict, model)`` convention) for official releases:

* DaViT (dingmyu/davit, ``DaViT_tiny`` ...): timm's own ``timm.models.davit.checkpoint_filter_fn`` maps the official
  keys exactly and timm's DaViT builder applies it, so chanzoo adds nothing.
* InceptionNeXt (sail-sg/inceptionnext, ``inceptionnext_tiny.pth`` ...): the official keys equal timm's.
* ECA-Net ResNets (BangguWu/ECANet, ``eca_resnet50_k3557.pth.tar``): ``ecanet_checkpoint_filter_fn``, applied to every
  timm ResNet through ``checkpoint_filter_for('resnet')``; load into ``resnet50`` with ``attn='eca'`` and the
  release's kernel sizes per stage.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import pickle
import pickletools
import re
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import timm.models
import torch
from timm.models._helpers import clean_state_dict
from timm.models._hub import hf_split

from chanzoo.io import atomic_open

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
CheckpointFilter = Callable[[dict[str, Any], torch.nn.Module], dict[str, Any]]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors",) + TORCH_SUFFIXES
HF_DEFAULT_FILENAMES = ("model.safetensors", "pytorch_model.bin")
_CHUNK = 1 << 20
_SHA256: dict[str, str] = {}
_LOCAL_FILE_HINT = (
    "pass a local copy instead: model.pretrained_file=<path> in a config / on the command line, "
    "or chanzoo.create_model(..., pretrained_file=<path>)"
)


class DownloadError(OSError):
    """Pretrained weights could not be fetched (no network, timeout, connection cut off, HTTP error)."""


class ChecksumMismatchError(DownloadError):
    """A downloaded file's sha256 differs from the one its model cfg declares; the file has been deleted."""


def hub_timeout() -> float:
    """Seconds any single network operation may take (``CHANZOO_HUB_TIMEOUT``, default 10)."""
    value = os.environ.get("CHANZOO_HUB_TIMEOUT", "10")
    try:
        timeout = float(value)
    except ValueError:
        raise ValueError(f"CHANZOO_HUB_TIMEOUT must be a number of seconds, got {value!r}") from None
    if timeout <= 0:
        raise ValueError(f"CHANZOO_HUB_TIMEOUT must be positive, got {value!r}")
    return timeout


def cache_dir() -> Path:
    """Folder for weights fetched by URL: ``CHANZOO_CACHE``, else ``<torch hub dir>/chanzoo``."""
    return Path(os.environ.get("CHANZOO_CACHE") or Path(torch.hub.get_dir()) / "chanzoo")


# ---------------------------------------------------------------------------------------------------- cfg registry
def generate_default_cfgs(cfgs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """timm's ``generate_default_cfgs`` that also accepts a ``sha256`` entry per cfg (see the module docstring)."""
    plain = {}
    for name, cfg in cfgs.items():
        cfg = dict(cfg)
        digest = cfg.pop("sha256", None)
        if digest is not None:
            register_weights_sha256(name.rstrip("*"), digest)
        plain[name] = cfg
    return timm.models.generate_default_cfgs(plain)


def register_weights_sha256(model_name: str, sha256: str) -> None:
    """Declare the sha256 of the weights of ``model_name`` ('arch.tag')."""
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"sha256 for {model_name!r} must be 64 hex digits, got {sha256!r}")
    _SHA256[model_name] = sha256.lower()


def weights_sha256(model_name: str) -> Optional[str]:
    """The declared sha256 of the weights of ``model_name`` ('arch' uses its default tag), or ``None``."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is not None and cfg.tag is not None:
        arch = timm.models.get_arch_name(model_name)
        return _SHA256.get(f"{arch}.{cfg.tag}") or _SHA256.get(model_name)
    return _SHA256.get(model_name)


# ------------------------------------------------------------------------------------------------------ local files
def _unsafe_pickle_globals(path: Path) -> list[str]:
    """Globals a torch checkpoint's pickle needs beyond what ``torch.load(weights_only=True)`` allows (none run)."""
    if zipfile.is_zipfile(path):
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        return [name for name in found if name != "argparse.Namespace"]
    try:  # legacy (pre-zip) format or a bare pickle: the restricted unpickler reads it without running anything
        with torch.serialization.safe_globals([argparse.Namespace]):
            torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = _pickle_globals(path) or re.findall(r"GLOBAL ([\w.]+)", str(err))
        if not names:
            raise _NotTorchFile(str(err).splitlines()[0]) from None
        return names
    except Exception as err:  # noqa: BLE001  (torch raises KeyError, EOFError, RuntimeError, ... on foreign bytes)
        raise _NotTorchFile(f"{type(err).__name__}: {err}") from None
    return []


class _NotTorchFile(Exception):
    """A file with a torch suffix that ``torch.load`` cannot read at all."""


def _pickle_globals(path: Path) -> list[str]:
    """The names a plain pickle file would import, read with ``pickletools`` (nothing is executed)."""
    names, strings = [], []
    try:
        with open(path, "rb") as handle:
            for opcode, arg, _ in pickletools.genops(handle):
                if opcode.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
    except (ValueError, EOFError, pickle.UnpicklingError):  # not a plain pickle: the caller reports torch's error
        return []
    return sorted(set(names))


def check_weights_file(path: PathLike, argument: str = "pretrained_file") -> Path:
    """Validate a local weights file: it exists, has a known suffix and loads without arbitrary unpickling."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument} must be a path (str or os.PathLike), got {type(path).__name__}: {path!r}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"{argument}={str(path)!r} is not a file")
    if not file.name.lower().endswith(WEIGHT_SUFFIXES):
        raise ValueError(f"{argument}={str(path)!r} has an unsupported suffix; allowed: {list(WEIGHT_SUFFIXES)}")
    if file.name.lower().endswith(TORCH_SUFFIXES):
        try:
            unsafe = _unsafe_pickle_globals(file)
        except _NotTorchFile as err:
            raise ValueError(
                f"{argument}={str(path)!r} is not a torch weights file (torch.load failed: {err})"
            ) from None
        if unsafe:
            raise ValueError(
                f"{argument}={str(path)!r} is refused: loading it needs arbitrary unpickling ({', '.join(unsafe)}), "
                "which could run code. Only checkpoints readable with torch.load(weights_only=True) are loaded; "
                "re-save the state dict (torch.save(model.state_dict(), ...)) or convert it to .safetensors"
            )
    return file


def pretrained_file_overlay(path: PathLike, overlay: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A timm ``pretrained_cfg_overlay`` that makes timm load ``path`` (checked by ``check_weights_file``)."""
    file = check_weights_file(path)
    return {**(overlay or {}), "file": str(file)}


# ------------------------------------------------------------------------------------------------------- downloads
def sha256_of(path: PathLike) -> str:
    """Hex sha256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    url: str,
    sha256: Optional[str] = None,
    folder: Optional[PathLike] = None,
    timeout: Optional[float] = None,
    filename: Optional[str] = None,
) -> Path:
    """Fetch ``url`` into ``folder`` (default ``cache_dir()``) once, verified, and return the local path.

    A file already at the final path is returned without a request. Otherwise the body is streamed into a hidden
    temporary file beside it, checked against the Content-Length and ``sha256``, and renamed into place; any failure
    deletes the temporary file. ``timeout`` bounds each connect/read (default ``hub_timeout()``).
    """
    folder = Path(folder) if folder is not None else cache_dir()
    name = filename or Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise ValueError(f"url {url!r} names no file; pass filename=")
    target = folder / name
    if target.is_file():
        _logger.info("using cached weights %s", target)
        return target
    timeout = hub_timeout() if timeout is None else timeout
    try:  # atomic_open removes its temporary file on any error, KeyboardInterrupt included
        digest, size = hashlib.sha256(), 0
        request = urllib.request.Request(url, headers={"User-Agent": "chanzoo"})
        _logger.info("downloading %s to %s", url, target)
        with atomic_open(target, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            expected = response.headers.get("Content-Length")
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            if expected is not None and size != int(expected):
                raise DownloadError(f"download of {url} was cut off: got {size} of {expected} bytes")
            if sha256 is not None and digest.hexdigest() != sha256.lower():
                raise ChecksumMismatchError(
                    f"sha256 of {url} is {digest.hexdigest()}, expected {sha256.lower()}; the file was deleted"
                )
    except DownloadError:
        raise
    except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, refused/reset connections, IncompleteRead
        raise DownloadError(f"could not download {url} ({type(err).__name__}: {err}); {_LOCAL_FILE_HINT}") from err
    return target


def _discard_hf_file(path: Path) -> None:
    """Delete a file from the huggingface_hub cache: the snapshot link and the blob it points to."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def hf_download(
    hf_hub_id: str,
    filename: Optional[str] = None,
    sha256: Optional[str] = None,
    folder: Optional[PathLike] = None,
    timeout: Optional[float] = None,
) -> Path:
    """Fetch a weights file of the Hugging Face Hub repo ``hf_hub_id`` ('org/name' or 'org/name@revision').

    Looks in the huggingface_hub cache first (no request); otherwise asks the Hub once per candidate file name
    (``filename``, or model.safetensors then pytorch_model.bin, as timm does), without retries and with ``timeout``
    per operation, and downloads with huggingface_hub (which writes a ``.incomplete`` file and renames it when done).
    A declared ``sha256`` is checked on every use; a mismatching file is removed from the cache.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    repo_id, revision = hf_split(hf_hub_id)
    candidates = (filename,) if filename else HF_DEFAULT_FILENAMES
    timeout = hub_timeout() if timeout is None else timeout
    cached = (try_to_load_from_cache(repo_id, name, cache_dir=folder, revision=revision) for name in candidates)
    path = next((Path(p) for p in cached if isinstance(p, str)), None)
    if path is None:
        for name in candidates:
            try:
                get_hf_file_metadata(hf_hub_url(repo_id, name, revision=revision), timeout=timeout)
            except EntryNotFoundError:
                continue
            except Exception as err:  # connection refused, DNS failure, timeout, HTTP error: fail now, no retries
                raise DownloadError(
                    f"could not reach the Hugging Face Hub for {hf_hub_id!r} ({type(err).__name__}: {err}) and no "
                    f"cached copy exists; {_LOCAL_FILE_HINT}"
                ) from err
            try:
                path = Path(
                    hf_hub_download(repo_id, name, revision=revision, cache_dir=folder, etag_timeout=timeout)
                )
            except Exception as err:
                raise DownloadError(
                    f"could not download {name} of {hf_hub_id!r} ({type(err).__name__}: {err}); {_LOCAL_FILE_HINT}"
                ) from err
            break
        else:
            raise DownloadError(f"{hf_hub_id!r} holds none of {list(candidates)}; {_LOCAL_FILE_HINT}")
    if sha256 is not None:
        actual = sha256_of(path)
        if actual != sha256.lower():
            _discard_hf_file(path)
            raise ChecksumMismatchError(
                f"sha256 of {path.name} from {hf_hub_id!r} is {actual}, expected {sha256.lower()}; the file was deleted"
            )
    return path


def resolve_pretrained_overlay(
    model_name: str, overlay: Optional[dict[str, Any]] = None, folder: Optional[PathLike] = None
) -> dict[str, Any]:
    """The ``pretrained_cfg_overlay`` that points timm at a local, verified copy of ``model_name``'s weights.

    Cfgs that already name a local ``file`` or an in-memory ``state_dict`` are returned unchanged.
    """
    overlay = dict(overlay or {})
    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    cfg = {**(pretrained_cfg.to_dict() if pretrained_cfg is not None else {}), **overlay}
    if cfg.get("file") or cfg.get("state_dict") is not None:
        return overlay
    sha256 = weights_sha256(model_name)
    if cfg.get("hf_hub_id"):
        path = hf_download(cfg["hf_hub_id"], cfg.get("hf_hub_filename"), sha256, folder)
    elif isinstance(cfg.get("url"), str) and cfg["url"]:
        path = download(cfg["url"], sha256, folder)
    else:
        raise ValueError(
            f"model {model_name!r} has no pretrained weights to download (names with weights: "
            f"timm.list_models(pretrained=True)); {_LOCAL_FILE_HINT}"
        )
    return {**overlay, "file": str(path)}


# ------------------------------------------------------------------------------------------------------ converters
_ECA_KEY = re.compile(r"^(layer\d+\.\d+)\.eca\.")


def ecanet_checkpoint_filter_fn(state_dict: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """Map an official ECA-Net ResNet checkpoint (Wang et al., CVPR 2020; BangguWu/ECANet) onto a timm ResNet.

    The release stores ``{'state_dict': ...}`` saved from ``nn.DataParallel`` (keys prefixed ``module.``) with the
    ECA layer of each block at ``layerX.Y.eca``; timm's ResNet blocks hold their attention module at ``layerX.Y.se``.
    Other ResNet checkpoints pass through unchanged. The model must carry ECA with the release's kernel sizes
    (e.g. 3, 5, 5, 7 per stage for ``eca_resnet50_k3557``); a kernel mismatch raises ``ValueError``.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    state_dict = clean_state_dict(state_dict)
    if not any(_ECA_KEY.match(k) for k in state_dict):
        return state_dict
    model_sd = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        key = _ECA_KEY.sub(r"\1.se.", key)
        expected = model_sd.get(key)
        if ".se." in key and expected is not None and expected.shape != value.shape:
            raise ValueError(
                f"ECA-Net checkpoint has {key} of shape {tuple(value.shape)} (kernel {value.shape[-1]}) but the model "
                f"has {tuple(expected.shape)}; build the ResNet with attn='eca' and the checkpoint's kernel size for "
                "this stage (the release's file name lists them, e.g. k3557 = 3, 5, 5, 7 for layer1..layer4)"
            )
        out[key] = value
    return out


_CHECKPOINT_FILTERS: dict[str, CheckpointFilter] = {"resnet": ecanet_checkpoint_filter_fn}


def checkpoint_filter_for(timm_module: str) -> Optional[CheckpointFilter]:
    """The converter chanzoo adds for ``timm_module`` (e.g. 'resnet'), or ``None``."""
    return _CHECKPOINT_FILTERS.get(timm_module)


# ------------------------------------------------------------------------------------------------ load reports
def read_state_dict(path: PathLike, argument: str = "pretrained_file") -> dict[str, torch.Tensor]:
    """The tensors of a weights file (unwrapping ``state_dict``/``model``/``state_dict_ema`` as timm does); a file
    that is not a torch or safetensors file is a ``ValueError`` naming it."""
    file = check_weights_file(path, argument)
    try:
        state_dict = timm.models.load_state_dict(str(file), use_ema=True, weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch and safetensors raise many types for a foreign file)
        raise ValueError(
            f"{argument}={str(path)!r} is not a torch or safetensors weights file ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{argument}={str(path)!r} holds a {type(state_dict).__name__}, not a dict of tensors")
    return state_dict


def report_loaded(model: torch.nn.Module, path: PathLike, argument: str = "pretrained_file") -> tuple[int, int]:
    """Count the tensors of ``path`` that match ``model`` by name and shape (after the family's converter) and log
    "loaded X of Y tensors"; returns (X, Y). No match outside the classifier is a ``ValueError``: timm loads a file
    non-strictly when the classifier is re-initialised, so weights of another architecture would otherwise load
    nothing without a word."""
    state_dict = read_state_dict(path, argument)
    module = type(model).__module__.rsplit(".", 1)[-1]
    filter_fn = checkpoint_filter_for(module) or getattr(
        __import__("sys").modules.get(type(model).__module__), "checkpoint_filter_fn", None
    )
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except (KeyError, RuntimeError, ValueError, IndexError, AttributeError):
            pass  # the converter does not apply: count the file as it is
    expected = model.state_dict()
    matched = [k for k, v in state_dict.items() if k in expected and tuple(expected[k].shape) == tuple(v.shape)]
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ""
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    backbone = [k for k in matched if not any(c and k.startswith(c + ".") for c in classifiers)]
    _logger.info("loaded %d of %d tensors of %s from %s", len(matched), len(expected), type(model).__name__, path)
    if not backbone:
        example = next(iter(state_dict), "none")
        raise ValueError(
            f"{argument}={str(path)!r} does not fit {type(model).__name__}: none of its {len(state_dict)} tensors "
            f"(e.g. {example!r}) matches a backbone tensor of the model by name and shape (e.g. "
            f"{next(iter(expected), 'none')!r}); give weights of this architecture"
        )
    return len(matched), len(expected)
