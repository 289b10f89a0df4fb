"""Per-generation state: which step we are at and the block masks selected at the switch step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.nn.attention.flex_attention import BlockMask

from .config import SparseDConfig
from .flex_shapes import front_padded_valid, padded_lengths
from .masks import block_mask_from_table

__all__ = ["LayerSelection", "SparseDState", "Mode"]

Mode = Literal["dense", "switch", "sparse"]


@dataclass
class LayerSelection:
    """What the switch step left for one layer: its BlockMask and the shapes it is valid for."""

    block_mask: BlockMask
    table: torch.Tensor  # (B, H, nQ, nKV) bool: the selection (its mask_mod reads it too)
    batch: int
    num_heads: int
    q_len: int
    kv_len: int
    density: torch.Tensor  # 0-dim: kept share of attendable key blocks over (b, h, q block)
    # Zero rows before position 0 on the selection's grid (SparseDConfig.prompt_end_offset); the
    # table and the mask are on that grid, q_len and kv_len are the real lengths.
    front: int = 0
    # The host-known bound on blocks per row (`switch_step.max_row_blocks`): the width of the
    # mask's index lists on CUDA; None keeps full-width lists.
    max_row_blocks: int | None = None
    _window: tuple | None = field(default=None, repr=False)  # (start, q_len, mask) of the last window
    _window_blocks: tuple | None = field(default=None, repr=False)  # (start, q_len, blocks) of the last window

    def window_mask(
        self, start: int, q_len: int, block_size: int, key_valid: torch.Tensor | None
    ) -> tuple[BlockMask, int]:
        """The BlockMask for query rows ``[start, start + q_len)`` only (a cached step's window).

        The rows keep the blocks selected for them. On the selection's grid the window begins
        ``q_front`` rows into a query block; the mask covers those rows too (the caller pads the
        window's queries with ``q_front`` zero rows in front, and its keys with ``front``), so
        the window's query blocks are the switch step's whatever its start. The last window's
        mask is kept, so the steps of one block build it once.

        Returns:
            (mask, q_front).
        """
        if start < 0 or start + q_len > self.q_len:
            raise ValueError(
                f"a sparse window must lie within the {self.q_len} selected rows, got rows [{start}, {start + q_len})"
            )
        first = start + self.front  # the window's first row on the selection's grid
        q_front = first % block_size
        if self._window is not None and self._window[:2] == (start, q_len):
            return self._window[2], q_front
        rows = self.table[:, :, first // block_size : -(-(first + q_len) // block_size)]
        if self.front:
            key_valid = front_padded_valid(key_valid, self.batch, self.kv_len, self.front, self.table.device)
        mask_q, mask_kv = q_front + q_len, self.front + self.kv_len
        mask = block_mask_from_table(
            rows, mask_q, mask_kv, block_size, key_valid, full_blocks=rows.device.type == "cuda",
            pad_to=padded_lengths(mask_q, mask_kv, block_size), max_row_blocks=self.max_row_blocks,
        )  # fmt: skip
        self._window = (start, q_len, mask)
        return mask, q_front

    def window_blocks(self, start: int, q_len: int, block_size: int) -> torch.Tensor | None:
        """The kept key blocks of query rows ``[start, start + q_len)`` (a cached step's window)
        when they all lie in one query block of the selection's grid, for the block-sparse
        decode kernel (`kernels.sparse_decode`): (B, H, k) int64 grid blocks per head,
        ascending, padded with -1 to k = ``max_row_blocks`` (the host-known bound, so nothing is
        read back; all the key blocks without one). None when the window spans several query
        blocks. The last window's lists are kept, so the steps of one block build them once."""
        first = start + self.front  # the window's first row on the selection's grid
        if first // block_size != (first + q_len - 1) // block_size:
            return None
        if self._window_blocks is not None and self._window_blocks[:2] == (start, q_len):
            return self._window_blocks[2]
        row = self.table[:, :, first // block_size]  # (B, H, nKV) bool
        n_kv = row.shape[-1]
        column = torch.arange(n_kv, device=row.device)
        order = torch.where(row, column, n_kv).sort(-1).values  # kept blocks first, ascending
        widest = n_kv if self.max_row_blocks is None else max(1, min(self.max_row_blocks, n_kv))
        blocks = order[..., :widest]
        blocks = torch.where(blocks < n_kv, blocks, -1)
        self._window_blocks = (start, q_len, blocks)
        return blocks

    def memory_bytes(self) -> int:
        """Device bytes held by the mask's block lists and the block table its mask_mod reads."""
        seen: dict[int, int] = {}
        masks = [self.block_mask] + ([] if self._window is None else [self._window[2]])
        for t in (*(x for m in masks for x in m.as_tuple(flatten=True)), self.table):
            if isinstance(t, torch.Tensor):
                seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())


@dataclass
class SparseDState:
    """The schedule of one generation; pass it to the model as ``sparsed_state=``.

    The sampler calls :meth:`advance` once after each denoising forward. Every layer of one
    forward sees the same step. The switch step stores one :class:`LayerSelection` per layer
    (keyed by the attention module's ``layer_idx``); sparse steps reuse it.

    Args:
        config: the SparseD knobs.
        steps: the number of denoising forwards of the whole generation; the switch step is
            ``config.switch_step(steps)``. None: a schedule whose length is not known in advance
            (threshold decoding); every step is dense until the sampler calls
            :meth:`switch_here`.
        gen_start: index of the first generated token in the (padded) sequence, or None when
            there is no separate generation region. The key blocks from the block holding it
            onward get their own top-k share (``config.generation_share``).
        switch_at: a later switch step than ``config.switch_step(steps)``, below ``steps`` (the
            cached samplers move it to a decoding block's first step, a refresh the cache runs
            anyway); None: the paper's step.
    """

    config: SparseDConfig
    steps: int | None
    gen_start: int | None = None
    switch_at: int | None = None
    step: int = 0
    layers: dict[int, LayerSelection] = field(default_factory=dict)
    dense_reason: str | None = None  # why sparse steps ran dense (set by the backend), if so
    _sized: tuple[int, SparseDConfig] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.config, SparseDConfig):
            raise TypeError(f"config must be a SparseDConfig, got {type(self.config).__name__}")
        # validates steps; None until switch_here() on a schedule of unknown length
        self.switch = None if self.steps is None else self.config.switch_step(self.steps)
        if self.switch_at is not None:
            if self.steps is None:
                raise ValueError("switch_at needs a fixed schedule (steps); with steps=None use switch_here()")
            if isinstance(self.switch_at, bool) or not isinstance(self.switch_at, int):
                raise TypeError(f"switch_at must be an int or None, got {self.switch_at!r}")
            if not self.switch <= self.switch_at < self.steps:
                raise ValueError(
                    f"switch_at must be in [{self.switch}, {self.steps}) (the paper's switch step of "
                    f"{self.steps} steps, at least skip dense), got {self.switch_at}"
                )
            self.switch = self.switch_at
        if self.gen_start is not None:
            if isinstance(self.gen_start, bool) or not isinstance(self.gen_start, int):
                raise TypeError(f"gen_start must be an int or None, got {self.gen_start!r}")
            if self.gen_start < 0:
                raise ValueError(f"gen_start must be >= 0, got {self.gen_start}")

    @property
    def mode(self) -> Mode:
        """'dense' before the switch step, 'switch' at it, 'sparse' after it."""
        if self.steps is not None and self.step >= self.steps:
            raise ValueError(
                f"step counter past the schedule: step {self.step} of a {self.steps}-step "
                "generation; create a new SparseDState (or call reset()) for a new generation"
            )
        if self.switch is None or self.step < self.switch:
            return "dense"
        return "switch" if self.step == self.switch else "sparse"

    def config_for(self, seq_len: int) -> SparseDConfig:
        """``config`` for this generation's ``seq_len`` keys: its ``block_size="auto"`` resolved
        (`SparseDConfig.for_length`), once per length."""
        if self._sized is None or self._sized[0] != seq_len:
            self._sized = (seq_len, self.config.for_length(seq_len))
        return self._sized[1]

    def switch_here(self) -> None:
        """Make the current step the switch step (a schedule of unknown length, ``steps=None``)."""
        if self.steps is not None:
            raise ValueError(f"switch_here() is for steps=None; this schedule switches at step {self.switch}")
        if self.switch is not None:
            raise ValueError(f"the switch step is already set (step {self.switch}); reset() starts a new generation")
        self.switch = self.step

    def advance(self) -> None:
        """Move to the next denoising step (call once after every model forward)."""
        self.step += 1

    def reset(self) -> None:
        """Start the schedule again and forget every selected mask."""
        self.step = 0
        if self.steps is None:
            self.switch = None
        self.layers.clear()
        self.dense_reason = None

    def density(self) -> float | None:
        """Mean kept share of key blocks over all layers, or None before the switch."""
        if not self.layers:
            return None
        return float(torch.stack([s.density for s in self.layers.values()]).float().mean())

    def memory_bytes(self) -> int:
        """Device bytes held by all cached layer masks."""
        return sum(s.memory_bytes() for s in self.layers.values())
