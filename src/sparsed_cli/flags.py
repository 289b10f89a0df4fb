"""argparse ``type=`` callables for the ``sparsed`` flags: every value checked as it is parsed.

Each check knows its flag (``_Parser.add_argument`` binds it with `FlagType.named`) and fails
with one line naming the flag, what was expected and what was received, e.g. ``--repeats must
be >= 1, got 0``. A value that is not a number at all keeps argparse's own wording (``argument
--prompts: invalid int value: 'x'``). Only what the flag alone decides is checked here, without
torch; rules that need the model (``--layer``, ``--length`` of the demo) or belong to the
library (``SparseDConfig``'s ``--skip`` / ``--select`` / ``--block-size``) are checked by
`sparsed_backend.cli` and the library, whose errors reach the user through
`sparsed_backend.cli.LIBRARY_FLAGS`.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from pathlib import Path

__all__ = ["BlockSize", "DeviceName", "FlagType", "Float", "GridOffset", "Int", "ModelDir", "PngOut"]


class FlagType:
    """Base of the checks: ``self.flag`` names the flag in messages once `named` bound it."""

    __name__ = "value"  # argparse's "invalid <name> value" for input that does not parse at all
    flag = "the value"

    def named(self, flag: str) -> FlagType:
        """A copy of this check that names ``flag`` in its messages."""
        bound = copy.copy(self)
        bound.flag = flag
        return bound

    def fail(self, expected: str, got: str, verb: str = "be") -> argparse.ArgumentError:
        """The error to raise: "<flag> must <verb> <expected>, got <got>"."""
        # ArgumentError without an action: argparse prints the message as it is (no "argument
        # --flag:" prefix, the message names the flag itself), as one line, exit status 2.
        return argparse.ArgumentError(None, f"{self.flag} must {verb} {expected}, got {got}")

    def __call__(self, text: str):
        raise NotImplementedError


def _bounds(low, high, open_low: bool = False) -> str:
    if high is None:
        return f"> {low}" if open_low else f">= {low}"
    if low is None:
        return f"<= {high}"
    return f"in {'(' if open_low else '['}{low}, {high}]"


class Int(FlagType):
    """An int in [minimum, maximum] (either bound may be None)."""

    __name__ = "int"

    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum

    def __call__(self, text: str) -> int:
        value = int(text)  # ValueError: argparse's "invalid int value: 'x'"
        low, high = self.minimum, self.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            raise self.fail(_bounds(low, high), str(value))
        return value


class Float(FlagType):
    """A finite float >= minimum (> minimum when ``open_low``) and <= maximum (when given)."""

    __name__ = "float"

    def __init__(self, minimum: float, maximum: float | None = None, *, open_low: bool = False) -> None:
        self.minimum, self.maximum, self.open_low = minimum, maximum, open_low

    def __call__(self, text: str) -> float:
        value = float(text)  # ValueError: argparse's "invalid float value: 'x'"
        low_ok = value > self.minimum if self.open_low else value >= self.minimum  # False for NaN
        if not (low_ok and math.isfinite(value) and (self.maximum is None or value <= self.maximum)):
            raise self.fail(_bounds(self.minimum, self.maximum, self.open_low), repr(value))
        return value


class GridOffset(FlagType):
    """--prompt-end-offset: none (the paper's grid), middle, or an int (SparseDConfig checks its range)."""

    def __call__(self, text: str) -> int | str | None:
        if text.lower() in ("none", "middle"):
            return None if text.lower() == "none" else "middle"
        try:
            return int(text)
        except ValueError:
            raise self.fail("none, middle or an int", repr(text)) from None


class BlockSize(FlagType):
    """--block-size: auto (chosen per sequence length) or an int (SparseDConfig checks it)."""

    def __call__(self, text: str) -> int | str:
        if text.lower() == "auto":
            return "auto"
        try:
            return int(text)
        except ValueError:
            raise self.fail("auto or an int", repr(text)) from None


class DeviceName(FlagType):
    """auto, cpu, cuda or cuda:N, as text; whether that CUDA device exists is checked with torch later."""

    def __call__(self, text: str) -> str:
        kind, _, index = text.partition(":")
        if text in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit()):
            return text
        raise self.fail("auto, cpu, cuda or cuda:N", repr(text))


class ModelDir(FlagType):
    """An existing directory holding config.json."""

    def __call__(self, text: str) -> Path:
        path = Path(text).expanduser()
        expected = "a model directory holding config.json"
        if not path.exists():
            raise self.fail(expected, f"{text} (no such directory)")
        if not path.is_dir():
            raise self.fail(expected, f"{text} (a file)")
        if not (path / "config.json").is_file():
            raise self.fail(expected, f"{text} (no config.json in it)")
        return path


class PngOut(FlagType):
    """A .png file path in an existing directory (checked before a run, not by matplotlib after it)."""

    def __call__(self, text: str) -> Path:
        path = Path(text).expanduser()
        if not path.parent.is_dir():
            raise self.fail("a file path in an existing directory", f"{text} (no such directory)")
        if path.suffix.lower() != ".png":
            raise self.fail("a .png file", text, verb="name")
        if path.is_dir() or (path.exists() and not os.access(path, os.W_OK)):
            raise self.fail("a writable .png file", f"{text} (a directory or read-only)", verb="name")
        return path
