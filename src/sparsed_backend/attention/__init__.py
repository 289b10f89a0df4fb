"""The attention backend: SparseD as transformers' "sparsed" attention function.

Everything here works on one attention call and the step state that drives it; nothing here
knows about samplers or models.

- `backend`: the "sparsed" AttentionInterface function (`sparsed_attention_forward`), its mask
  function (`sparsed_mask`) and `sparse_attention`; `dense`: the dense path;
- `config` (`SparseDConfig`, the knobs) and `state` (`SparseDState`, the step and the kept
  block tables per layer);
- the switch step: `switch_step` (dense attention that also scores), `scoring` (block
  importance), `selection` (top-k per query block), `masks` (block tables to BlockMasks),
  `kernels` (the fused Triton scorer);
- `policy` (when sparse pays), `flex_shapes` (padding, compile signatures), `reference` (the
  fp64 oracle), `prefix_selection` (SparseD over a cached prefix, for block diffusion).
"""

from __future__ import annotations

from .backend import dense_attention, sparse_attention, sparsed_attention_forward, sparsed_mask
from .config import SparseDConfig
from .prefix_selection import PrefixSparseConfig, PrefixSparseState
from .state import LayerSelection, SparseDState

__all__ = [
    "LayerSelection",
    "PrefixSparseConfig",
    "PrefixSparseState",
    "SparseDConfig",
    "SparseDState",
    "dense_attention",
    "sparse_attention",
    "sparsed_attention_forward",
    "sparsed_mask",
]
