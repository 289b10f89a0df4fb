"""Argument checks shared by SparseDConfig, the samplers, the demo task and the CLI: one
message format for bad input.

``name`` is whatever the caller's user typed: a parameter name (``steps``) from Python, a flag
(``--steps``) from the command line.
"""

from __future__ import annotations

import math

__all__ = ["ArgumentTypeError", "ArgumentValueError", "check_float", "check_int", "check_number"]


class ArgumentValueError(ValueError):
    """A bad value for one argument, named in ``argument`` (the CLI maps it to its flag by this
    attribute, whatever the message says)."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


class ArgumentTypeError(TypeError):
    """A value of the wrong type for one argument, named in ``argument``."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


def _bounds(minimum, maximum) -> str:
    return f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum`` (and <= ``maximum`` when given);
    else TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(name, f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum or (maximum is not None and value > maximum):
        raise ArgumentValueError(name, f"{name} must be {_bounds(minimum, maximum)}, got {value}")
    return value


def check_float(name: str, value: object, minimum: float = 0.0, maximum: float | None = None) -> float:
    """``value`` as a float if it is a real number >= ``minimum`` (and <= ``maximum`` when
    given); NaN rejected."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(name, f"{name} must be a float, got {type(value).__name__} ({value!r})")
    if not value >= minimum or (maximum is not None and not value <= maximum):  # also rejects NaN
        raise ArgumentValueError(name, f"{name} must be {_bounds(minimum, maximum)}, got {value!r}")
    return float(value)


def check_number(name: str, value: object, *, integer: bool = False) -> None:
    """TypeError unless ``value`` is an int (``integer``) or a finite real number; bool is refused
    (True as a ratio or a block size is always a bug)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        expected = "an int" if integer else "a float"
        raise ArgumentTypeError(name, f"{name} must be {expected}, got {type(value).__name__} ({value!r})")
    if not integer and not math.isfinite(value):
        raise ArgumentValueError(name, f"{name} must be finite, got {value!r}")
