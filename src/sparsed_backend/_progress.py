"""Progress bars for long work (the CLI commands, the fidelity benchmark): tqdm on stderr.

A bar shows only when stderr is a terminal, so piped or captured output never holds one, and
never when the caller passes ``enabled=False`` (the ``--no-progress`` flags) or the environment
sets ``SPARSED_NO_PROGRESS`` to anything but "" or "0". Results go to stdout, untouched.
"""

from __future__ import annotations

import os
import sys

__all__ = ["progress", "progress_wanted"]


def progress_wanted(enabled: bool = True) -> bool:
    """Whether bars would show now: asked for, not turned off by the environment, stderr a terminal."""
    if not enabled or os.environ.get("SPARSED_NO_PROGRESS", "") not in ("", "0"):
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress(total: int, desc: str, unit: str, enabled: bool = True):
    """A tqdm bar of ``total`` units on the current ``sys.stderr`` (use as a context manager)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress_wanted(enabled), leave=False)
