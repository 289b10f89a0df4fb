"""The three-way numeric check of docs/testing.md (section 2): golden fp64, low-precision eager, under test."""

from __future__ import annotations

import torch


def assert_close_3way(
    test: torch.Tensor, golden: torch.Tensor, lowprec: torch.Tensor, where: torch.Tensor | None = None
) -> None:
    """Pass when max|golden - test| <= 2 max|golden - lowprec| + floor and the mean error is
    within 1.2x of the low-precision reference's (plus the floor). No NaN/Inf allowed.

    Args:
        test, golden, lowprec: same shape; golden in float64.
        where: optional bool mask of the entries that count (e.g. real, non-pad positions).
    """
    assert torch.isfinite(test if where is None else test[where]).all(), "NaN/Inf in the result under test"
    g, t, lp = golden.double(), test.double(), lowprec.double()
    if where is not None:
        g, t, lp = g[where], t[where], lp[where]
    eps = torch.finfo(test.dtype).eps
    floor = max(1e-5, 2 * eps * g.abs().max().item())
    err, ref_err = (g - t).abs(), (g - lp).abs()
    assert err.max().item() <= 2 * ref_err.max().item() + floor, (
        f"max error {err.max().item():.3g} > 2 * reference error {ref_err.max().item():.3g} + {floor:.3g}"
    )
    assert err.mean().item() <= 1.2 * ref_err.mean().item() + floor, (
        f"mean error {err.mean().item():.3g} > 1.2 * reference mean error {ref_err.mean().item():.3g}"
    )
