"""Small pieces both model ports share."""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from ..sampling.kv_cache import window_attention_mask

# The elementwise work around the matmuls (fp32 RMSNorm, fp32 RoPE, SwiGLU) ran as ~40 separate
# kernels per layer in eager mode: 26 ms of a 175 ms LLaDA-8B layer at 64k tokens on the H100
# (benchmarks/results/profile_step_64k.txt). On CUDA each helper below runs as one compiled
# kernel instead. SPARSED_FUSED_OPS=0 keeps them eager (for debugging); CPU is always eager.
_FUSE = os.environ.get("SPARSED_FUSED_OPS", "1") != "0"


def cuda_fused(fn):
    """``fn`` through ``torch.compile`` (dynamic shapes) when its first argument is a CUDA tensor.

    Eager on other devices, inside a caller's own compiled region (dynamo inlines ``fn``), and
    with SPARSED_FUSED_OPS=0. The compiled and eager functions compute the same expression.
    """
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if _FUSE and args[0].is_cuda and not torch.compiler.is_compiling():
            if compiled is None:
                compiled = torch.compile(fn, dynamic=True, fullgraph=True)
            return compiled(*args)
        return fn(*args)

    wrapper.eager = fn
    return wrapper


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


def zero_padding(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the embeddings of padded positions, once per forward.

    Attention gives padded keys probability 0, but 0 * NaN is NaN: a padded position must carry
    finite values. Zeroed inputs keep every layer's padded K/V finite, so the attention backends
    never copy K and V to clean them. Only a 2D (B, L) padding mask is read; others pass through.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return inputs_embeds
    keep = attention_mask.to(device=inputs_embeds.device, dtype=torch.bool)[..., None]
    return inputs_embeds.masked_fill(~keep, 0)


def tensor_parallel_size(config) -> int:
    """The TP size ``from_pretrained(distributed_config=...)`` will shard this model over (1: none).

    transformers puts the DistributedConfig (its ``tp_size`` already resolved from the world
    size) on the config before it builds the model, so the model can check its shapes early.
    """
    dist_config = getattr(config, "distributed_config", None)
    size = getattr(dist_config, "tp_size", None)
    return 1 if size is None else int(size)


def check_tensor_parallel_heads(config, num_heads: int, num_kv_heads: int) -> None:
    """Raise ValueError unless every TP rank gets whole query heads and whole GQA groups.

    Column-wise q/k/v hand rank r the r-th contiguous slice of the query heads and of the kv
    heads. When both head counts divide by the TP size, the slices line up: the query heads
    of a rank are exactly the groups of its own kv heads, so attention needs no communication.
    Anything else would split a head or pair a query head with another rank's kv head.
    """
    tp = tensor_parallel_size(config)
    if tp <= 1:
        return
    if num_heads % tp or num_kv_heads % tp:
        raise ValueError(
            f"tensor parallelism needs the attention heads and the key/value heads to divide by the "
            f"TP size (distributed_config.tp_size={tp}), got {num_heads} attention heads and "
            f"{num_kv_heads} key/value heads; use a TP size that divides {math.gcd(num_heads, num_kv_heads)}"
        )


def forward_inputs(config, inputs_embeds, attention_mask, position_ids, kv_cache, attention_kwargs: dict):
    """What a model forward hands its layers: (zero-padded embeddings, position ids, mask).

    A full forward gets transformers' bidirectional mask for its attention implementation. A
    cached step (``kv_cache.window`` set: the inputs are the positions ``[start, stop)`` of the
    sequence) gets the key padding mask over the whole sequence and positions from ``start``,
    and ``query_start`` joins ``attention_kwargs`` for the attention function. ``kv_cache``
    joins them whenever it is given (the attention modules call its ``update``).
    """
    window = None if kv_cache is None else kv_cache.window
    start = 0 if window is None else window[0]
    if position_ids is None:
        position_ids = torch.arange(start, start + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
    rows = attention_mask
    if window is None:
        mask = create_bidirectional_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
    else:  # queries are the window, keys the whole sequence
        mask = window_attention_mask(attention_mask, config._attn_implementation, inputs_embeds.dtype)
        rows = None if attention_mask is None else attention_mask[:, window[0] : window[1]]
        attention_kwargs["query_start"] = start
    if kv_cache is not None:
        attention_kwargs["kv_cache"] = kv_cache
    return zero_padding(inputs_embeds, rows), position_ids, mask


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


@cuda_fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, cast back to the input dtype before the weight."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


@cuda_fused
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up."""
    return nn.functional.silu(gate) * up


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back before the weight (LLaDA's RMSLayerNorm, Qwen2RMSNorm)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
