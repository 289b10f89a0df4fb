"""Confidence-threshold parallel decoding (the samplers' ``threshold=``): the rule, its
arguments, and the host bookkeeping that ends a block and places SparseD's switch."""

from __future__ import annotations

import torch

from .._validate import ArgumentValueError, check_int, check_number
from ..attention.state import SparseDState


def check_schedule(steps: int | None, threshold: float | None) -> tuple[int | None, float | None]:
    """A fixed schedule (``steps``) or confidence-threshold decoding (``threshold``), not both."""
    if threshold is None:
        if steps is None:
            raise ArgumentValueError("steps", "steps is required (a fixed schedule), unless threshold is given")
        return check_int("steps", steps, 1), None
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
    return None, threshold


def threshold_transfer(confidence: torch.Tensor, is_masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, L) bool: the masked positions whose confidence reaches ``threshold``, and in every row
    that still has a masked position at least its most confident one."""
    score = torch.where(is_masked, confidence.float(), -torch.inf)
    best = torch.zeros_like(is_masked).scatter_(-1, score.argmax(-1, keepdim=True), True)
    return is_masked & ((score >= threshold) | best)


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
