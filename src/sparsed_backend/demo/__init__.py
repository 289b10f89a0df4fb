"""The offline demo: a synthetic long-context retrieval task and its tokenizer.

The small LLaDA-architecture model trained on it (``training/train_retrieval.py``; the recipe is
``training/recipe.py``, outside the package) ships inside the package; `model_path` returns its
directory, ready for ``from_pretrained``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .task import RetrievalPrompts, exact_match, sample_prompts
from .tokenizer import build_tokenizer

__all__ = ["RetrievalPrompts", "build_tokenizer", "exact_match", "model_path", "sample_prompts"]

_MODEL_DIR = "retrieval_llada"


def model_path() -> Path:
    """Directory of the retrieval LLaDA shipped inside the package (config, weights, tokenizer).

    ``AutoModel.from_pretrained(model_path(), attn_implementation="sparsed")`` loads it offline.
    """
    path = Path(str(resources.files("sparsed_backend") / "assets" / _MODEL_DIR))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the shipped demo model is missing at {path}; reinstall sparsed_backend (package data) "
            "or train it with training/train_retrieval.py"
        )
    return path
