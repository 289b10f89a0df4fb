"""Ranks along the last dimension, highest first, ties to the lower index: the one rank helper
behind block selection (top-k key blocks) and the samplers (top-k tokens to unmask)."""

from __future__ import annotations

import torch

__all__ = ["rank_desc", "top_count"]


def rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dim (0 = highest); equal scores rank by index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def top_count(scores: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """Bool mask of the ``count`` highest entries of every row along the last dim.

    ``count`` broadcasts against ``scores[..., :1]``, so k may differ per row and stay on the
    device: a fixed-shape top-k with no host sync.
    """
    return rank_desc(scores) < count
