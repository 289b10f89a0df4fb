"""Block-sparse attention for a few query rows, reading the kept prefix blocks in place.

A block-diffusion sparse step attends 4-64 queries to each head's kept prefix blocks plus the
block itself. `prefix_selection.gathered_attention` copies those keys out of the cache (a
gather per step) and calls SDPA; for so few rows SDPA parallelises over heads only, so a single
GPU wave does little work. This kernel instead:

- packs a selection head's query heads into one program (per KV head selection: the GQA group's
  4 heads x L rows share every K/V tile, which is read once);
- splits the kept blocks over programs (split-KV, as flash-decoding does), each writing a partial
  (output, max, sum) that PyTorch combines;
- reads each kept block where the cache holds it (the grid's short first block starts ``front``
  positions before position 0; those positions are skipped), and the block's own keys after the
  prefix.

The prefix length and the grid's front are read from a device tensor (``offsets``), so a CUDA
graph captured once replays every block with the same number of kept blocks: the graphed
sparse steps of `decode_graphs.GraphedDecoder` use it. Checked against the gather on the GPU
(bf16, ``tests/test_kernels.py``) and under Triton's CPU interpreter (fp32/fp16).

`decode_attention_with_block_mass` runs the same kernel with one program per listed block, so
each block's softmax partials stay apart: listing every prefix block gives dense attention and,
from the partials, the probability mass per block that a selecting step ranks, in one sweep
(the separate scorer sweeps the prefix again). Checked under the CPU interpreter against dense
attention and `prefix_selection.prefix_block_mass` (fp32, 96 shapes); its CUDA test has not run
yet. The opt-in ``PrefixSparseConfig(scorer="fused")`` uses it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..policy import DECODE_KERNEL_ROWS, decode_block_size_refusal

__all__ = [
    "decode_attention_with_block_mass",
    "decode_offsets",
    "dense_decode_attention",
    "dense_decode_splits",
    "sparse_decode_attention",
]

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["L", "S", "VS", "N_KEPT", "PER_SPLIT"])
def _sparse_decode_kernel(
    Q, K, V, BLOCKS, OFFSETS, VALID, O_PART, M_PART, L_PART,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    L, S, VS, N_KEPT, PER_SPLIT, H, GQ, GROUP, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GRID: tl.constexpr,
    HAS_VALID: tl.constexpr, SPLIT_OWN: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = pid_bh // H
    h = pid_bh % H  # selection head: its query heads h * GQ .. h * GQ + GQ - 1
    kv = (h * GQ) // GROUP  # the key/value head they read
    rows = tl.arange(0, BLOCK_M)  # row r: query head h * GQ + r // L, query r % L
    live_row = rows < GQ * L
    q_head = h * GQ + rows // L
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + b * sqb + q_head[:, None] * sqh + (rows % L)[:, None] * sqm + offs_d[None, :],
        mask=live_row[:, None], other=0.0,
    )  # fmt: skip
    k_base = K + b * skb + kv * skh
    v_base = V + b * svb + kv * svh
    # Read on the device, so a captured graph replays any block: the selection's prefix end (where
    # the keys read whole begin), the grid's front, and the key length (where they end).
    OWN_START = tl.load(OFFSETS).to(tl.int32)
    FRONT = tl.load(OFFSETS + 1).to(tl.int32)
    OWN_STOP = tl.load(OFFSETS + 2).to(tl.int32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Work items: the kept blocks of this head, then the keys read whole: all in the last split,
    # or with SPLIT_OWN a share of them in every split (whole BLOCK_N tiles; a split past their
    # end reads none).
    first = tl.minimum(split * PER_SPLIT, N_KEPT)  # splits past the listed blocks list none
    last = tl.minimum(N_KEPT, first + PER_SPLIT)
    if SPLIT_OWN:
        share = tl.cdiv(tl.cdiv(OWN_STOP - OWN_START, n_splits), BLOCK_N) * BLOCK_N
        own_lo = OWN_START + split * share
        own_hi = tl.minimum(own_lo + share, OWN_STOP)
        own = split >= 0  # every split
    else:
        own_lo = OWN_START
        own_hi = OWN_STOP
        own = split == n_splits - 1
    for j in range(first, last + own.to(tl.int32)):
        if j < last:
            grid_block = tl.load(BLOCKS + pid_bh * N_KEPT + j).to(tl.int32)  # both branches' bounds are int32
            start = grid_block * GRID - FRONT
            stop = tl.where(grid_block < 0, start, start + GRID)  # a negative entry pads a shorter list
        else:
            start = own_lo
            stop = own_hi
        for c in range(0, stop - start, BLOCK_N):
            offs_n = start + c + tl.arange(0, BLOCK_N)
            live = (offs_n >= 0) & (offs_n < stop) & (offs_n < S)
            if HAS_VALID:
                live = live & (offs_n < VS)
                live = live & (tl.load(VALID + b * VS + offs_n, mask=live, other=0) != 0)
            k = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None], mask=live[None, :], other=0.0)
            s = tl.dot(q, k) * qk_scale  # log2 domain
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no live key yet
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=live[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
    part = (pid_bh * n_splits + split) * BLOCK_M + rows
    tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc)
    tl.store(M_PART + part, m_i)
    tl.store(L_PART + part, l_i)


def decode_splits(programs: int, kept: int, device: torch.device) -> int:
    """Kept-block splits per head: about two programs per SM in all, at least one block each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(kept, triton.cdiv(2 * sms, max(1, programs))))


