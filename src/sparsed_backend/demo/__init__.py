"""The offline demo: a synthetic long-context retrieval task and its tokenizer.

The small LLaDA-architecture model trained on it (``training/train_retrieval.py``; the recipe is
``training/recipe.py``, outside the package) ships inside the package; `model_path` returns its
directory, ready for ``from_pretrained``. A fine-tune of it that answers questions asking for up to
`MULTIKEY_MAX_KEYS` keys at once (answers over several decoding blocks) ships beside it:
``model_path(keys=2)``. A block-diffusion model (a native ``Qwen3ForCausalLM`` trained
block-causally on the same task, blocks of 4 tokens; `sampling.block_diffusion`) ships too:
`blockdiff_model_path`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .task import RetrievalPrompts, exact_match, sample_prompts
from .tokenizer import build_tokenizer

__all__ = [
    "MULTIKEY_MAX_KEYS",
    "RetrievalPrompts",
    "blockdiff_model_path",
    "build_tokenizer",
    "exact_match",
    "model_path",
    "sample_prompts",
]

_MODEL_DIR = "retrieval_llada"
_MULTIKEY_MODEL_DIR = "retrieval_llada_multikey"
_BLOCKDIFF_MODEL_DIR = "retrieval_qwen3_blockdiff"
MULTIKEY_MAX_KEYS = 2  # the multi-key fine-tune saw questions of 1 and 2 keys (training/README.md)


def model_path(keys: int = 1) -> Path:
    """Directory of a retrieval LLaDA shipped inside the package (config, weights, tokenizer):
    the single-key model for ``keys=1``, the multi-key fine-tune for 2..`MULTIKEY_MAX_KEYS` keys per
    question.

    ``AutoModel.from_pretrained(model_path(), attn_implementation="sparsed")`` loads it offline.
    """
    if isinstance(keys, bool) or not isinstance(keys, int) or not 1 <= keys <= MULTIKEY_MAX_KEYS:
        raise ValueError(f"keys must be an int in [1, {MULTIKEY_MAX_KEYS}] (the shipped models), got {keys!r}")
    return _shipped(_MODEL_DIR if keys == 1 else _MULTIKEY_MODEL_DIR)


def blockdiff_model_path() -> Path:
    """Directory of the block-diffusion retrieval model shipped inside the package: a native
    ``Qwen3ForCausalLM`` (6 layers, 8 query / 4 key-value heads) whose config carries
    ``mask_token_id`` and ``block_size`` (4), trained block-causally on prompts of up to 4,096
    tokens (training/README.md).

    ``AutoModelForCausalLM.from_pretrained(blockdiff_model_path(), attn_implementation="sparsed")``
    loads it offline for `blockdiff_generate` (``"sdpa"`` for dense attention).
    """
    return _shipped(_BLOCKDIFF_MODEL_DIR)


def _shipped(name: str) -> Path:
    path = Path(str(resources.files("sparsed_backend") / "assets" / name))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the shipped demo model is missing at {path}; reinstall sparsed_backend (package data) "
            "or train it with training/train_retrieval.py"
        )
    return path
