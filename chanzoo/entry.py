"""What every chanzoo command line shares: one-line errors, close matches for mistyped keys, a writable run folder.

``hydra_entry(config_name, task)`` turns ``task(cfg)`` into a ``main()`` for ``train.py``, ``eval.py`` and the
``python -m chanzoo.*`` CLIs:

- an override of a key that the composed config lacks (``trainer.max_epoch=3``) ends the command before anything
  runs, with the closest keys of that config group;
- an error that names a bad input (``ValueError``, ``TypeError``, missing files, non-finite training, ...) ends the
  command with one line on stderr and exit status 1 instead of a traceback (``HYDRA_FULL_ERROR=1`` keeps the
  traceback);
- ``RunDirCheck`` (a Hydra callback, see ``configs/hydra/default.yaml``) refuses a run folder that cannot be created
  before any work starts.
"""
from __future__ import annotations

import difflib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from chanzoo.configs import CONFIG_DIR, INIT_ONLY_KEYS, config_hash

__all__ = [
    "INIT_ONLY_KEYS", "RunDirCheck", "check_writable_dir", "config_hash", "hydra_entry", "unknown_override_message",
]

# errors that name what the user got wrong; anything else is a bug and keeps its traceback
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, OSError)
def _lines_of_worker_error(err: BaseException) -> str:
    """The message of ``err``; for an error re-raised from a DataLoader worker, only its last line (the cause)."""
    text = str(err).strip()
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])
    if "Original Traceback" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
        return text.split(": ", 1)[1] if ": " in text else text
    return text


def _user_error_exit(err: BaseException) -> SystemExit:
    message = _lines_of_worker_error(err)
    return SystemExit(f"error: {message} ({type(err).__name__}; HYDRA_FULL_ERROR=1 shows the traceback)")


def _is_user_error(err: BaseException) -> bool:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return isinstance(err, (*USER_ERRORS, MisconfigurationException)) or type(err).__name__ == "NonFiniteError"


def unknown_override_message(cfg: DictConfig, key: str) -> Optional[str]:
    """``None`` when ``key`` (dotted) exists in ``cfg``; else a message naming the first missing part and the
    closest keys of its parent group."""
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return None  # a list index or a leaf: Hydra reports these itself
        if part in node.keys():  # keys(): `in` alone is False for a mandatory (???) value
            node = node._get_node(part)
            node = node if isinstance(node, DictConfig) else None
            if node is None and depth < len(parts) - 1:
                return None
            continue
        group = ".".join(parts[:depth]) or "the top level"
        choices = [str(k) for k in node.keys()]
        close = difflib.get_close_matches(part, choices, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join('.'.join([*parts[:depth], c]) for c in close)}?" if close else (
            f"keys of {group}: {', '.join(sorted(choices))}"
        )
        return (
            f"unknown config key {key!r}: {group} has no key {part!r}; {hint} "
            f"(prefix a new key with + to add it: +{key}=...)"
        )
    return None


def _check_overrides(config_name: str, overrides: Sequence[str]) -> None:
    """Compose the config once and stop with close matches if a plain ``key=value`` override names no key."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return  # a syntax error: Hydra's own message names it
    dotted = [
        o for o in parsed
        if o.type == OverrideType.CHANGE and o.package is None and "." in o.key_or_group
        and not o.key_or_group.startswith("hydra")
    ]
    if not dotted:
        return
    # the groups the overrides select, without the key changes: then every key of the run's config is present
    groups = [o.input_line for o in parsed if o.input_line not in {d.input_line for d in dotted}]
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=groups)
    except Exception:  # noqa: BLE001  (any failure here is reported by Hydra itself when it composes the run)
        return
    for override in dotted:
        message = unknown_override_message(cfg, override.key_or_group)
        if message is not None:
            raise SystemExit(f"error: {message}")


def hydra_entry(config_name: str, task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    """A ``main()`` that runs ``task`` under ``hydra.main`` with chanzoo's checks and one-line errors."""
    import hydra

    def guarded(cfg: DictConfig) -> Any:
        from hydra.errors import InstantiationException

        try:
            return task(cfg)
        except Exception as err:
            cause: BaseException = err
            while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
                cause = cause.__cause__  # hydra.utils.instantiate wraps the constructor's own error
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or not _is_user_error(cause):
                raise
            raise _user_error_exit(cause) from None

    wrapped = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)(guarded)

    def main() -> Any:
        _check_overrides(config_name, [a for a in sys.argv[1:] if not a.startswith("-")])
        if sys.argv[0] and not any(a.startswith("hydra.job.name=") for a in sys.argv[1:]):
            # the job (and its log file, <job>.log) is named after the script run (train.py -> train.log), not this
            # module, where hydra.main is applied
            sys.argv.append(f"hydra.job.name={Path(sys.argv[0]).stem}")
        return wrapped()

    main.__doc__ = task.__doc__
    return main


def check_writable_dir(path: str | Path, argument: str) -> None:
    """Raise ``ValueError`` naming ``argument`` unless a folder can be created (or written) at ``path``.

    Nothing is left behind: the nearest existing ancestor is probed with a temporary folder.
    """
    target = Path(path).expanduser().absolute()
    ancestor = target
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{argument}={str(path)!r} cannot be created: {ancestor} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".chanzoo-write-check-", dir=ancestor)
        os.rmdir(probe)
    except OSError as err:
        raise ValueError(f"{argument}={str(path)!r} is not writable: cannot create folders in {ancestor} "
                         f"({err.strerror})") from None


class RunDirCheck(Callback):
    """Hydra callback: refuse a run folder (``hydra.run.dir``) that cannot be created, before the job starts."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_writable_dir(config.hydra.run.dir, "hydra.run.dir")
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_writable_dir(config.hydra.sweep.dir, "hydra.sweep.dir")
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
