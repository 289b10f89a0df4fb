"""Moved to sparsed_backend.sampling.generation; this path keeps old imports working.

It re-exports the public names: patch (monkeypatch, mock) sparsed_backend.sampling.generation, where the
code looks them up.
"""

from .sampling.generation import (
    DREAM_ALGS,
    LLADA_REMASKING,
    DiffusionGenerationOutput,
    check_cache_with_sparsed,
    dream_generate,
    llada_generate,
    llada_transfer_schedule,
)

__all__ = [
    "DREAM_ALGS",
    "DiffusionGenerationOutput",
    "LLADA_REMASKING",
    "check_cache_with_sparsed",
    "dream_generate",
    "llada_generate",
    "llada_transfer_schedule",
]
