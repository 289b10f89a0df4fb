"""Every private or version-dependent torch and transformers API the package touches, in one place.

Each entry names the versions it was checked on: torch 2.11 (the H100 machine) and 2.13 (the
CPU machines and CI); transformers 5.17 (the GPU machine, ``nox -s tests_oldest``) and 5.25.
``missing()`` lists entries the installed versions lack; the test suite asserts it is empty, so
an upgrade that moves one of them fails a test, not a user.
"""

from __future__ import annotations

import inspect

import torch
from torch.nn.attention import sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

__all__ = [
    "CHECKED_TORCH",
    "CHECKED_TRANSFORMERS",
    "ROPE_INIT_FUNCTIONS",
    "RecompileLimitHit",
    "SDPA_HAS_PRIORITY",
    "FROM_KV_BLOCKS_HAS_COMPUTE_Q_BLOCKS",
    "compile_counters",
    "compile_disabled",
    "cudnn_attention_with_lse",
    "dynamic_rope_update",
    "fail_past_recompile_limit",
    "missing",
    "rope_init_config",
]

CHECKED_TORCH = ("2.11", "2.13")
CHECKED_TRANSFORMERS = ("5.17", "5.25")

# torch._dynamo.exc.FailOnRecompileLimitHit (2.11, 2.13): raised instead of running eagerly
# once a compiled function passes its recompile limit, when fail_on_recompile_limit_hit is set.
RecompileLimitHit = getattr(getattr(torch._dynamo, "exc", None), "FailOnRecompileLimitHit", None)

# sdpa_kernel(..., set_priority=True) (public, added in 2.6): the backend list is a priority order.
SDPA_HAS_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters

# BlockMask.from_kv_blocks(compute_q_blocks=...) (2.11, 2.13): skip the transposed (backward)
# block lists, which inference never reads.
FROM_KV_BLOCKS_HAS_COMPUTE_Q_BLOCKS = "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


def compile_disabled() -> bool:
    """True when torch.compile is switched off (TORCH_COMPILE_DISABLE / TORCHDYNAMO_DISABLE).

    Reads torch._dynamo.config.disable (2.11, 2.13)."""
    return bool(torch._dynamo.config.disable)


def fail_past_recompile_limit(limit: int):
    """Context: at most ``limit`` compiled variants per code object, then raise RecompileLimitHit.

    torch._dynamo.config.patch(recompile_limit=..., fail_on_recompile_limit_hit=...) (2.11, 2.13).
    """
    return torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True)


def compile_counters() -> dict:
    """A snapshot of dynamo's counters (torch._dynamo.utils.counters, 2.11, 2.13): 'stats' holds
    'unique_graphs' and 'calls_captured'; tests use it to count compilations."""
    from torch._dynamo.utils import counters

    return {group: dict(values) for group, values in counters.items()}


def cudnn_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's fused attention returning each row's log-sum-exp with the output.

    torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, attn_bias, compute_log_sumexp,
    dropout_p, is_causal, return_debug_mask, scale=) (2.11, 2.13). K/V may have fewer heads
    than the query, a divisor of its count (GQA, read in place; cuDNN's own head grouping). Raises
    RuntimeError where cuDNN cannot run these inputs.

    Returns:
        ((B, H, L, D) output, log-sum-exp with B * H * L elements, natural log).
    """
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key, value, None, True, 0.0, False, False, scale=scaling
    )[:2]
    return out, lse


def flash_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 (PyTorch's build) returning each row's log-sum-exp with the output.

    torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal,
    return_debug_mask, scale=) (schema read on 2.13; on 2.11 only SDPA's FlashAttention with
    grouped K/V heads has run, through ``F.scaled_dot_product_attention``, not this call). Unlike
    cuDNN's attention it builds no plan per
    shape, so a key length that grows at every call costs nothing extra. Raises RuntimeError
    where it cannot run these inputs (e.g. K/V heads fewer than the query's, if this build does
    not group them).

    Returns:
        ((B, H, L, D) output, (B, H, >= L) float32 log-sum-exp, natural log).
    """
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, False, False, scale=scaling)[
        :2
    ]
    return out, lse


# transformers.modeling_rope_utils (5.17, 5.25): ROPE_INIT_FUNCTIONS maps a scaling type to
# fn(config, device, seq_len=None) -> (inv_freq (D/2,) fp32, attention_factor); dynamic_rope_update
# decorates a rotary module's forward(x, position_ids) and recomputes its ``inv_freq`` buffer for
# "dynamic" (grown past max_seq_len_cached, reset below original_max_seq_len) and "longrope"
# (long factors past original_max_position_embeddings). One difference between the two versions:
# for longrope 5.17 re-registers the ``inv_freq`` buffer, 5.25 copies into it in place (same
# shape, same values); our modules register ``inv_freq`` at construction, which both need.
ROPE_TYPES_NEEDED = ("linear", "dynamic", "yarn", "longrope")


def rope_init_config(rope_parameters: dict, head_dim: int, max_position_embeddings: int) -> PreTrainedConfig:
    """A bare config carrying what transformers' RoPE init functions read (5.17, 5.25).

    They read ``rope_parameters`` (transformers 5 spelling: rope_type, rope_theta and the
    scaling fields), ``head_dim`` (else hidden_size // num_attention_heads) and
    ``max_position_embeddings``, and call ``standardize_rope_params()``, which only fills in
    defaults. Our configs keep the checkpoints' ``rope_theta`` / ``rope_scaling`` fields, so
    the rotary modules hand these functions this separate object: setting ``rope_parameters``
    on the model's own config would change what ``save_pretrained`` writes.
    """
    config = PreTrainedConfig()
    config.head_dim = head_dim
    config.hidden_size = head_dim
    config.num_attention_heads = 1
    config.max_position_embeddings = max_position_embeddings
    config.rope_parameters = dict(rope_parameters)
    return config


def missing() -> list[str]:
    """The entries above that the installed torch lacks (empty when everything is there)."""
    gone = []
    if RecompileLimitHit is None:
        gone.append("torch._dynamo.exc.FailOnRecompileLimitHit")
    for name in ("disable", "recompile_limit", "fail_on_recompile_limit_hit"):
        if not hasattr(torch._dynamo.config, name):
            gone.append(f"torch._dynamo.config.{name}")
    if not hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"):
        gone.append("torch.ops.aten._scaled_dot_product_cudnn_attention")
    if not SDPA_HAS_PRIORITY:
        gone.append("sdpa_kernel(set_priority=)")
    try:
        from torch._dynamo.utils import counters  # noqa: F401
    except ImportError:
        gone.append("torch._dynamo.utils.counters")
    for rope_type in ROPE_TYPES_NEEDED:
        if rope_type not in ROPE_INIT_FUNCTIONS:
            gone.append(f"transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[{rope_type!r}]")
    if not hasattr(PreTrainedConfig, "standardize_rope_params"):
        gone.append("transformers.PreTrainedConfig.standardize_rope_params")
    return gone
