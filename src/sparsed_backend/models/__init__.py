"""Transformers-native diffusion LMs (LLaDA, Dream) and their Auto* registration."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .dream import DreamBaseModel, DreamConfig, DreamModel
from .llada import LLaDAConfig, LLaDAModel, LLaDAModelLM

__all__ = [
    "DreamBaseModel",
    "DreamConfig",
    "DreamModel",
    "LLaDAConfig",
    "LLaDAModel",
    "LLaDAModelLM",
    "register_models",
]


def register_models() -> None:
    """Register LLaDA ("llada") and Dream ("Dream") with AutoConfig, AutoModel and
    AutoModelForCausalLM. Idempotent.

    AutoModel maps to the LM classes, as the official ``auto_map`` entries do. Once
    registered, these local classes are used for checkpoints of those model types whatever
    ``trust_remote_code`` says (transformers prefers explicitly registered local code over a
    checkpoint's ``auto_map``), so no remote code is downloaded or run.
    """
    for config_class, lm_class in ((LLaDAConfig, LLaDAModelLM), (DreamConfig, DreamModel)):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, lm_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, lm_class, exist_ok=True)
