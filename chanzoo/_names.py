"""Helpers for the error policy of DESIGN.md: every unknown name comes back with close matches."""
from __future__ import annotations

import difflib
from typing import Iterable


def unknown_name_error(what: str, name: object, choices: Iterable[str]) -> ValueError:
    """Build the ValueError for an unknown ``what`` called ``name``, listing the closest allowed names."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(str(name), choices, n=5, cutoff=0.5)
    if close:
        hint = f"did you mean one of {close}?"
    elif len(choices) <= 30:
        hint = f"allowed: {choices}"
    else:
        hint = f"{len(choices)} names are allowed; list them with chanzoo.list_models() / list_channel_modules()"
    return ValueError(f"unknown {what} {name!r}: {hint}")
