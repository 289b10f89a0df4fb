"""Block selection rules: block importance -> boolean block tables.

A block table is a bool tensor (B, H, nQ, nKV): entry (b, h, i, j) says whether query block i
of head h attends to key block j. Tables are the one currency between selection and masks.
Every rule here runs on the device with no host sync.
"""

from __future__ import annotations

import torch

from ._ranking import rank_desc, top_count
from .config import RULES, SparseDConfig

__all__ = [
    "forced_block",
    "generation_start_block",
    "keep_within_count",
    "select_blocks",
    "select_local",
    "select_random",
    "select_topk",
]


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


def forced_block(rule: str, gen_start: int | None, block_size: int | str, n_kv: int) -> int | None:
    """The key block that every query block keeps under ``rule`` (`SparseDConfig.rule`).

    "paper": none. "sink": block 0. "prompt_end" and "prompt_end_gen": the block holding the
    prompt's last token (``gen_start - 1``), which needs the prompt length: ``gen_start`` None or
    0 raises.
    """
    if rule == "paper":
        return None
    if rule == "sink":
        return 0
    if rule in ("prompt_end", "prompt_end_gen"):
        if gen_start is None or gen_start < 1:
            raise ValueError(
                f"rule={rule!r} keeps the key block holding the prompt's last token, so it needs "
                f"gen_start >= 1 (the prompt length, which the samplers put in SparseDState), got {gen_start!r}"
            )
        if not isinstance(block_size, int):
            raise ValueError(
                f"rule={rule!r} needs the resolved block size (SparseDConfig.for_length), got {block_size!r}"
            )
        return min((gen_start - 1) // block_size, n_kv - 1)
    raise ValueError(f"rule must be one of {', '.join(map(repr, RULES))}, got {rule!r}")


def keep_within_count(
    table: torch.Tensor,
    ranked: torch.Tensor,
    column: int,
    gen_start_block: int | None = None,
    gen_ranked: torch.Tensor | None = None,
    prompt_rows_give_gen: bool = False,
) -> torch.Tensor:
    """Make every row keep key block ``column`` without keeping more blocks than ``table`` does.

    Each row keeps exactly as many blocks as in ``table`` (the paper rule's selection). When
    ``column`` is not among them it takes the place of the row's lowest-ranked kept prompt
    block (by ``ranked``); generation blocks (``gen_start_block`` on, ranked by ``gen_ranked``)
    give up their place only when no kept prompt block is left. With ``prompt_rows_give_gen``
    the query blocks before ``gen_start_block`` do the opposite: they give up their
    lowest-ranked generation block first. A row whose ``column`` has nothing to attend (-inf in
    ``ranked``) is unchanged.

    Args:
        table: (B, H, nQ, nKV) bool, the paper rule's table.
        ranked: (B, H, nQ, nKV) the scores that table's top-k ranked (-inf: nothing to attend).
        column: the key block to keep, 0 <= column < nKV.
        gen_start_block: first generation block when the region had its own top-k, else None.
        gen_ranked: (B, H, nQ, nKV - gen_start_block) the region's own scores, with it.
    Returns:
        (B, H, nQ, nKV) bool, the same number of True per row as ``table``.
    """
    n_kv = ranked.shape[-1]
    if not 0 <= column < n_kv:
        raise ValueError(f"column must be in [0, {n_kv}), got {column}")
    valid = torch.isfinite(ranked)
    rank = rank_desc(ranked)
    tier = table.long()  # 1: kept prompt block, 2: kept generation block, 3: the forced block
    if gen_start_block is not None:
        g = gen_start_block
        rank[..., g:] = rank_desc(gen_ranked)
        tier[..., g:] *= 2
        if prompt_rows_give_gen:  # query blocks before the region: prompt blocks 2, generation 1
            rows = tier[..., :g, :]
            tier[..., :g, :] = torch.where(rows == 2, 1, rows * 2)
    tier[..., column] = 3
    # Tiers first, then the rank inside the tier; ranks are distinct, so there are no ties.
    key = (tier * (2 * n_kv) + (n_kv - rank)).masked_fill(~valid, -1)
    return top_count(key, table.sum(-1, keepdim=True)) & valid


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
    gen_start: int | None = None,
) -> torch.Tensor:
    """SparseD's rule: per (b, h, query block), keep the top-k key blocks by importance.

    k = ceil(select * attendable key blocks). With ``config.generation_share`` and a generation
    region, prompt key blocks are kept when they are in the top-k over all blocks, and the
    generation key blocks (``gen_start_block`` on) get their own top-k with the same ratio, ranked
    by ``gen_importance``: the importance under a softmax taken over the generation keys only,
    as in the reference implementation. A ``config.rule`` other than "paper" then makes every
    row keep one more block (`forced_block`) within the same per-row count (`keep_within_count`).

    Args:
        importance: (B, H, nQ, nKV) float; -inf marks key blocks with nothing to attend.
        gen_start_block: first key block of the generation region (`generation_start_block`).
        gen_importance: (B, H, nQ, nKV - gen_start_block), needed when the region is split off.
        gen_start: index of the first generated token (the prompt length), for ``config.rule``.
    Returns:
        (B, H, nQ, nKV) bool block table.
    """
    n_kv = importance.shape[-1]
    column = forced_block(config.rule, gen_start, config.block_size, n_kv)
    valid = torch.isfinite(importance)  # (B, H, nQ, nKV)
    keep_all = _kept(config, valid.sum(-1, keepdim=True))
    ranked = _boost_diagonal(importance, valid) if config.keep_diagonal else importance
    table = top_count(ranked, keep_all) & valid
    g = None if gen_start_block is None or not config.generation_share else min(max(gen_start_block, 0), n_kv)
    if g is None or g == 0 or g == n_kv:
        return table if column is None else keep_within_count(table, ranked, column)
    want = (*importance.shape[:-1], n_kv - g)
    if gen_importance is None or tuple(gen_importance.shape) != want:
        got = None if gen_importance is None else tuple(gen_importance.shape)
        raise ValueError(f"gen_importance must have shape {want} (the generation key blocks), got {got}")
    gen_valid = torch.isfinite(gen_importance)
    keep_gen = _kept(config, gen_valid.sum(-1, keepdim=True))
    if config.keep_diagonal:
        gen_importance = _boost_diagonal(gen_importance, gen_valid, col_offset=g)
    table[..., g:] = top_count(gen_importance, keep_gen)
    table &= valid
    if column is None:
        return table
    return keep_within_count(table, ranked, column, g, gen_importance, config.rule == "prompt_end_gen")


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
    gen_start: int | None = None,
) -> torch.Tensor:
    """Apply the rule named by ``config.pattern`` ("topk" = SparseD, "local", "random").

    ``gen_start`` (the prompt length) is read by the top-k's ``config.rule`` only.
    """
    if config.pattern == "local":
        return select_local(importance, config)
    if config.pattern == "random":
        return select_random(importance, config, gen_start_block)
    return select_topk(importance, config, gen_start_block, gen_importance, gen_start)
