"""sparsed_backend: SparseD block-sparse attention for diffusion LMs as a transformers backend.

import sparsed_backend
model = AutoModel.from_pretrained(path, attn_implementation="sparsed", dtype=torch.bfloat16)
"""

from __future__ import annotations

from .attention import sparsed_attention_forward, sparsed_mask
from .config import SparseDConfig
from .state import SparseDState

__all__ = ["SparseDConfig", "SparseDState", "register", "sparsed_attention_forward", "sparsed_mask"]
__version__ = "0.1.0"

ATTN_IMPLEMENTATION = "sparsed"


def register() -> None:
    """Register "sparsed" with transformers' attention and mask interfaces, and the LLaDA and
    Dream models with the Auto classes. Runs on import; safe to call again."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from .models import register_models

    AttentionInterface.register(ATTN_IMPLEMENTATION, sparsed_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sparsed_mask)
    register_models()


register()
