"""Dense bidirectional attention on the fastest SDPA kernel of the device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import policy

__all__ = ["dense_attention"]


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional dense attention (the steps before the switch, and short sequences).

    Args:
        query: (B, Hq, L, D); key, value: (B, Hkv, S, D).
        key_valid: (B, S) bool padding mask or None. Padded keys get probability 0; their
            values must be finite (0 * NaN is NaN), which holds for every model forward (the
            models zero padded embeddings; see `models/_common.zero_padding`).
    Returns:
        (B, Hq, L, D).
    """
    mask = None if key_valid is None else key_valid[:, None, None, :]
    gqa = query.shape[1] != key.shape[1]
    with policy.dense_kernels(query, key, mask):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=False, scale=scaling, enable_gqa=gqa
        )
