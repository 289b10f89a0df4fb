"""Eager float64 oracle for attention and block selection, used by tests and benchmarks.

Written for clarity, not speed: every function materialises N x N tensors. It never imports
the fast path (attention, selection, masks), so it can judge it.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "attention_reference",
    "block_importance_reference",
    "topk_table_reference",
    "expand_table",
]


def expand_table(table: torch.Tensor, block_size: int, q_len: int, kv_len: int) -> torch.Tensor:
    """(B, H, nQ, nKV) block table -> (B, H, q_len, kv_len) token mask."""
    tok = table.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return tok[..., :q_len, :kv_len]


def attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """softmax(scaling * q k^T) v over the allowed (query, key) pairs, in ``dtype``.

    Args:
        query: (B, Hq, L, D); key, value: (B, Hkv, S, D) with Hq % Hkv == 0.
        key_valid: (B, S) bool, False for padding keys.
        token_mask: (B, Hq, L, S) bool (or broadcastable), False for pairs to drop.
    Returns:
        (B, Hq, L, D) in ``dtype``. Rows with no allowed key are 0.
    """
    B, Hq, L, _ = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    rep = Hq // Hkv
    k = key.to(dtype).repeat_interleave(rep, dim=1)
    v = value.to(dtype).repeat_interleave(rep, dim=1)
    allowed = torch.ones(B, Hq, L, S, dtype=torch.bool, device=query.device)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
        # Padded values may hold garbage (tests poison them with NaN): they get weight 0.
        v = torch.where(key_valid[:, None, :, None], v, torch.zeros((), dtype=dtype, device=v.device))
        k = torch.where(key_valid[:, None, :, None], k, torch.zeros((), dtype=dtype, device=k.device))
    if token_mask is not None:
        allowed = allowed & token_mask
    scores = torch.matmul(query.to(dtype), k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, v)


def block_importance_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    block_size: int,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean softmax probability per (query block, key block), float64, the slow way.

    The mean runs over the (query, attendable key) entries of each pair; key blocks with no
    attendable key are -inf. Returns (B, Hq, nQ, nKV).
    """
    B, Hq, L, _ = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    k = key.double().repeat_interleave(Hq // Hkv, dim=1)
    valid = torch.ones(B, S, dtype=torch.bool, device=query.device) if key_valid is None else key_valid
    k = torch.where(valid[:, None, :, None], k, torch.zeros((), dtype=k.dtype, device=k.device))
    scores = torch.matmul(query.double(), k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    n_q, n_kv = math.ceil(L / block_size), math.ceil(S / block_size)
    out = torch.empty(B, Hq, n_q, n_kv, dtype=torch.float64)
    for i in range(n_q):
        rows = slice(i * block_size, min(L, (i + 1) * block_size))
        for j in range(n_kv):
            cols = slice(j * block_size, min(S, (j + 1) * block_size))
            n_keys = valid[:, cols].sum(-1)  # (B,)
            total = probs[:, :, rows, cols].sum(dim=(-1, -2))  # (B, Hq)
            n_rows = rows.stop - rows.start
            mean = total / (n_rows * n_keys.clamp(min=1)).double()[:, None]
            out[:, :, i, j] = torch.where(n_keys[:, None] > 0, mean, float("-inf"))
    return out


def _kept(select: float, n: int) -> int:
    if n == 0:
        return 0
    return max(1, min(n, math.ceil(select * n - 1e-9)))


def topk_table_reference(
    importance: torch.Tensor,
    select: float,
    gen_start_block: int | None = None,
    generation_share: bool = True,
    gen_importance: torch.Tensor | None = None,
    keep_column: int | None = None,
    prompt_rows_give_gen: bool = False,
) -> torch.Tensor:
    """SparseD's selection in plain Python loops: (B, H, nQ, nKV) importance -> bool table.

    Per row: keep the ceil(select * n) attendable blocks with the highest importance (ties to
    the lower index); with a generation region from ``gen_start_block`` on, prompt blocks
    keep their global top-k membership and generation blocks get their own top-k, ranked by
    ``gen_importance`` (B, H, nQ, nKV - gen_start_block): the importance under a softmax over
    the generation keys alone.

    ``keep_column`` (a rule other than "paper"): every row whose block ``keep_column`` is
    attendable keeps it, in place of its lowest-ranked kept prompt block (its lowest-ranked
    kept generation block when no prompt block is kept), so the row keeps as many blocks;
    with ``prompt_rows_give_gen`` rows before ``gen_start_block`` give up a generation block first.
    """
    B, H, n_q, n_kv = importance.shape
    table = torch.zeros(B, H, n_q, n_kv, dtype=torch.bool)
    imp = importance.double().cpu().tolist()

    def top(row: list[float], cols: list[int]) -> set[int]:
        live = [j for j in cols if math.isfinite(row[j])]
        ranked = sorted(live, key=lambda j: (-row[j], j))
        return set(ranked[: _kept(select, len(live))])

    split = gen_start_block is not None and generation_share and 0 < gen_start_block < n_kv
    for b in range(B):
        for h in range(H):
            for i in range(n_q):
                row = imp[b][h][i]
                keep = top(row, list(range(n_kv)))
                if split:
                    g = gen_start_block
                    gen_row = [float("nan")] * g + gen_importance[b, h, i].double().cpu().tolist()
                    keep = {j for j in keep if j < g} | top(gen_row, list(range(g, n_kv)))
                if keep_column is not None and math.isfinite(row[keep_column]) and keep_column not in keep:
                    g = gen_start_block if split else n_kv
                    prompt = sorted((j for j in keep if j < g), key=lambda j: (-row[j], j))
                    gen = sorted((j for j in keep if j >= g), key=lambda j: (-gen_row[j], j))
                    if prompt_rows_give_gen and split and i < g and gen:
                        keep = set(prompt) | set(gen[:-1])
                    else:
                        keep = (set(prompt[:-1]) | set(gen)) if prompt else set(gen[:-1])
                    keep.add(keep_column)
                for j in keep:
                    table[b, h, i, j] = True
    return table
