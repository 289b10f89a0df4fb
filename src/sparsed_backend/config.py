"""Moved to sparsed_backend.attention.config; this path keeps old imports working.

It re-exports the public names: patch (monkeypatch, mock) sparsed_backend.attention.config, where the
code looks them up.
"""

from .attention.config import (
    RULES,
    SparseDConfig,
)

__all__ = [
    "RULES",
    "SparseDConfig",
]
