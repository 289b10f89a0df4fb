"""Block tables -> FlexAttention BlockMasks, built from the tables directly (no N x N work)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from .._compat import FROM_KV_BLOCKS_HAS_COMPUTE_Q_BLOCKS

__all__ = ["block_mask_from_table", "block_table", "table_mask_mod"]


def table_mask_mod(table: torch.Tensor, block_size: int, key_valid: torch.Tensor):
    """mask_mod that reads the block table and the key mask, token by token.

    Compiled FlexAttention evaluates it only inside partial blocks. Eager FlexAttention
    ignores the block lists and evaluates it everywhere; because it reads the same table, an
    eager run still computes the selected sparse attention, never silently dense attention.

    Args:
        table: (B, H, nQ, nKV) bool block table.
        key_valid: (B, nKV * block_size) bool, False for padding and past the last key (all True
            where every key is real: one mask kind for every BlockMask, so one compiled graph).
    """

    def mask_mod(b, h, q_idx, kv_idx):
        return table[b, h, q_idx // block_size, kv_idx // block_size] & key_valid[b, kv_idx]

    mask_mod.__name__ = f"sparsed_table_bs{block_size}"
    return mask_mod


def _block_lists(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, nQ, nKV) bool -> counts (B, H, nQ) and indices (B, H, nQ, nKV), selected first.

    The selected key blocks come first in ascending order (a stable sort), which keeps the
    kernel's key loads in memory order.
    """
    counts = table.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~table).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return counts, indices


