"""The offline demo: a synthetic long-context retrieval task and its character tokenizer.

The small LLaDA-architecture model trained on it (``training/train_retrieval.py``) ships in
``sparsed_backend/assets/retrieval_llada``.
"""

from __future__ import annotations

from .task import exact_match, make_batch, make_example, make_record_example
from .tokenizer import build_tokenizer

__all__ = ["build_tokenizer", "exact_match", "make_batch", "make_example", "make_record_example"]
