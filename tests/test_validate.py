"""The shared argument checks (`sparsed_backend._validate`)."""

from __future__ import annotations

import math

import pytest

from sparsed_backend._validate import check_float, check_int


def test_check_int():
    assert check_int("n", 3, 1) == 3
    assert check_int("--steps", 5, 1, 5) == 5
    with pytest.raises(ValueError, match=r"^n must be >= 1, got 0$"):
        check_int("n", 0, 1)
    with pytest.raises(ValueError, match=r"^--steps must be in \[1, 5\], got 6$"):
        check_int("--steps", 6, 1, 5)
    with pytest.raises(TypeError, match=r"^n must be an int, got bool \(True\)$"):
        check_int("n", True, 0)
    with pytest.raises(TypeError, match=r"^n must be an int, got float \(1\.0\)$"):
        check_int("n", 1.0, 0)


def test_check_float():
    assert check_float("t", 0) == 0.0 and isinstance(check_float("t", 0), float)
    assert check_float("p", 1.0, 0.0, 1.0) == 1.0
    with pytest.raises(ValueError, match=r"^t must be >= 0\.0, got -1$"):
        check_float("t", -1)
    with pytest.raises(ValueError, match=r"^p must be in \[0\.0, 1\.0\], got 1\.5$"):
        check_float("p", 1.5, 0.0, 1.0)
    with pytest.raises(ValueError, match="got nan"):
        check_float("t", math.nan)
    with pytest.raises(ValueError, match="got nan"):
        check_float("p", math.nan, 0.0, 1.0)
    with pytest.raises(TypeError, match=r"^t must be a float, got str"):
        check_float("t", "1")
