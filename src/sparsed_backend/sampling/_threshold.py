"""Confidence-based parallel decoding (the samplers' ``threshold=`` and ``factor=``): the two
rules, their arguments, and the host bookkeeping that ends a block and places SparseD's switch.

Both rules are Fast-dLLM's (arXiv 2505.22618): the threshold rule unmasks every token at least
``threshold`` confident; the factor rule unmasks the n most confident tokens for the largest n
whose n-th confidence c_n satisfies (n + 1)(1 - c_n) <= ``factor`` (with all better ones doing
the same), so the bar rises with the number of tokens decoded at once."""

from __future__ import annotations

import functools

import torch

from .._validate import ArgumentValueError, check_int, check_number
from ..attention._ranking import top_count
from ..attention.state import SparseDState


def check_schedule(
    steps: int | None, threshold: float | None, factor: float | None = None
) -> tuple[int | None, float | None, float | None]:
    """A fixed schedule (``steps``), confidence-threshold decoding (``threshold``) or the factor
    rule (``factor``): exactly one. Returns the three, checked."""
    if factor is not None:
        check_number("factor", factor)
        factor = float(factor)
        if not factor > 0.0:
            raise ArgumentValueError("factor", f"factor must be > 0, got {factor!r}")
        if threshold is not None:
            raise ArgumentValueError(
                "factor", f"factor={factor} and threshold={threshold} are two parallel decoding rules: give one"
            )
        if steps is not None:
            raise ArgumentValueError(
                "steps",
                f"steps={steps} and factor={factor} exclude each other: factor decoding takes as many steps as "
                "each block needs (at most its length); pass steps=None",
            )
        return None, None, factor
    if threshold is None:
        if steps is None:
            raise ArgumentValueError("steps", "steps is required (a fixed schedule), unless threshold is given")
        return check_int("steps", steps, 1), None, None
    check_number("threshold", threshold)  # a finite real number
    threshold = float(threshold)
    if not 0.0 < threshold <= 1.0:
        raise ArgumentValueError("threshold", f"threshold must be in (0, 1], got {threshold!r}")
    if steps is not None:
        raise ArgumentValueError(
            "steps",
            f"steps={steps} and threshold={threshold} exclude each other: threshold decoding takes as many "
            "steps as each block needs (at most its length); pass steps=None",
        )
    return None, threshold, None


def confidence_rule(threshold: float | None, factor: float | None) -> str | None:
    """The name of the confidence rule the (checked) arguments choose: "threshold", "factor" or
    None (a fixed schedule)."""
    return "threshold" if threshold is not None else "factor" if factor is not None else None


def threshold_transfer(confidence: torch.Tensor, is_masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, L) bool: the masked positions whose confidence reaches ``threshold``, and in every row
    that still has a masked position at least its most confident one."""
    score = torch.where(is_masked, confidence.float(), -torch.inf)
    best = torch.zeros_like(is_masked).scatter_(-1, score.argmax(-1, keepdim=True), True)
    return is_masked & ((score >= threshold) | best)


def factor_transfer(confidence: torch.Tensor, is_masked: torch.Tensor, factor: float) -> torch.Tensor:
    """(B, L) bool: the factor rule's choice. Per row, the masked positions' confidences sorted
    from the highest, c_1 >= c_2 >= ...: the n most confident, n the length of the leading run
    with (n + 1)(1 - c_n) <= ``factor``; at least the most confident one in every row that still
    has a masked position."""
    score = torch.where(is_masked, confidence.float(), -torch.inf)
    ordered = score.sort(-1, descending=True).values  # (B, L)
    n = torch.arange(1, score.shape[-1] + 1, device=score.device, dtype=torch.float32)
    ok = ((n + 1) * (1.0 - ordered) <= factor) & (ordered > -torch.inf)
    ok[..., 0] = True  # the most confident always
    count = ok.long().cumprod(-1).sum(-1, keepdim=True)  # (B, 1): the leading run
    return top_count(score, count) & is_masked


def parallel_rule(threshold: float | None, factor: float | None):
    """The confidence rule the (checked) arguments ask for, as ``rule(confidence, is_masked)`` ->
    (B, L) bool; None for a fixed schedule."""
    if threshold is not None:
        return functools.partial(threshold_transfer, threshold=threshold)
    if factor is not None:
        return functools.partial(factor_transfer, factor=factor)
    return None


class ThresholdClock:
    """Threshold decoding's host bookkeeping: one read-back per step (the masks left in the
    block, and the share of every row's generated tokens decoded so far), which ends the block
    and places SparseD's switch.

    SparseD's ``skip`` with a schedule of unknown length: the switch is the first step that
    begins with at least ``skip`` of each row's generated tokens decoded (with LLaDA's fixed
    schedule at one token per step, that is the paper's step rule). With a K/V cache it waits
    for the next block's first step, a refresh the cache needs anyway; only when no block
    start is left does it refresh at once (one extra full forward).
    """

    def __init__(self, state: SparseDState | None, mask_id: int, gen_start: int, cached: bool) -> None:
        self.state, self.mask_id, self.gen_start, self.cached = state, mask_id, gen_start, cached
        self.decoded = 0.0  # the least decoded share of a row's generated tokens

    def place_switch(self, first_step_of_block: bool, blocks_after: int) -> None:
        state = self.state
        if state is None or state.switch is not None or self.decoded < state.config.skip:
            return
        if self.cached and not first_step_of_block and blocks_after > 0:
            return
        state.switch_here()

    def block_done(self, x: torch.Tensor, start: int, stop: int) -> bool:
        """After a step: read back the masks left in [start, stop) and the decoded share."""
        gen = x[:, self.gen_start :] != self.mask_id
        left, decoded = torch.stack([(x[:, start:stop] == self.mask_id).sum(-1), gen.sum(-1)]).tolist()
        self.decoded = min(decoded) / gen.shape[1]
        return max(left) == 0
