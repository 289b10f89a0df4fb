"""Moved to sparsed_backend.sampling.block_cache; this path keeps old imports working.

It re-exports the public names: patch (monkeypatch, mock) sparsed_backend.sampling.block_cache, where the
code looks them up.
"""

from .sampling.block_cache import (
    CACHE_MODES,
    FORWARD_KINDS,
    BlockDiffusionKVCache,
    cache_keyword,
)

__all__ = [
    "BlockDiffusionKVCache",
    "CACHE_MODES",
    "FORWARD_KINDS",
    "cache_keyword",
]