def decode_offsets(prefix_len: int, front: int, key_len: int, device: torch.device) -> torch.Tensor:
    """The ``offsets`` tensor `sparse_decode_attention` reads: (3,) int32 (prefix_len, front,
    key_len). The listed blocks lie on the grid of the first ``prefix_len`` positions; the keys
    from ``prefix_len`` to ``key_len`` are all read (the block's own, and with a reused selection
    the positions committed since it)."""
    return torch.tensor([prefix_len, front, key_len], dtype=torch.int32, device=device)


def sparse_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    blocks: torch.Tensor,
    offsets: torch.Tensor,
    block_size: int,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Attention of ``query`` to each head's kept prefix blocks and the block's own keys.

    What `prefix_selection.gathered_attention` computes from `sparse_gather`'s index, without
    copying keys.

    Args:
        query: (B, Hq, L, D), D a power of 2 >= 16; the block's L queries.
        key, value: (B, Hkv, S, D), S >= key_len (the cache's views or whole storage): the
            committed prefix, then the block's own L keys ending at ``key_len``.
        blocks: (B, H, k) int64 kept grid blocks per selection head, H = Hq (per query head)
            or Hkv (per KV head); grid block g covers positions [g * block_size - front,
            (g + 1) * block_size - front) (the short first block starts before 0); a negative
            entry reads nothing (a head with fewer kept blocks pads its list with -1).
        offsets: (3,) int32 on the query's device, (prefix_len, front, key_len)
            (`decode_offsets`): read by the kernel, so a CUDA graph captured once replays every
            block whose shapes match. The keys from prefix_len to key_len are all read.
        key_valid: (B, S') bool or None: keys a query may attend (left padding); keys at
            S' or after are not attended.
        splits: kept-block splits per head; None: `decode_splits`.
    Returns:
        (B, Hq, L, D) in the query's dtype.
    """
    B, H, n_kept = blocks.shape
    splits = decode_splits(B * H, max(1, n_kept), query.device) if splits is None else max(1, splits)
    per_split = max(1, triton.cdiv(n_kept, splits))
    splits = max(1, triton.cdiv(n_kept, per_split))
    parts = _launch(query, key, value, blocks, offsets, block_size, scaling, key_valid, per_split, splits)
    return _combine(query, H, *parts)[0]


def dense_decode_splits(programs: int, key_capacity: int, device: torch.device) -> int:
    """Splits of the key range per program for `dense_decode_attention`: about two programs per
    SM in all, and no split shorter than 256 keys at ``key_capacity`` (the longest key range
    the splits must serve: a captured graph keeps its count)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(triton.cdiv(key_capacity, 256), triton.cdiv(2 * sms, max(1, programs))))


def dense_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    offsets: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Dense attention of a few query rows to the keys ``[0, key_len)``, split over programs
    (flash-decoding's split-KV): each KV head's query heads share one program per split while
    their rows fit one (`policy.DECODE_KERNEL_ROWS`; else one program per query head), and the
    key range is cut into ``splits`` equal shares, so a batch of one still fills the GPU (SDPA's
    kernels parallelise over batch x heads x 128-row query tiles only). The key length is read
    from ``offsets`` on the device, so one captured CUDA graph serves every block.

    Args:
        query: (B, Hq, L, D), D a power of 2 >= 16.
        key, value: (B, Hkv, S, D), S >= key_len (the cache's whole storage may be passed).
        offsets: (3,) int32 (`decode_offsets(0, 0, key_len)`): every key before key_len is read.
        key_valid: (B, S') bool or None: keys a query may attend (left padding).
        splits: shares of the key range per program; None: `dense_decode_splits` for S keys.
    Returns:
        (B, Hq, L, D) in the query's dtype.
    """
    B, Hq, L = query.shape[:3]
    Hkv = key.shape[1]
    # A GQA group's heads share a program while their rows fit one (`policy.DECODE_KERNEL_ROWS`);
    # else one program per query head (each reads its group's K/V).
    heads = Hkv if Hq // Hkv * L <= DECODE_KERNEL_ROWS else Hq
    if splits is None:
        splits = dense_decode_splits(B * heads, key.shape[2], query.device)
    blocks = torch.empty(B, heads, 0, dtype=torch.long, device=query.device)  # no listed block
    parts = _launch(query, key, value, blocks, offsets, 64, scaling, key_valid, 1, max(1, splits), split_own=True)
    return _combine(query, heads, *parts)[0]


def decode_attention_with_block_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    blocks: torch.Tensor,
    offsets: torch.Tensor,
    block_size: int,
    scaling: float,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sparse_decode_attention` with one program per listed block and one for the block's own
    keys, so each block's softmax partials are its own: returns also the probability mass the
    selection head's rows (its query heads x the L queries) put on each listed block. Listing
    every prefix block gives dense attention and the mass a block-diffusion selecting step ranks
    (`prefix_selection.prefix_block_mass`, summed over a selection head's query heads), in one
    sweep over the keys.

    Args: as `sparse_decode_attention` (``blocks`` (B, H, k): the blocks to score).
    Returns:
        ((B, Hq, L, D) output in the query's dtype, (B, H, k) float32 mass per listed block).
    """
    B, H, n_kept = blocks.shape
    o_part, m_part, l_part = _launch(query, key, value, blocks, offsets, block_size, scaling, key_valid, 1, n_kept + 1)
    out, w, total = _combine(query, H, o_part, m_part, l_part)
    live = query.shape[1] // H * query.shape[2]  # the rows that are queries (the others pad the tile)
    shares = (l_part[:, :n_kept, :live] * w[:, :n_kept, :live]) / total[:, None, :live]  # (BH, k, rows)
    return out, shares.sum(-1).view(B, H, n_kept)


def _launch(query, key, value, blocks, offsets, block_size, scaling, key_valid, per_split, splits, split_own=False):
    """One kernel launch over (B * H, splits) programs; returns the fp32 partials (output, max,
    sum) per program and row. ``split_own``: the keys read whole are shared out over every split
    (else the last split reads them all)."""
    B, Hq, L, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    H, n_kept = blocks.shape[1], blocks.shape[2]
    gq = Hq // H  # query heads per selection head
    block_m = max(16, triton.next_power_of_2(gq * L))
    refusal = decode_block_size_refusal(block_size)
    if refusal is not None:
        raise ValueError(refusal)
    block_n = min(block_size, 64)
    query = query if query.stride(-1) == 1 else query.contiguous()
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    blocks = blocks.contiguous()
    o_part = torch.empty(B * H, splits, block_m, D, device=query.device, dtype=torch.float32)
    m_part = torch.empty(B * H, splits, block_m, device=query.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    listed = blocks if blocks.numel() else offsets  # with no block listed, a pointer never read
    valid = key_valid.to(torch.uint8).contiguous() if key_valid is not None else listed  # dummy pointer
    strides = (*query.stride()[:3], *key.stride()[:3], *value.stride()[:3])
    _sparse_decode_kernel[(B * H, splits)](
        query, key, value, listed, offsets, valid, o_part, m_part, l_part, *strides,
        L, S, valid.shape[-1], n_kept, per_split, H, gq, Hq // Hkv, scaling * _LOG2E,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, GRID=block_size, HAS_VALID=key_valid is not None,
        SPLIT_OWN=split_own, num_warps=4, num_stages=2,
    )  # fmt: skip
    return o_part, m_part, l_part


def _combine(query, H, o_part, m_part, l_part):
    """The programs' partials combined per row: ((B, Hq, L, D) output, each program's weight
    exp2(max - row max) (BH, splits, M), each row's total (BH, M))."""
    B, Hq, L, D = query.shape
    gq = Hq // H  # query heads per selection head
    m = m_part.amax(1, keepdim=True)
    w = torch.exp2(m_part - m.where(m > float("-inf"), 0.0))  # (BH, splits, M)
    total = (l_part * w).sum(1).clamp_min(1e-30)  # (BH, M)
    out = (o_part * w[..., None]).sum(1) / total[..., None]  # (BH, M, D)
    out = out[:, : gq * L].view(B, H, gq, L, D).reshape(B, Hq, L, D)
    return out.to(query.dtype), w, total
