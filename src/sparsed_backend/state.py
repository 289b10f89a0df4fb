"""Moved to sparsed_backend.attention.state; this path keeps old imports working.

It re-exports the public names: patch (monkeypatch, mock) sparsed_backend.attention.state, where the
code looks them up.
"""

from .attention.state import (
    LayerSelection,
    Mode,
    SparseDState,
)

__all__ = [
    "LayerSelection",
    "Mode",
    "SparseDState",
]
