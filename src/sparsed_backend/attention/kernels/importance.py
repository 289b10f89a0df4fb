"""Fused block importance on the GPU: two streaming passes over K, no N x N tensor.

Pass 1 computes every query row's log-sum-exp over all attendable keys (online softmax,
QK^T only). Pass 2 recomputes QK^T tile by tile, turns scores into exact probabilities with
that log-sum-exp and writes one sum per (query tile, key tile). Each pass is one QK^T
matmul with no PV matmul, so the pair costs about one dense attention pass.

Programs run over (query tile, batch x head) and, when that leaves the GPU short of work (a
few query rows: a block-diffusion block of 4-64 tokens against a long prefix), over splits of
the key tiles too: pass 1 then writes a partial (max, sum) per split, combined in PyTorch, and
pass 2 needs no combining (each key tile's sum is its own). Without splits one program swept
all 1,024 key tiles of a 128k prefix for each of 32 heads: 32 programs on 132 SMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["tile_prob_sums"]

_LOG2E = 1.4426950408889634

# The integer arguments that change from call to call within one generation are not
# specialised on. Triton compiles a new variant of a kernel for every new combination of its
# integer arguments' classes (divisible by 16, equal to 1, other), and in block diffusion these
# move with every decoded block: the prefix grows by a block, so the grid's front, the key
# length and the number of key tiles change, and a long generation would keep compiling. None of
# these is a stride, and none feeds the vectorised Q/K loads, whose alignment comes from the
# strides. (tests/test_kernels.py counts the compiled variants over a growing prefix.)


@triton.jit(do_not_specialize=["L", "S", "Q_FRONT", "K_FRONT", "SPLIT_N"])
def _lse_kernel(
    Q, K, VALID, M_PART, L_PART,
    sqb, sqh, sqm, skb, skh, skn, L, S, Q_FRONT, K_FRONT, HQ, GROUP, qk_scale, SPLIT_N,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    # 64-bit from here on: b * sqb alone passes 2**31 once batch * heads * length * head_dim does.
    pid_bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    b = pid_bh // HQ
    h = pid_bh % HQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    # Rows before Q_FRONT are zero rows that were never stored (the moved block grid).
    q_row = (offs_m[:, None] >= Q_FRONT) & (offs_m[:, None] < L)
    q = tl.load(Q + b * sqb + h * sqh + (offs_m[:, None] - Q_FRONT) * sqm + offs_d[None, :], mask=q_row, other=0.0)
    k_base = K + b * skb + (h // GROUP) * skh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(split * SPLIT_N, tl.minimum(S, (split + 1) * SPLIT_N), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        live = (offs_n >= K_FRONT) & (offs_n < S)  # keys before K_FRONT: absent (never stored)
        if HAS_VALID:
            live = live & (tl.load(VALID + b * S + offs_n, mask=live, other=0) != 0)
        k = tl.load(k_base + (offs_n[None, :] - K_FRONT) * skn + offs_d[:, None], mask=live[None, :], other=0.0)
        s = tl.dot(q, k) * qk_scale  # log2 domain
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    # This split's (max, sum) per row, log2 domain: (B * HQ, N_SPLIT, L) each.
    part = (pid_bh * tl.num_programs(2) + split) * L + offs_m
    tl.store(M_PART + part, m_i, mask=offs_m < L)
    tl.store(L_PART + part, l_i, mask=offs_m < L)


@triton.jit(do_not_specialize=["L", "S", "Q_FRONT", "K_FRONT", "N_KT", "SPLIT_KT"])
def _block_sum_kernel(
    Q, K, VALID, LSE, OUT,
    sqb, sqh, sqm, skb, skh, skn, L, S, Q_FRONT, K_FRONT, HQ, GROUP, qk_scale, N_KT, SPLIT_KT,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    # 64-bit from here on: b * sqb alone passes 2**31 once batch * heads * length * head_dim does.
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HQ
    h = pid_bh % HQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    # Rows before Q_FRONT are zero rows that were never stored (the moved block grid).
    q_row = (offs_m[:, None] >= Q_FRONT) & (offs_m[:, None] < L)
    q = tl.load(Q + b * sqb + h * sqh + (offs_m[:, None] - Q_FRONT) * sqm + offs_d[None, :], mask=q_row, other=0.0)
    lse = tl.load(LSE + pid_bh * L + offs_m, mask=offs_m < L, other=float("inf"))
    k_base = K + b * skb + (h // GROUP) * skh
    out_base = OUT + (pid_bh * tl.num_programs(0) + pid_m) * N_KT  # int64 through pid_bh
    split = tl.program_id(2)
    for j in range(split * SPLIT_KT, tl.minimum(N_KT, (split + 1) * SPLIT_KT)):
        offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        live = (offs_n >= K_FRONT) & (offs_n < S)  # keys before K_FRONT: absent (never stored)
        if HAS_VALID:
            live = live & (tl.load(VALID + b * S + offs_n, mask=live, other=0) != 0)
        k = tl.load(k_base + (offs_n[None, :] - K_FRONT) * skn + offs_d[:, None], mask=live[None, :], other=0.0)
        s = tl.dot(q, k) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(live[None, :], p, 0.0)
        tl.store(out_base + j, tl.sum(tl.sum(p, 1), 0))


def tile_prob_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    tile: int,
    key_valid: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    q_front: int = 0,
    k_front: int = 0,
    splits: int | None = None,
) -> torch.Tensor:
    """Sum of softmax probabilities over every (query tile, key tile) pair.

    With ``lse`` (the natural-log log-sum-exp rows of the dense pass that just ran, e.g. from
    cuDNN), pass 1 is skipped and the cost drops to one QK^T sweep.

    ``q_front`` / ``k_front`` score the inputs as if ``q_front`` zero query rows and ``k_front``
    absent keys stood before them (a block grid moved by `SparseDConfig.prompt_end_offset`),
    without copying Q and K into padded tensors. ``L = q_front + query rows`` and
    ``S = k_front + keys`` below; ``key_valid``, ``lse`` and the output use those coordinates.

    Args:
        query: (B, Hq, L - q_front, D) CUDA, fp16/bf16/fp32, any strides (a strided last dim is
            copied); D a power of 2 >= 16.
        key: (B, Hkv, S - k_front, D), Hq % Hkv == 0 (read in place: no GQA repetition).
        tile: tile edge in tokens (16, 32, 64 or 128).
        key_valid: (B, S) bool or None (the front keys are never attended, whatever it says).
        lse: (B, Hq, L) float32 natural-log log-sum-exp of each query row, or None.
        splits: how many programs share one (query tile, head)'s key tiles; None: enough for
            about two programs per SM (`key_splits`), 1 whenever the query tiles alone give that.
    Returns:
        (B, Hq, ceil(L / tile), ceil(S / tile)) float32.
    """
    B, Hq, L, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    L, S = L + q_front, S + k_front
    # The kernels take the strides of dims 0-2, so only a strided last dim needs a copy (the
    # models hand over (B, L, H, D) projections transposed to (B, H, L, D): no copy).
    query = query if query.stride(-1) == 1 else query.contiguous()
    key = key if key.stride(-1) == 1 else key.contiguous()
    n_qt, n_kt = triton.cdiv(L, tile), triton.cdiv(S, tile)
    out = torch.empty(B, Hq, n_qt, n_kt, device=query.device, dtype=torch.float32)
    valid = key_valid.to(torch.uint8).contiguous() if key_valid is not None else query  # dummy pointer
    args = (query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2))
    # A block-diffusion block (4-64 queries) fits one query tile: a 16-row (or next power of two)
    # program there, not 128 rows of which all but a few are zero.
    block_m = min(tile, max(16, triton.next_power_of_2(L)))
    common = dict(HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=tile, HAS_VALID=key_valid is not None)
    warps = 8 if tile >= 128 and block_m >= 64 else 4
    splits = key_splits(n_qt * B * Hq, n_kt, query.device) if splits is None else max(1, min(splits, n_kt))
    split_kt = triton.cdiv(n_kt, splits)  # key tiles per split; the last split may hold fewer
    splits = triton.cdiv(n_kt, split_kt)
    grid = (n_qt, B * Hq, splits)
    qk_scale = scaling * _LOG2E
    if lse is None:
        m_part = torch.empty(B * Hq, splits, L, device=query.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        _lse_kernel[grid](
            query, key, valid, m_part, l_part, *args, L, S, q_front, k_front, Hq, Hq // Hkv, qk_scale,
            split_kt * tile, **common, num_warps=warps, num_stages=3,
        )  # fmt: skip
        lse = combine_splits(m_part, l_part).view(B, Hq, L)
    else:
        lse = (lse.float() * _LOG2E).reshape(B, Hq, L).contiguous()  # the kernels work in log2
    _block_sum_kernel[grid](
        query, key, valid, lse, out, *args, L, S, q_front, k_front, Hq, Hq // Hkv, qk_scale, n_kt, split_kt,
        **common, num_warps=warps, num_stages=3,
    )  # fmt: skip
    return out


def key_splits(programs: int, n_kt: int, device: torch.device) -> int:
    """Splits of the key tiles that give about two programs per SM (1 when ``programs`` already
    does, never more than the ``n_kt`` key tiles)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(n_kt, triton.cdiv(2 * sms, programs)))


def combine_splits(m_part: torch.Tensor, l_part: torch.Tensor) -> torch.Tensor:
    """Rows' log2 log-sum-exp from per-split (max, sum of 2^(s - max)), both (R, splits, L):
    (R, L) float32, +inf for a row with no attendable key (it then adds 0 in pass 2)."""
    top = m_part.amax(1, keepdim=True)  # (R, 1, L)
    safe = torch.where(top == float("-inf"), 0.0, top)
    total = (l_part * torch.exp2(m_part - safe)).sum(1)  # a split with no key: l 0, m -inf -> 0
    return torch.where(total > 0, safe.squeeze(1) + torch.log2(total), float("inf"))
