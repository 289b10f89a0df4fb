"""Small pieces both model ports share."""

from __future__ import annotations

import torch


def keep_positions(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """Hidden states of the positions whose logits are wanted, before the LM head.

    (transformers >= 5.2x has ``slice_logits_to_keep``; 5.17 does not, so we carry our own.)

    Args:
        hidden_states: (B, L, H).
        logits_to_keep: an int keeps the last N positions (0 keeps all); a 1D LongTensor keeps
            those sequence indices for every row.
    Returns:
        (B, K, H).
    """
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() != 1:
            raise ValueError(
                f"logits_to_keep must be an int or a 1D index tensor, got shape {tuple(logits_to_keep.shape)}"
            )
        return hidden_states.index_select(1, logits_to_keep.to(hidden_states.device))
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 or a 1D index tensor, got {logits_to_keep!r}")
    return hidden_states if logits_to_keep == 0 else hidden_states[:, -logits_to_keep:]
