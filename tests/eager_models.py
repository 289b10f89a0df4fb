"""Independent eager forwards of LLaDA and Dream, computed straight from a state dict.

Written for the tests from the published architectures, sharing no code with
``sparsed_backend.models``: RoPE by explicit half rotation (x1 cos - x2 sin, x2 cos + x1 sin),
GQA by ``repeat_interleave``, padding by -inf on padded keys, everything in the dtype asked
for (float64 for a golden result). Returns the logits at every position (B, L, V), unshifted.
"""

from __future__ import annotations

import math

import torch


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x (B, H, L, D); positions (B, L)."""
    d = x.shape[-1]
    half = d // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2.0 / d)  # (D/2,)
    angle = positions.to(torch.float64)[:, None, :, None] * freq  # (B, 1, L, D/2)
    cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _attention(q, k, v, key_mask: torch.Tensor | None) -> torch.Tensor:
    """q (B, Hq, L, D), k/v (B, Hkv, L, D), key_mask (B, L) bool -> (B, L, Hq * D)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v)
    b, h, n, d = out.shape
    return out.permute(0, 2, 1, 3).reshape(b, n, h * d)


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, n, width = x.shape
    return x.reshape(b, n, n_heads, width // n_heads).permute(0, 2, 1, 3)


def _inputs(input_ids, attention_mask, position_ids):
    b, n = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(n).expand(b, n)
    key_mask = None if attention_mask is None else attention_mask.bool()
    return position_ids, key_mask


def llada_logits(
    sd: dict[str, torch.Tensor],
    cfg: dict,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """LLaDA-8B math: RMSNorm, RoPE, bidirectional MHA/GQA, SwiGLU (ff_proj gate, up_proj)."""
    w = {k.removeprefix("model.transformer."): v.to(dtype) for k, v in sd.items()}
    positions, key_mask = _inputs(input_ids, attention_mask, position_ids)
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    n_heads = cfg["n_heads"]
    n_kv = cfg.get("n_kv_heads") or n_heads
    h = w["wte.weight"][input_ids]
    for i in range(cfg["n_layers"]):
        p = f"blocks.{i}."
        x = _rms(h, w[p + "attn_norm.weight"], eps)
        q = _rope(_heads(x @ w[p + "q_proj.weight"].T, n_heads), positions, theta)
        k = _rope(_heads(x @ w[p + "k_proj.weight"].T, n_kv), positions, theta)
        v = _heads(x @ w[p + "v_proj.weight"].T, n_kv)
        h = h + _attention(q, k, v, key_mask) @ w[p + "attn_out.weight"].T
        x = _rms(h, w[p + "ff_norm.weight"], eps)
        gate = x @ w[p + "ff_proj.weight"].T
        up = x @ w[p + "up_proj.weight"].T
        h = h + (gate * torch.sigmoid(gate) * up) @ w[p + "ff_out.weight"].T
    h = _rms(h, w["ln_f.weight"], eps)
    return h @ w["ff_out.weight"].T


def dream_logits(
    sd: dict[str, torch.Tensor],
    cfg: dict,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Qwen2 math (q/k/v biases, GQA), bidirectional; the raw (unshifted) logits."""
    w = {k: v.to(dtype) for k, v in sd.items()}
    positions, key_mask = _inputs(input_ids, attention_mask, position_ids)
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    h = w["model.embed_tokens.weight"][input_ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        x = _rms(h, w[p + "input_layernorm.weight"], eps)
        q = x @ w[a + "q_proj.weight"].T + w[a + "q_proj.bias"]
        k = x @ w[a + "k_proj.weight"].T + w[a + "k_proj.bias"]
        v = x @ w[a + "v_proj.weight"].T + w[a + "v_proj.bias"]
        q = _rope(_heads(q, n_heads), positions, theta)
        k = _rope(_heads(k, n_kv), positions, theta)
        h = h + _attention(q, k, _heads(v, n_kv), key_mask) @ w[a + "o_proj.weight"].T
        x = _rms(h, w[p + "post_attention_layernorm.weight"], eps)
        gate = x @ w[p + "mlp.gate_proj.weight"].T
        up = x @ w[p + "mlp.up_proj.weight"].T
        h = h + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    h = _rms(h, w["model.norm.weight"], eps)
    return h @ w["lm_head.weight"].T
