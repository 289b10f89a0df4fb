"""Argument checks shared by SparseDConfig, the samplers and the demo task: one message format
for bad input."""

from __future__ import annotations

import math

__all__ = ["check_float", "check_int", "check_number"]


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``; else TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_float(name: str, value: object, minimum: float = 0.0) -> float:
    """``value`` as a float if it is a real number >= ``minimum`` (NaN rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    if not value >= minimum:  # also rejects NaN
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
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
