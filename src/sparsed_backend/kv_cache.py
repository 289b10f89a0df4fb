"""Moved to sparsed_backend.sampling.kv_cache; this path keeps old imports working.

It re-exports the public names: patch (monkeypatch, mock) sparsed_backend.sampling.kv_cache, where the
code looks them up.
"""

from .sampling.kv_cache import (
    KV_CACHE_KINDS,
    KV_CACHE_MODES,
    BlockKVCache,
    check_kv_cache,
    window_attention_mask,
)

__all__ = [
    "BlockKVCache",
    "KV_CACHE_KINDS",
    "KV_CACHE_MODES",
    "check_kv_cache",
    "window_attention_mask",
]
