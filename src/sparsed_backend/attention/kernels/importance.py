"""Fused block importance on the GPU: two streaming passes over K, no N x N tensor.

Pass 1 computes every query row's log-sum-exp over all attendable keys (online softmax,
QK^T only). Pass 2 recomputes QK^T tile by tile, turns scores into exact probabilities with
that log-sum-exp and writes one sum per (query tile, key tile). Each pass is one QK^T
matmul with no PV matmul, so the pair costs about one dense attention pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["tile_prob_sums"]

_LOG2E = 1.4426950408889634


@triton.jit
def _lse_kernel(
    Q, K, VALID, LSE,
    sqb, sqh, sqm, skb, skh, skn, L, S, Q_FRONT, K_FRONT, HQ, GROUP, qk_scale,
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
    k_base = K + b * skb + (h // GROUP) * skh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, S, BLOCK_N):
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
    lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("inf"))  # inf: a row with no key adds 0
    tl.store(LSE + pid_bh * L + offs_m, lse, mask=offs_m < L)


@triton.jit
def _block_sum_kernel(
    Q, K, VALID, LSE, OUT,
    sqb, sqh, sqm, skb, skh, skn, L, S, Q_FRONT, K_FRONT, HQ, GROUP, qk_scale, N_KT,
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
    for j in range(0, N_KT):
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
    common = dict(HEAD_DIM=D, BLOCK_M=tile, BLOCK_N=tile, HAS_VALID=key_valid is not None)
    warps = 8 if tile >= 128 else 4
    grid = (n_qt, B * Hq)
    qk_scale = scaling * _LOG2E
    if lse is None:
        lse = torch.empty(B, Hq, L, device=query.device, dtype=torch.float32)
        _lse_kernel[grid](
            query,
            key,
            valid,
            lse,
            *args,
            L,
            S,
            q_front,
            k_front,
            Hq,
            Hq // Hkv,
            qk_scale,
            **common,
            num_warps=warps,
            num_stages=3,
        )
    else:
        lse = (lse.float() * _LOG2E).reshape(B, Hq, L).contiguous()  # the kernels work in log2
    _block_sum_kernel[grid](
        query, key, valid, lse, out, *args, L, S, q_front, k_front, Hq, Hq // Hkv, qk_scale, n_kt,
        **common, num_warps=warps, num_stages=3,
    )  # fmt: skip
    return out
