"""Moved to sparsed_backend.attention.prefix_selection; this path keeps old imports working.

It re-exports the public names: patch (monkeypatch, mock) sparsed_backend.attention.prefix_selection, where the
code looks them up.
"""

from .attention.prefix_selection import (
    PREFIX_MODES,
    PREFIX_PATTERNS,
    PrefixMode,
    PrefixSelection,
    PrefixSparseConfig,
    PrefixSparseState,
    prefix_block_mass,
    prefix_sparse_attention,
    select_prefix_blocks,
)

__all__ = [
    "PREFIX_MODES",
    "PREFIX_PATTERNS",
    "PrefixMode",
    "PrefixSelection",
    "PrefixSparseConfig",
    "PrefixSparseState",
    "prefix_block_mass",
    "prefix_sparse_attention",
    "select_prefix_blocks",
]
