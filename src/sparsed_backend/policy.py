"""Per-device choices of the fast path: dense kernel, flex kernel options, when to stay dense.

Every rule here is a measurement on a named device (see benchmarks/results/); where nothing
was measured the rule is the neutral one and says so.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention.flex_attention import BlockMask

from . import selection
from .config import SparseDConfig

__all__ = ["dense_kernels", "flex_kernel_options", "min_sparse_len", "block_importance"]


def dense_kernels(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None):
    """Context that steers SDPA to the fastest dense kernel for these inputs.

    On CPU SDPA's own choice is used.
    """
    return contextlib.nullcontext()


def flex_kernel_options(query: torch.Tensor, block_mask: BlockMask) -> dict | None:
    """FlexAttention kernel options for this shape (None: FlexAttention's defaults)."""
    return None


def min_sparse_len(config: SparseDConfig, device: torch.device) -> int:
    """Shortest kv length at which sparse steps are used; shorter sequences stay dense."""
    if config.min_sparse_len is not None:
        return config.min_sparse_len
    return 0


def block_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    block_size: int,
    key_valid: torch.Tensor | None,
) -> torch.Tensor:
    """Block importance on the fastest implementation for the device. (B, Hq, nQ, nKV) fp32."""
    return selection.block_importance(query, key, scaling, block_size, key_valid)
