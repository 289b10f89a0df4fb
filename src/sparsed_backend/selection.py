"""Block importance and block selection: attention probabilities -> boolean block tables.

A block table is a bool tensor (B, H, nQ, nKV): entry (b, h, i, j) says whether query block i
of head h attends to key block j. Tables are the one currency between selection and masks.
"""

from __future__ import annotations

import torch

from .config import SparseDConfig

__all__ = [
    "block_importance",
    "block_prob_sums",
    "generation_start_block",
    "importance_from_sums",
    "key_block_counts",
    "select_topk",
    "select_local",
    "select_random",
    "select_blocks",
]

# Bytes of fp32 scores materialised at once while scoring: bounds memory at 64k tokens. 32 MiB
# ran 2x faster than 256 MiB on 2 CPU cores (8 x 8 heads x 2053^2, d 32: 1.5 s vs 3.1 s).
_SCORE_CHUNK_BYTES = 32 * 2**20


def _num_blocks(n: int, block_size: int) -> int:
    return (n + block_size - 1) // block_size


def key_block_counts(
    key_valid: torch.Tensor | None, kv_len: int, block_size: int, batch: int, device: torch.device
) -> torch.Tensor:
    """Number of attendable keys in every key block.

    Args:
        key_valid: (B, S) bool, True for real keys; None when every key is real.
    Returns:
        (B, nKV) int64 counts; the tail block of a length that is not a block multiple is short.
    """
    n_kv = _num_blocks(kv_len, block_size)
    if key_valid is None:
        counts = torch.full((n_kv,), block_size, dtype=torch.int64, device=device)
        counts[-1] = kv_len - (n_kv - 1) * block_size
        return counts.expand(batch, n_kv)
    pad = n_kv * block_size - kv_len
    padded = torch.nn.functional.pad(key_valid, (0, pad), value=False)
    return padded.view(batch, n_kv, block_size).sum(-1)


def importance_from_sums(sums: torch.Tensor, q_len: int, counts: torch.Tensor, block_size: int) -> torch.Tensor:
    """Turn per-block-pair probability sums into means; key blocks with no key get -inf.

    Args:
        sums: (B, H, nQ, nKV) float32 sums of softmax probabilities per block pair.
        counts: (B, nKV) attendable keys per key block (see key_block_counts).
    Returns:
        (B, H, nQ, nKV) float32 importance.
    """
    B, _, n_q, n_kv = sums.shape
    q_rows = torch.full((n_q,), block_size, dtype=torch.float32, device=sums.device)
    q_rows[-1] = q_len - (n_q - 1) * block_size
    denom = q_rows.view(1, 1, n_q, 1) * counts.view(B, 1, 1, n_kv).float()
    out = sums / denom
    return out.masked_fill_((counts == 0).view(B, 1, 1, n_kv), float("-inf"))


@torch.no_grad()
def block_prob_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    block_size: int,
    key_valid: torch.Tensor | None = None,
    chunk_bytes: int = _SCORE_CHUNK_BYTES,
) -> torch.Tensor:
    """Sum of softmax probabilities per (query block, key block) pair, in plain PyTorch.

    Rows are normalised over all attendable keys (the real softmax of the layer). Scores are
    computed in float32 a chunk of query rows at a time, so at most ``chunk_bytes`` of scores
    live at once.

    Args:
        query: (B, Hq, L, D).
        key: (B, Hkv, S, D), Hq % Hkv == 0 (GQA: no repetition is materialised).
        scaling: the attention's softmax scale (the module's ``scaling``).
        key_valid: (B, S) bool, True for real keys; None when all keys are real.
    Returns:
        (B, Hq, nQ, nKV) float32.
    """
    B, Hq, L, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    G = Hq // Hkv
    n_q, n_kv = _num_blocks(L, block_size), _num_blocks(S, block_size)
    k32 = key.float().unsqueeze(2)  # (B, Hkv, 1, S, D)
    masked = None if key_valid is None else ~key_valid.view(B, 1, 1, 1, S)

    # Rows per chunk: whole query blocks, as many as fit the score budget.
    rows = max(1, chunk_bytes // (4 * Hq * S * block_size)) * block_size
    full = (S // block_size) * block_size  # keys in whole blocks; the rest is the short tail block
    out = torch.empty(B, Hq, n_q, n_kv, device=query.device, dtype=torch.float32)
    for r0 in range(0, L, rows):
        r1 = min(L, r0 + rows)
        q32 = query[:, :, r0:r1].float().view(B, Hkv, G, r1 - r0, D)
        scores = torch.matmul(q32, k32.transpose(-1, -2)).mul_(scaling)  # (B, Hkv, G, r, S)
        if masked is not None:
            # masked_fill, not an additive bias: padded keys may hold NaN garbage.
            scores.masked_fill_(masked, float("-inf"))
        # Softmax in place, normalised after the key-block sums (one division per block, not per key).
        row_max = scores.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)
        probs = scores.sub_(row_max).exp_()
        per_key_block = probs[..., :full].unflatten(-1, (full // block_size, block_size)).sum(-1)
        if full < S:
            per_key_block = torch.cat([per_key_block, probs[..., full:].sum(-1, keepdim=True)], -1)
        denom = per_key_block.sum(-1, keepdim=True)
        # A query row whose keys are all masked has no distribution; it adds nothing.
        per_key_block = per_key_block.div_(denom).nan_to_num_(nan=0.0)  # (B, Hkv, G, r, nKV)
        nb = _num_blocks(r1 - r0, block_size)
        per_key_block = torch.nn.functional.pad(per_key_block, (0, 0, 0, nb * block_size - (r1 - r0)))
        sums = per_key_block.view(B, Hkv, G, nb, block_size, n_kv).sum(4)
        out[:, :, r0 // block_size : r0 // block_size + nb] = sums.view(B, Hq, nb, n_kv)
    return out


def block_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    block_size: int,
    key_valid: torch.Tensor | None = None,
    chunk_bytes: int = _SCORE_CHUNK_BYTES,
) -> torch.Tensor:
    """Mean softmax probability of every (query block, key block) pair, per head (PyTorch).

    The mean runs over the (query, attendable key) entries of the pair; key blocks with no
    attendable key get -inf. Shapes as in :func:`block_prob_sums`; returns (B, Hq, nQ, nKV).
    """
    sums = block_prob_sums(query, key, scaling, block_size, key_valid, chunk_bytes)
    counts = key_block_counts(key_valid, key.shape[2], block_size, query.shape[0], query.device)
    return importance_from_sums(sums, query.shape[2], counts, block_size)


def _rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dim, highest first; ties go to the lower index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    arange = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return ranks.scatter_(-1, order, arange)


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
    rows = torch.arange(n_q, device=importance.device)
    cols = rows - col_offset
    ok = (cols >= 0) & (cols < n_cols)
    diag = torch.zeros(n_q, n_cols, dtype=torch.bool, device=importance.device)
    diag[rows[ok], cols[ok]] = True
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
    table = _rank_desc(ranked) < keep_all
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
    table[..., g:] = _rank_desc(gen_importance) < keep_gen
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
