"""sparsed_backend: SparseD block-sparse attention for diffusion LMs as a transformers backend.

import sparsed_backend
model = AutoModel.from_pretrained(path, attn_implementation="sparsed", dtype=torch.bfloat16)

Importing the package registers, process-wide (see `register`):

- "sparsed" in transformers' ``AttentionInterface`` (`sparsed_attention_forward`) and
  ``AttentionMaskInterface`` (`sparsed_mask`): a new name, nothing existing changes;
- the local LLaDA ("llada") and Dream ("Dream") ports with ``AutoConfig``, ``AutoModel`` and
  ``AutoModelForCausalLM``: every checkpoint of those model types then loads these classes
  instead of its own remote code. ``SPARSED_REGISTER_MODELS=0`` in the environment at import
  skips this part; `sparsed_backend.models.register_models` does it later on demand.
"""

from __future__ import annotations

import os

from ._version import __version__
from .attention import SparseDConfig, SparseDState, sparsed_attention_forward, sparsed_mask

__all__ = ["SparseDConfig", "SparseDState", "__version__", "register", "sparsed_attention_forward", "sparsed_mask"]

ATTN_IMPLEMENTATION = "sparsed"
REGISTER_MODELS_ENV = "SPARSED_REGISTER_MODELS"


def register(models: bool = True) -> None:
    """Register "sparsed" with transformers' attention and mask interfaces and, with ``models``,
    the LLaDA and Dream ports with the Auto classes. Runs on import (``models`` from the
    environment: ``SPARSED_REGISTER_MODELS=0`` turns it off); safe to call again."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, sparsed_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sparsed_mask)
    if models:
        from .models import register_models

        register_models()


register(models=os.environ.get(REGISTER_MODELS_ENV, "1").strip() != "0")