def block_table(block_mask: BlockMask, n_kv: int) -> torch.Tensor:
    """(B, H, nQ, n_kv) bool: the key blocks ``block_mask`` lists for each query block (partial
    and full), for lists of any width (torch's ``to_dense()`` needs one column per key block)."""

    def from_lists(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        listed = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
        out = torch.zeros(*idx.shape[:-1], n_kv + 1, dtype=torch.bool, device=idx.device)
        return out.scatter_(-1, torch.where(listed, idx.long(), n_kv), True)[..., :n_kv]

    table = from_lists(block_mask.kv_num_blocks, block_mask.kv_indices)
    if block_mask.full_kv_num_blocks is not None:
        table |= from_lists(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    return table


def block_mask_from_table(
    table: torch.Tensor,
    q_len: int,
    kv_len: int,
    block_size: int,
    key_valid: torch.Tensor | None = None,
    full_blocks: bool = True,
    key_counts: torch.Tensor | None = None,
    pad_to: tuple[int, int] | None = None,
    max_row_blocks: int | None = None,
) -> BlockMask:
    """Build the BlockMask that attends exactly to the blocks of ``table``.

    Key blocks that hold padding or run past ``kv_len`` become partial blocks (the mask_mod
    masks their tokens); the others become full blocks, which skip the mask_mod.

    With ``pad_to`` the mask is for longer inputs (the compiled call's bucket lengths,
    `flex_shapes.padded_lengths`): the keys past ``kv_len`` are masked, and the query rows past
    ``q_len`` attend to nothing (their output is dropped by `attention.sparse_attention`).

    Args:
        table: (B, H, nQ, nKV) bool, nQ = ceil(q_len / block_size), nKV = ceil(kv_len / bs).
        key_valid: (B, kv_len) bool, True for real keys; None when all keys are real.
        full_blocks: mark blocks with no masked token as full. False puts every block on the
            mask_mod path (needed on CPU, where torch 2.13's inductor fails to compile masks
            made only of full blocks).
        key_counts: (B, nKV) attendable keys per key block, if the caller computed them
            (`scoring.key_block_counts`); derived from ``key_valid`` otherwise.
        pad_to: (padded q_len, padded kv_len), whole blocks at least as long as the real
            lengths; None: the real lengths.
        max_row_blocks: an upper bound on the blocks any row of ``table`` keeps, known on the
            host (`switch_step.max_row_blocks`). With ``full_blocks`` the index lists then keep
            that many columns instead of one per key block (the CUDA kernel reads a row's first
            ``num_blocks`` entries through its strides; the CPU kernel needs full-width lists,
            so without ``full_blocks`` it is ignored). A row keeping more would be read short:
            the bound must hold. torch's ``BlockMask.to_dense()`` assumes full-width lists; use
            :func:`block_table` on trimmed masks. The partial lists keep the same width: a
            narrower partial list (2 columns on a moved grid without key padding) computed
            wrong outputs in torch 2.11's CUDA kernel on an H200 (max error 2.56 where 0.05 was
            allowed), also when both lists were views of one tensor with equal strides.
    Returns:
        A BlockMask for (q_len, kv_len) (or ``pad_to``) whose ``to_dense()`` is ``table`` minus
        key blocks that hold no attendable key (zero-padded to the padded block counts).
    """
    B, H, n_q, n_kv = table.shape
    if n_q != -(-q_len // block_size) or n_kv != -(-kv_len // block_size):
        raise ValueError(
            f"table of shape {tuple(table.shape)} does not fit q_len={q_len}, kv_len={kv_len} "
            f"with block_size={block_size}"
        )
    seq_lengths = (q_len, kv_len)
    if pad_to is not None and tuple(pad_to) != seq_lengths:
        q_pad, kv_pad = pad_to
        if q_pad < q_len or kv_pad < kv_len or q_pad % block_size or kv_pad % block_size:
            raise ValueError(
                f"pad_to must be whole blocks of {block_size} at least (q_len, kv_len) = {seq_lengths}, got {pad_to}"
            )
        if key_counts is not None:
            key_counts = F.pad(key_counts, (0, kv_pad // block_size - n_kv))
        table = F.pad(table, (0, kv_pad // block_size - n_kv, 0, q_pad // block_size - n_q))
        n_q, n_kv = table.shape[-2:]
        seq_lengths = (q_pad, kv_pad)
    tail = n_kv * block_size - kv_len
    # Known on the host: no key padding and whole blocks of real keys. Blocks past kv_len (the
    # bucket padding of `pad_to`) are False in the table, so every listed block is full.
    every_block_full = key_valid is None and kv_len % block_size == 0
    # The mask_mod always reads a key mask (all True without padding): one mask kind, so a
    # length that lands exactly on a bucket shares the graph of the shorter lengths padded to it.
    if key_valid is None:
        key_valid = torch.ones(B, kv_len, dtype=torch.bool, device=table.device)
    padded_valid = F.pad(key_valid, (0, tail), value=False)
    if every_block_full:
        attendable = table
    else:
        if key_counts is None:
            key_counts = padded_valid.view(B, n_kv, block_size).sum(-1)
        counts = key_counts.view(B, 1, 1, n_kv)
        attendable = table & (counts > 0)

    if full_blocks and every_block_full:
        # No padding and no ragged tail: every block is full. The partial list is empty, so
        # it shares the full list's index tensor (never read) instead of a second copy.
        full_num, full_idx = _block_lists(attendable)
        part_num, part_idx = torch.zeros_like(full_num), full_idx
    elif full_blocks:
        full = attendable & (counts == block_size)
        full_num, full_idx = _block_lists(full)
        part_num, part_idx = _block_lists(attendable & ~full)
    else:
        full_num, full_idx = None, None
        part_num, part_idx = _block_lists(attendable)

    if full_blocks and max_row_blocks is not None and max_row_blocks < n_kv:
        # Selected blocks come first in each row, so the first columns hold every kept index.
        width = max(int(max_row_blocks), 1)
        shared = part_idx is full_idx
        full_idx = full_idx[..., :width].contiguous()
        part_idx = full_idx if shared else part_idx[..., :width].contiguous()

    extra = {"compute_q_blocks": False} if FROM_KV_BLOCKS_HAS_COMPUTE_Q_BLOCKS else {}
    return BlockMask.from_kv_blocks(
        part_num,
        part_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=table_mask_mod(table, block_size, padded_valid),
        seq_lengths=seq_lengths,
        **extra,
    )
