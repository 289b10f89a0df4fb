"""The diffusion runtime: samplers that drive a SparseD step state through a model.

- `generation`: `llada_generate` and `dream_generate`, the LLaDA and Dream samplers, with
  `_shared` (what both open with: validation, canvas, output) and `_threshold` (the confidence
  threshold schedule) and `arguments` (their argument rules, callable before a model loads:
  `check_llada_arguments`, `check_dream_arguments`);
- `kv_cache`: `BlockKVCache`, the approximate prefix/dual cache of the LLaDA and Dream samplers;
- `block_diffusion`: `blockdiff_generate`, block diffusion (SDAR) over an exact prefix cache,
  `block_cache` (`BlockDiffusionKVCache`), `decode_graphs` (its CUDA graphs, ``cuda_graphs=True``);
- `tensor_parallel`: what the samplers need to run under a tensor-parallel plan.
"""

from __future__ import annotations

from ._shared import DiffusionGenerationOutput
from .arguments import check_dream_arguments, check_llada_arguments
from .block_cache import BlockDiffusionKVCache
from .block_diffusion import blockdiff_generate
from .generation import dream_generate, llada_generate
from .kv_cache import BlockKVCache

__all__ = [
    "BlockDiffusionKVCache",
    "BlockKVCache",
    "DiffusionGenerationOutput",
    "blockdiff_generate",
    "check_dream_arguments",
    "check_llada_arguments",
    "dream_generate",
    "llada_generate",
]
