"""Every private or version-dependent torch API the package touches, in one place.

Each entry names the torch versions it was checked on: 2.11 (the H100 machine) and 2.13 (the
CPU machines and CI). ``missing()`` lists entries the installed torch lacks; the test suite
asserts it is empty, so a torch upgrade that moves one of them fails a test, not a user.
"""

from __future__ import annotations

import inspect

import torch
from torch.nn.attention import sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask

__all__ = [
    "CHECKED_TORCH",
    "RecompileLimitHit",
    "SDPA_HAS_PRIORITY",
    "FROM_KV_BLOCKS_HAS_COMPUTE_Q_BLOCKS",
    "compile_counters",
    "compile_disabled",
    "cudnn_attention_with_lse",
    "fail_past_recompile_limit",
    "missing",
]

CHECKED_TORCH = ("2.11", "2.13")

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
    dropout_p, is_causal, return_debug_mask, scale=) (2.11, 2.13). K/V must already have the
    query's head count. Raises RuntimeError where cuDNN cannot run these inputs.

    Returns:
        ((B, H, L, D) output, log-sum-exp with B * H * L elements, natural log).
    """
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key, value, None, True, 0.0, False, False, scale=scaling
    )[:2]
    return out, lse


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
    return gone
