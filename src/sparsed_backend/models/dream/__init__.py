"""Transformers-native Dream (weights of Dream-org/Dream-v0-*-7B load as is)."""

from .configuration_dream import DreamConfig
from .modeling_dream import DreamBaseModel, DreamModel, DreamPreTrainedModel

__all__ = ["DreamBaseModel", "DreamConfig", "DreamModel", "DreamPreTrainedModel"]
