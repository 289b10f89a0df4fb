"""Dream as a transformers-native model: Qwen2 layout, bidirectional, pluggable attention.

Differences from the official remote code (Dream-org/Dream-v0-*-7B/modeling_dream.py), each on
purpose:
- attention goes through ``ALL_ATTENTION_FUNCTIONS`` (eager / sdpa / flex_attention / sparsed),
  always bidirectional, K/V handed over un-repeated (GQA is the backend's job);
- the padding mask is a 2D (B, L) mask turned into the backend's mask by
  ``create_bidirectional_mask`` (the original takes a bool (B, 1, L, L) mask or "full");
- ``logits_to_keep`` limits the LM head to the positions a sampler decodes; logits stay in the
  model dtype (the sampler upcasts what it reads);
- no KV cache.
The logits are those of the checkpoint: position i predicts token i + 1; the sampler shifts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from ...sampling.kv_cache import BlockKVCache
from .._common import (
    RMSNorm,
    check_tensor_parallel_heads,
    cuda_fused,
    eager_attention_forward,
    forward_inputs,
    keep_positions,
    rotate_half,
    swiglu,
)
from ..rope import RotaryEmbedding
from .configuration_dream import DreamConfig

__all__ = ["DreamBaseModel", "DreamModel", "DreamPreTrainedModel"]


class DreamRMSNorm(RMSNorm):
    """RMSNorm in fp32 (Qwen2RMSNorm); the class name keeps transformers' RMSNorm weight init."""


class DreamRotaryEmbedding(RotaryEmbedding):
    """cos/sin (B, L, D) for the given positions: computed in fp32, returned in the activation
    dtype (Qwen2's convention), with the config's RoPE scaling (``models/rope.py``)."""

    output_in_input_dtype = True


@cuda_fused
def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, L, D), k (B, Hkv, L, D), cos/sin (B, L, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class DreamAttention(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # diffusion LM: always bidirectional
        self.attention_dropout = float(config.attention_dropout)
        kv_dim = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=True)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: object = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (B, L, hidden) -> (B, L, hidden), attention weights or None."""
        b, n, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, n, -1, self.head_dim).transpose(1, 2)  # (B, Hq, L, D)
        k = self.k_proj(hidden_states).view(b, n, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        v = self.v_proj(hidden_states).view(b, n, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        kv_cache = kwargs.pop("kv_cache", None)
        if kv_cache is not None:  # block-wise diffusion caching (kv_cache.BlockKVCache)
            k, v = kv_cache.update(k, v, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
            **kwargs,
        )
        return self.o_proj(out.reshape(b, n, -1)), weights


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.fused_silu = config.hidden_act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_silu:
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DreamAttention(config, layer_idx)
        self.mlp = DreamMLP(config)
        self.input_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: object = None,
        **kwargs,
    ) -> torch.Tensor:
        attn, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask, **kwargs)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DreamPreTrainedModel(PreTrainedModel):
    config: DreamConfig
    config_class = DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # The default _init_weights covers Linear, Embedding and (by class name) *RMSNorm.
    _can_record_outputs = {"hidden_states": DreamDecoderLayer, "attentions": DreamAttention}


class DreamBaseModel(DreamPreTrainedModel):
    """The Dream trunk (Qwen2Model layout): embed_tokens, layers, norm."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        config.check_supported()
        check_tensor_parallel_heads(config, config.num_attention_heads, config.num_key_value_heads)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DreamRotaryEmbedding(config)
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        kv_cache: BlockKVCache | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        """input_ids (B, L) or inputs_embeds (B, L, hidden); attention_mask (B, L) with 1 for
        real tokens (or a prepared 4D mask); position_ids (B, L), default 0..L-1. Every other
        keyword (e.g. ``sparsed_state``) is handed unchanged to every attention call."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        inputs_embeds, position_ids, mask = forward_inputs(
            self.config, inputs_embeds, attention_mask, position_ids, kv_cache, kwargs
        )
        rope = self.rotary_emb.frozen if kv_cache is not None and kv_cache.window is not None else self.rotary_emb
        position_embeddings = rope(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, mask, **kwargs)
        return BaseModelOutput(last_hidden_state=self.norm(hidden_states))


class DreamModel(DreamPreTrainedModel):
    """Dream masked-diffusion LM (what the official ``auto_map`` calls ``DreamModel``).

    Logits are the checkpoint's: position i predicts token i + 1 (the sampler shifts them).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # iff tie_word_embeddings
    _tp_plan = {"lm_head": "colwise_gather_output"}  # vocabulary split, logits gathered (as Qwen2)

    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutput:
        """Logits (B, K, V) for the kept positions.

        Args:
            logits_to_keep: an int keeps the last N positions (0 keeps all); a 1D LongTensor
                keeps those sequence indices.
            kwargs: reach every attention call unchanged (e.g. ``sparsed_state=``).
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        logits = self.lm_head(keep_positions(outputs.last_hidden_state, logits_to_keep))
        return CausalLMOutput(logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def diffusion_generate(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Dream's sampler; see :func:`sparsed_backend.sampling.generation.dream_generate`."""
        from ...sampling.generation import dream_generate

        return dream_generate(self, input_ids, attention_mask, **kwargs)
