"""Atomic file writes: a reader (or a process killed mid-write) sees the old file or the new one, never a torn one.

Every writer here stages the bytes in a hidden temporary file in the target's own folder (``.<name>.<random>.tmp``,
so the final rename never crosses filesystems), flushes and fsyncs it, then renames it over the target with
``os.replace``. On any failure, including ``KeyboardInterrupt``, the temporary file is removed. The new file's
mode follows the process umask, like a file opened with ``open(path, 'w')`` (``tempfile.mkstemp`` would make it
0600).

Temporary files that a hard kill (SIGKILL, power loss) leaves behind match ``TEMP_GLOB`` in the target's folder.
"""
from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Union

PathLike = Union[str, os.PathLike]
TEMP_SUFFIX = ".tmp"
TEMP_GLOB = f".*{TEMP_SUFFIX}"


def temp_path_for(path: PathLike) -> Path:
    """A fresh hidden temporary path beside ``path`` (``.<name>.<random hex>.tmp``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


@contextmanager
def atomic_open(path: PathLike, mode: str = "wb", encoding: str | None = None, newline: str | None = None
                ) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` when the ``with`` block ends without an error.

    Args:
        path: the final file; its folder is created if missing.
        mode: 'wb' or 'w' (text, ``encoding`` defaults to UTF-8).
        encoding: text encoding for mode 'w'.
        newline: passed to ``open`` for mode 'w' (``''`` for the csv module).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    # os.open with 0o666 lets the kernel apply the umask, as open() would for a new file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        if mode == "wb":
            handle = os.fdopen(fd, "wb")
        else:
            handle = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline=newline)
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_open(path, "w", encoding=encoding) as handle:
        handle.write(text)
    return Path(path)


def write_json_atomic(path: PathLike, payload: Any, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically; returns ``path``."""
    return write_text_atomic(path, json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n")


def torch_save_atomic(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)`` atomically; returns ``path``."""
    import torch

    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)
    return Path(path)
