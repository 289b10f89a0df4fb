"""SparseDConfig: the knobs of SparseD, validated once at construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .._validate import ArgumentTypeError, ArgumentValueError, check_number

__all__ = ["RULES", "SparseDConfig", "auto_block_size"]

# What every query block keeps beside its top-k, inside the same per-row count (selection.py):
# "paper": the reference's rule, exactly; "prompt_end": the key block holding the prompt's last
# token, in place of the row's lowest-ranked kept prompt block; "prompt_end_gen": the same, but
# query blocks before the generation region give up a generation block first; "sink": key block 0
# (the sequence's first tokens), in place of the lowest-ranked kept prompt block.
RULES = ("paper", "prompt_end", "prompt_end_gen", "sink")

# block_size="auto" (not in the reference): on the moved grid, a sequence of n tokens gets the
# block size measured for the base length nearest n in log scale (AUTO_BLOCK_SIZES): 16 below
# 1,449 tokens, 64 below 2,897, the paper's 128 from 2,897 on. Each is the coarsest size
# measured to keep every residue of the 128-token grid within 2 points of dense at its base
# (shipped model, H200, 256 fresh prompts per residue, benchmarks/results/fidelity_grid_auto.md):
# at 1k, 128-token blocks fall up to 8.2 points below dense, 64 up to 3.1, 32 up to 2.7 and 16
# up to 1.6; at 2k, 128 up to 2.7 and 64 up to 2.0; at 4k, 128 up to 1.6. Only the middle grid
# (the default) is sized so: the reference's grid (prompt_end_offset=None) keeps 128 at every
# length (the reference's selection, exactly), as does an int prompt_end_offset.
PAPER_BLOCK_SIZE = 128
AUTO_BLOCK_SIZES = ((1024, 16), (2048, 64), (4096, PAPER_BLOCK_SIZE))  # (base length, block size)


def auto_block_size(seq_len: int) -> int:
    """The block size ``block_size="auto"`` gives a sequence of ``seq_len`` tokens on the moved
    grid: that of the `AUTO_BLOCK_SIZES` base length nearest ``seq_len`` in log scale (so the
    first base's below it, the last's above it)."""
    if seq_len <= 0:
        return AUTO_BLOCK_SIZES[0][1]
    return min(AUTO_BLOCK_SIZES, key=lambda base_size: abs(math.log2(seq_len / base_size[0])))[1]


@dataclass(frozen=True)
class SparseDConfig:
    """How SparseD sparsifies attention over one diffusion generation.

    Steps ``0 .. switch_step(steps) - 1`` run dense attention. The switch step runs dense
    attention too and, per layer and per query head, keeps for every query block the
    ``select`` share of key blocks with the highest mean softmax probability. Every later
    step reuses that block pattern through block-sparse FlexAttention.
    """

    skip: float = 0.2  # fraction of denoising steps kept dense, in [0, 1]
    select: float = 0.3  # fraction of key blocks kept per query block, in (0, 1]
    # Tokens per query/key block, a positive multiple of 16, or "auto": chosen per sequence by
    # `auto_block_size` on the middle grid (16-128), 128 on any other grid (see above).
    block_size: int | str = "auto"
    generation_share: bool = True  # the generation region gets its own top-k (reference rule)
    # Sequences shorter than this stay dense (sparse attention cannot pay there).
    # None: the measured rule of `sparsed_backend.attention.policy.min_sparse_len` for the device.
    min_sparse_len: int | None = None
    # Baselines for the fidelity benchmark (SparseD itself is pattern="topk", reselect=False):
    # "topk": SparseD's top-k blocks; "local": a sliding window of blocks; "random": a random
    # pattern of the same density, drawn once at the switch step (torch's global RNG).
    pattern: str = "topk"
    reselect: bool = False  # re-select from fresh dense scores at every sparse step
    # Not in the reference: every query block keeps its own key block (the diagonal) within its
    # k blocks. Measured on the demo model in benchmarks/results/fidelity.md.
    keep_diagonal: bool = False
    # Blocks every query block keeps whatever their score, taken out of the paper rule's own
    # per-row count (so the kept density is the paper's): one of RULES. "paper" is the
    # reference's rule, exactly. See docs/method.md, "Where the prompt ends on the block grid".
    rule: str = "paper"
    # Not in the reference: where the prompt ends inside a block. An offset o in [0, block_size)
    # moves the block grid (zero-padding the front of the selection and of the sparse calls) so
    # that the prompt ends o tokens into a block, whatever its length. "middle" (the default) is
    # block_size // 2. None keeps the grid at position 0: the reference's selection, exactly.
    # With the grid at 0, exact match falls to 41% at 1k when the prompt ends in a block's last
    # tokens; moved to the middle it stays at 95.7-100% at every residue (H200, 256 prompts per
    # cell: benchmarks/results/fidelity_grid.md; docs/method.md).
    prompt_end_offset: int | str | None = "middle"

    def __post_init__(self) -> None:
        check_number("skip", self.skip)
        if not 0.0 <= self.skip <= 1.0:
            raise ArgumentValueError("skip", f"skip must be in [0, 1], got {self.skip!r}")
        check_number("select", self.select)
        if not 0.0 < self.select <= 1.0:
            raise ArgumentValueError("select", f"select must be in (0, 1], got {self.select!r}")
        if self.block_size != "auto":
            if isinstance(self.block_size, str):
                raise ArgumentValueError(
                    "block_size", f"block_size must be 'auto' or a positive multiple of 16, got {self.block_size!r}"
                )
            check_number("block_size", self.block_size, integer=True)
            if self.block_size <= 0 or self.block_size % 16 != 0:
                raise ArgumentValueError(
                    "block_size", f"block_size must be 'auto' or a positive multiple of 16, got {self.block_size!r}"
                )
        if not isinstance(self.generation_share, bool):
            raise ArgumentTypeError(
                "generation_share", f"generation_share must be a bool, got {type(self.generation_share).__name__}"
            )
        if self.pattern not in ("topk", "local", "random"):
            raise ArgumentValueError("pattern", f"pattern must be 'topk', 'local' or 'random', got {self.pattern!r}")
        if not isinstance(self.rule, str) or self.rule not in RULES:
            raise ArgumentValueError("rule", f"rule must be one of {', '.join(map(repr, RULES))}, got {self.rule!r}")
        if self.rule != "paper" and self.pattern != "topk":
            raise ArgumentValueError(
                "rule",
                f"rule={self.rule!r} changes SparseD's top-k selection, so it needs pattern='topk', "
                f"got pattern={self.pattern!r}",
            )
        for name in ("reselect", "keep_diagonal"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if isinstance(self.prompt_end_offset, str):
            if self.prompt_end_offset != "middle":
                raise ArgumentValueError(
                    "prompt_end_offset",
                    f"prompt_end_offset must be None, 'middle' or an int in [0, block_size={self._grid_block_size}), "
                    f"got {self.prompt_end_offset!r}",
                )
        elif self.prompt_end_offset is not None:
            check_number("prompt_end_offset", self.prompt_end_offset, integer=True)
            if not 0 <= self.prompt_end_offset < self._grid_block_size:
                raise ArgumentValueError(
                    "prompt_end_offset",
                    f"prompt_end_offset must be None, 'middle' or an int in [0, block_size={self._grid_block_size}), "
                    f"got {self.prompt_end_offset!r}",
                )
        if self.min_sparse_len is not None:
            check_number("min_sparse_len", self.min_sparse_len, integer=True)
            if self.min_sparse_len < 0:
                raise ArgumentValueError(
                    "min_sparse_len", f"min_sparse_len must be >= 0 or None, got {self.min_sparse_len!r}"
                )

    def for_length(self, seq_len: int) -> SparseDConfig:
        """This config for a sequence of ``seq_len`` tokens: ``block_size="auto"`` resolved
        (`auto_block_size` with ``prompt_end_offset="middle"``, the paper's 128 on the reference's
        grid or at an int offset); the config itself when its block size is set."""
        if self.block_size != "auto":
            return self
        size = auto_block_size(seq_len) if self.prompt_end_offset == "middle" else PAPER_BLOCK_SIZE
        return dataclasses.replace(self, block_size=size)

    @property
    def _grid_block_size(self) -> int:
        """The block size an int ``prompt_end_offset`` is checked against (``"auto"`` keeps the
        paper's 128 on every grid but the middle one)."""
        return PAPER_BLOCK_SIZE if self.block_size == "auto" else self.block_size

    def resolved_block_size(self) -> int:
        """The block size as an int; ValueError while it is an unresolved ``"auto"``."""
        if self.block_size == "auto":
            raise ValueError("block_size='auto' is resolved per sequence: call config.for_length(seq_len) first")
        return self.block_size

    @property
    def grid_offset(self) -> int | None:
        """Where the prompt ends inside a block on the selection's grid (``prompt_end_offset``
        resolved: "middle" is ``block_size // 2``); None for the reference's grid."""
        if self.prompt_end_offset == "middle":
            return self.resolved_block_size() // 2
        return self.prompt_end_offset

    def grid_front(self, gen_start: int | None) -> int:
        """Tokens of zero padding before position 0 that make the prompt (``gen_start`` tokens) end
        ``grid_offset`` tokens into a block; 0 on the reference's grid or without a generation
        region."""
        offset = self.grid_offset
        if offset is None or not gen_start:
            return 0
        return (offset - gen_start) % self.resolved_block_size()

    def switch_step(self, steps: int) -> int:
        """Index of the step that selects blocks; earlier steps are dense, later ones sparse.

        The reference uses ``int(steps * skip) + 1``; we drop the ``+ 1`` so that skip = 0
        means "select at step 0, sparse from step 1" and skip = 0.2 keeps exactly the first
        20% of steps dense. ``skip = 1`` returns ``steps``: the generation never goes sparse.
        """
        check_number("steps", steps, integer=True)
        if steps <= 0:
            raise ArgumentValueError("steps", f"steps must be a positive int, got {steps!r}")
        return min(int(steps * self.skip), steps)

    def blocks_kept(self, n_blocks: int) -> int:
        """Key blocks kept out of ``n_blocks``: ceil(select * n), at least 1; all at select = 1."""
        if n_blocks <= 0:
            return 0
        # The epsilon keeps 0.3 * 10 = 3.0000000000000004 from rounding up to 4.
        return max(1, min(n_blocks, math.ceil(self.select * n_blocks - 1e-9)))
