"""Moved to sparsed_backend.sampling.tensor_parallel; this path keeps old imports working.

It re-exports the public names: patch (monkeypatch, mock) sparsed_backend.sampling.tensor_parallel, where the
code looks them up.
"""

from .sampling.tensor_parallel import (
    RankSync,
    rank_sync,
    tensor_parallel_group,
)

__all__ = [
    "RankSync",
    "rank_sync",
    "tensor_parallel_group",
]
