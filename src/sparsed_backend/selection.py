"""Block selection rules: block importance -> boolean block tables.

A block table is a bool tensor (B, H, nQ, nKV): entry (b, h, i, j) says whether query block i
of head h attends to key block j. Tables are the one currency between selection and masks.
Every rule here runs on the device with no host sync.
"""

from __future__ import annotations

import torch

from ._ranking import top_count
from .config import SparseDConfig

__all__ = ["generation_start_block", "select_blocks", "select_local", "select_random", "select_topk"]


def _kept(config: SparseDConfig, n: torch.Tensor) -> torch.Tensor:
    """Tensor form of SparseDConfig.blocks_kept: ceil(select * n), at least 1, at most n."""
    k = torch.ceil(n.double() * config.select - 1e-9).long()
    return torch.minimum(k.clamp(min=1), n).masked_fill(n == 0, 0)


def generation_start_block(gen_start: int | None, block_size: int, n_kv: int) -> int | None:
    """First key block of the generation region, as the reference implementation draws it.

    That is the first block starting at or after the end of the prompt (``ceil(gen_start /
    block_size)``), or the last block when none does (a generation shorter than the prompt's
    ragged tail). None without a generation region.
    """
    if gen_start is None:
        return None
    return min(-(-gen_start // block_size), n_kv - 1)


def _boost_diagonal(importance: torch.Tensor, valid: torch.Tensor, col_offset: int = 0) -> torch.Tensor:
    """Rank every query block's own key block first (column ``i - col_offset`` of row ``i``)."""
    n_q, n_cols = importance.shape[-2:]
    rows = torch.arange(n_q, device=importance.device).view(n_q, 1)
    cols = torch.arange(n_cols, device=importance.device).view(1, n_cols)
    diag = cols == rows - col_offset  # a comparison, not boolean indexing (which syncs)
    return importance.masked_fill(diag & valid, torch.finfo(importance.dtype).max)


def select_topk(
    importance: torch.Tensor,
    config: SparseDConfig,
    gen_start_block: int | None = None,
    gen_importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """SparseD's rule: per (b, h, query block), keep the top-k key blocks by importance.

    k = ceil(select * attendable key blocks). With ``config.generation_share`` and a generation
    region, prompt key blocks are kept when they are in the top-k over all blocks, and the
    generation key blocks (``gen_start_block`` on) get their own top-k with the same ratio, ranked
    by ``gen_importance``: the importance under a softmax taken over the generation keys only,
    as in the reference implementation.

    Args:
        importance: (B, H, nQ, nKV) float; -inf marks key blocks with nothing to attend.
        gen_start_block: first key block of the generation region (`generation_start_block`).
        gen_importance: (B, H, nQ, nKV - gen_start_block), needed when the region is split off.
    Returns:
        (B, H, nQ, nKV) bool block table.
    """
    n_kv = importance.shape[-1]
    valid = torch.isfinite(importance)  # (B, H, nQ, nKV)
    keep_all = _kept(config, valid.sum(-1, keepdim=True))
    ranked = _boost_diagonal(importance, valid) if config.keep_diagonal else importance
    table = top_count(ranked, keep_all)
    if gen_start_block is None or not config.generation_share:
        return table & valid
    g = min(max(gen_start_block, 0), n_kv)
    if g == 0 or g == n_kv:
        return table & valid
    want = (*importance.shape[:-1], n_kv - g)
    if gen_importance is None or tuple(gen_importance.shape) != want:
        got = None if gen_importance is None else tuple(gen_importance.shape)
        raise ValueError(f"gen_importance must have shape {want} (the generation key blocks), got {got}")
    gen_valid = torch.isfinite(gen_importance)
    keep_gen = _kept(config, gen_valid.sum(-1, keepdim=True))
    if config.keep_diagonal:
        gen_importance = _boost_diagonal(gen_importance, gen_valid, col_offset=g)
    table[..., g:] = top_count(gen_importance, keep_gen)
    return table & valid


def select_local(importance: torch.Tensor, config: SparseDConfig) -> torch.Tensor:
    """Baseline of the same density: a window of k key blocks centred on the query block.

    Only the shapes and the -inf marks of ``importance`` are used (not its values).
    """
    B, H, n_q, n_kv = importance.shape
    valid = torch.isfinite(importance)
    k = _kept(config, valid.sum(-1, keepdim=True))  # (B, H, nQ, 1)
    # Query block i sits at the same relative position among the key blocks.
    centre = (torch.arange(n_q, device=importance.device) * n_kv) // max(n_q, 1)
    centre = centre.view(1, 1, n_q, 1)
    start = (centre - (k - 1) // 2).clamp(min=0)
    start = torch.minimum(start, (n_kv - k).clamp(min=0))
    j = torch.arange(n_kv, device=importance.device).view(1, 1, 1, n_kv)
    return (j >= start) & (j < start + k) & valid


def select_random(importance: torch.Tensor, config: SparseDConfig, gen_start_block: int | None = None) -> torch.Tensor:
    """Baseline of the same density: SparseD's top-k rule applied to random scores.

    Only the shapes and the -inf marks of ``importance`` are used. The scores come from torch's
    global RNG (seed it for a reproducible pattern).
    """
    noise = torch.rand(importance.shape, device=importance.device).masked_fill(~torch.isfinite(importance), -torch.inf)
    g = None if gen_start_block is None else min(max(gen_start_block, 0), importance.shape[-1])
    return select_topk(noise, config, gen_start_block, None if g is None else noise[..., g:])


def select_blocks(
    importance: torch.Tensor,
    config: SparseDConfig,
    gen_start_block: int | None = None,
    gen_importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply the rule named by ``config.pattern`` ("topk" = SparseD, "local", "random")."""
    if config.pattern == "local":
        return select_local(importance, config)
    if config.pattern == "random":
        return select_random(importance, config, gen_start_block)
    return select_topk(importance, config, gen_start_block, gen_importance)
