"""Argument checks shared by SparseDConfig, the samplers, the demo task and the CLI: one
message format for bad input.

``name`` is whatever the caller's user typed: a parameter name (``steps``) from Python, a flag
(``--steps``) from the command line.
"""

from __future__ import annotations

import math

__all__ = ["check_float", "check_int", "check_number"]


def _bounds(minimum, maximum) -> str:
    return f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum`` (and <= ``maximum`` when given);
    else TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {_bounds(minimum, maximum)}, got {value}")
    return value


def check_float(name: str, value: object, minimum: float = 0.0, maximum: float | None = None) -> float:
    """``value`` as a float if it is a real number >= ``minimum`` (and <= ``maximum`` when
    given); NaN rejected."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    if not value >= minimum or (maximum is not None and not value <= maximum):  # also rejects NaN
        raise ValueError(f"{name} must be {_bounds(minimum, maximum)}, got {value!r}")
    return float(value)


def check_number(name: str, value: object, *, integer: bool = False) -> None:
    """TypeError unless ``value`` is an int (``integer``) or a finite real number; bool is refused
    (True as a ratio or a block size is always a bug)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        expected = "an int" if integer else "a float"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} ({value!r})")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
