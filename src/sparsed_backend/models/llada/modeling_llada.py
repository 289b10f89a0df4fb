"""LLaDA as a transformers-native model: official checkpoints load, attention is pluggable.

Differences from the official remote code (GSAI-ML/LLaDA-8B-*/modeling_llada.py), each on
purpose:
- attention goes through ``ALL_ATTENTION_FUNCTIONS`` (eager / sdpa / flex_attention / sparsed),
  always bidirectional, K/V handed over un-repeated (GQA is the backend's job);
- the padding mask comes from ``create_bidirectional_mask`` and reaches every layer untouched;
- RoPE scaling (linear, dynamic NTK, YaRN, LongRoPE) through transformers' RoPE utilities;
- ``position_ids`` are honoured (the original always uses 0..L-1, so left-padded rows see
  shifted positions; the samplers pass cumsum(mask) - 1 instead);
- ``logits_to_keep`` limits the LM head to the positions a sampler decodes;
- no KV cache (a diffusion LM re-encodes the whole sequence every step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel
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
from .configuration_llada import LLaDAConfig

__all__ = ["LLaDAModel", "LLaDAModelLM", "LLaDAPreTrainedModel"]


class LLaDARMSNorm(RMSNorm):
    """RMSNorm in fp32 (as the original RMSLayerNorm); the class name keeps transformers' RMSNorm weight init."""


class LLaDARotaryEmbedding(RotaryEmbedding):
    """cos/sin (B, L, D) for the given positions, in fp32 (rotate-half convention), with the
    config's RoPE scaling (``models/rope.py``)."""


@cuda_fused
def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, L, D), k (B, Hkv, L, D), cos/sin (B, L, D) fp32."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if full_precision:  # the original's rope_full_precision: rotate in fp32, cast back
        q_, k_ = q.float(), k.float()
    else:
        q_, k_ = q, k
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    q_out = q_ * cos + rotate_half(q_) * sin
    k_out = k_ * cos + rotate_half(k_) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


class LLaDABlock(nn.Module):
    """One LLaDA "llama" block. It owns the attention projections (the checkpoint keys put
    q_proj/k_proj/v_proj/attn_out on the block), so it is the module attention backends see."""

    def __init__(self, config: LLaDAConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.n_heads
        self.num_key_value_heads = config.effective_n_kv_heads
        self.head_dim = config.d_model // config.n_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # diffusion LM: always bidirectional
        self.attention_dropout = float(config.attention_dropout)
        hidden = config.effective_mlp_hidden_size
        qkv_bias = bool(config.include_qkv_bias)

        self.attn_norm = LLaDARMSNorm(config.d_model, config.rms_norm_eps)
        self.q_proj = nn.Linear(config.d_model, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.d_model, self.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.d_model, self.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.ff_norm = LLaDARMSNorm(config.d_model, config.rms_norm_eps)
        self.ff_proj = nn.Linear(config.d_model, hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, hidden, bias=False)
        self.ff_out = nn.Linear(hidden, config.d_model, bias=False)
        self.dropout = nn.Dropout(float(config.residual_dropout))

    def attention(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: object,
        **kwargs,
    ) -> torch.Tensor:
        """x (B, L, d_model) -> (B, L, d_model)."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)  # (B, Hq, L, D)
        k = self.k_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        v = self.v_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, L, D)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin, self.config.rope_full_precision)
        kv_cache = kwargs.pop("kv_cache", None)
        if kv_cache is not None:  # block-wise diffusion caching (kv_cache.BlockKVCache)
            k, v = kv_cache.update(k, v, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = attention_interface(
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
        return self.attn_out(out.reshape(b, n, -1))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: object = None,
        **kwargs,
    ) -> torch.Tensor:
        x = hidden_states
        x = x + self.dropout(self.attention(self.attn_norm(x), position_embeddings, attention_mask, **kwargs))
        h = self.ff_norm(x)
        h = self.ff_out(swiglu(self.ff_proj(h), self.up_proj(h)))
        return x + self.dropout(h)


class LLaDAPreTrainedModel(PreTrainedModel):
    config: LLaDAConfig
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # The default _init_weights covers Linear, Embedding and (by class name) *RMSNorm.
    _can_record_outputs = {"hidden_states": LLaDABlock}


class LLaDAModel(LLaDAPreTrainedModel):
    """The LLaDA trunk plus its LM head, under ``.transformer`` as in the official checkpoints.

    ``forward`` returns the final normed hidden states; :class:`LLaDAModelLM` applies the head
    (``transformer.ff_out``) to the positions it is asked to keep.
    """

    _input_embed_layer = "wte"

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        config.check_supported()
        check_tensor_parallel_heads(config, config.n_heads, config.effective_n_kv_heads)
        rows = config.embedding_size or config.vocab_size
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(rows, config.d_model),
                "emb_drop": nn.Dropout(float(config.embedding_dropout)),
                "blocks": nn.ModuleList(LLaDABlock(config, i) for i in range(config.n_layers)),
                "ln_f": LLaDARMSNorm(config.d_model, config.rms_norm_eps),
                "ff_out": nn.Linear(config.d_model, rows, bias=False),
            }
        )
        self.rotary_emb = LLaDARotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

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
        """input_ids (B, L) or inputs_embeds (B, L, d_model); attention_mask (B, L) with 1 for
        real tokens (or a prepared 4D mask); position_ids (B, L), default 0..L-1. Every other
        keyword (e.g. ``sparsed_state``) is handed unchanged to every attention call."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.transformer.wte(input_ids)
        inputs_embeds, position_ids, mask = forward_inputs(
            self.config, inputs_embeds, attention_mask, position_ids, kv_cache, kwargs
        )
        rope = self.rotary_emb.frozen if kv_cache is not None and kv_cache.window is not None else self.rotary_emb
        position_embeddings = rope(inputs_embeds, position_ids)
        hidden_states = self.transformer.emb_drop(inputs_embeds)
        for block in self.transformer.blocks:
            hidden_states = block(hidden_states, position_embeddings, mask, **kwargs)
        hidden_states = self.transformer.ln_f(hidden_states)
        return BaseModelOutput(last_hidden_state=hidden_states)


class LLaDAModelLM(LLaDAPreTrainedModel):
    """LLaDA masked-diffusion LM (what the official ``auto_map`` calls ``LLaDAModelLM``).

    Logits are not shifted: position i predicts token i.
    """

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.transformer.ff_out

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.transformer.ff_out = value

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
                keeps those sequence indices (e.g. the block being decoded).
            kwargs: reach every attention call unchanged (e.g. ``sparsed_state=``).
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        hidden_states = keep_positions(outputs.last_hidden_state, logits_to_keep)
        logits = self.model.transformer.ff_out(hidden_states)
        return CausalLMOutput(logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def diffusion_generate(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """LLaDA's semi-autoregressive sampler; see :func:`sparsed_backend.sampling.generation.llada_generate`."""
        from ...sampling.generation import llada_generate

        return llada_generate(self, input_ids, attention_mask, **kwargs)
