"""Moved to sparsed_backend.sampling.block_diffusion; this path keeps old imports working.

It re-exports the public names: patch (monkeypatch, mock) sparsed_backend.sampling.block_diffusion, where the
code looks them up.
"""

from .sampling.block_diffusion import (
    BLOCKDIFF_REMASKING,
    MASK_IMPLEMENTATIONS,
    block_causal_mask,
    blockdiff_generate,
    choose_transfer,
    sample_tokens,
)

__all__ = [
    "BLOCKDIFF_REMASKING",
    "MASK_IMPLEMENTATIONS",
    "block_causal_mask",
    "blockdiff_generate",
    "choose_transfer",
    "sample_tokens",
]
