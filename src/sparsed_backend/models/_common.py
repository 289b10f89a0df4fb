"""Small pieces both model ports share."""

from __future__ import annotations

import torch
from torch import nn


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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv * n_rep, L, D), each kv head repeated for its query group."""
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; mask is transformers' additive (B, 1, Lq, Lk) eager mask."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (B, L, Hq, D)
    return out, probs


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back before the weight (LLaDA's RMSLayerNorm, Qwen2RMSNorm)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
