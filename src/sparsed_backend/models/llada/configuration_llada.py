"""LLaDAConfig: the fields of the official LLaDA-8B ``config.json`` (OLMo-style names)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ..rope import ROPE_TYPES, check_rope_scaling, rope_scaling_from_parameters, scaling_type

__all__ = ["LLaDAConfig"]


@strict
class LLaDAConfig(PreTrainedConfig):
    """Configuration of a LLaDA masked-diffusion language model.

    Defaults are those of LLaDA-8B-Instruct / -Base. The official ``config.json`` parses as
    is: fields listed here are typed, any other field is kept as a plain attribute. Settings
    that this port does not implement (ALiBi, LayerNorm, tied weights, ...) still parse;
    building a model from them raises ``NotImplementedError`` (see :meth:`check_supported`).

    RoPE scaling (not in the official config; see ``models/rope.py``): ``rope_scaling`` as
    transformers 4.x spells it, e.g. ``{"rope_type": "yarn", "factor": 4.0}``, with
    ``max_sequence_length`` the trained length; a transformers 5 ``rope_parameters`` dict is
    turned into ``rope_theta`` + ``rope_scaling`` when the config is built.
    """

    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]
    # Tensor parallelism (``from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))``
    # under torchrun), the Llama layout under the checkpoint's names: q/k/v and the SwiGLU input
    # projections split by output features (whole heads per rank, kv heads with their query
    # groups), attn_out and the MLP's ff_out split by input features (one all-reduce each). The
    # vocabulary is split for the embedding (partial lookups summed) and for the LM head, which
    # LLaDA keeps inside the base model as ``transformer.ff_out`` (its logits are gathered).
    base_model_tp_plan = {
        "transformer.wte": "embedding_rowwise",
        "transformer.blocks.*.q_proj": "colwise",
        "transformer.blocks.*.k_proj": "colwise",
        "transformer.blocks.*.v_proj": "colwise",
        "transformer.blocks.*.attn_out": "rowwise",
        "transformer.blocks.*.ff_proj": "colwise",
        "transformer.blocks.*.up_proj": "colwise",
        "transformer.blocks.*.ff_out": "rowwise",
        "transformer.ff_out": "colwise_gather_output",
    }
    # Standard names, so that transformers utilities (and users) can read them.
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "intermediate_size": "mlp_hidden_size",
        "max_position_embeddings": "max_sequence_length",
    }

    d_model: int = 4096  # hidden size
    n_heads: int = 32  # query heads
    n_kv_heads: int | None = 32  # key/value heads (GQA); None: n_heads (or 1 with MQA)
    n_layers: int = 32
    mlp_ratio: int | float = 4  # MLP width as a multiple of d_model when mlp_hidden_size is None
    mlp_hidden_size: int | None = 12288  # SwiGLU width
    activation_type: str = "silu"  # only "silu" (SwiGLU with up_proj) is implemented
    block_type: str = "llama"  # only "llama" (separate q/k/v, ff_proj/up_proj) is implemented
    block_group_size: int = 1  # FSDP grouping in the original code; no effect on the math
    alibi: bool = False  # not implemented
    alibi_bias_max: float | int = 8.0
    rope: bool = True  # RoPE is the only position encoding implemented
    rope_full_precision: bool = True  # rotate q/k in fp32, then cast back
    rope_theta: float | int = 500000.0
    rope_scaling: dict | None = None  # None, or linear / dynamic / yarn / longrope (models/rope.py)
    flash_attention: bool = False  # kernel choice in the original code; ignored (use attn_implementation)
    attention_dropout: float | int = 0.0
    multi_query_attention: bool | None = None
    attention_layer_norm: bool = False  # q/k LayerNorm; not implemented
    residual_dropout: float | int = 0.0
    embedding_dropout: float | int = 0.0
    input_emb_norm: bool = False  # not implemented
    layer_norm_type: str = "rms"  # only "rms" is implemented
    layer_norm_with_affine: bool = True  # RMSNorm has a weight; False is not implemented
    attention_layer_norm_with_affine: bool = True
    rms_norm_eps: float | int = 1e-5
    bias_for_layer_norm: bool | None = False
    clip_qkv: float | int | None = None  # not implemented
    include_bias: bool = False  # biases on every linear layer; not implemented
    include_qkv_bias: bool | None = False  # biases on q/k/v only; implemented
    scale_logits: bool = False  # not implemented
    vocab_size: int = 126464
    embedding_size: int | None = 126464  # rows of wte / ff_out (vocab rounded up)
    weight_tying: bool = False  # LM head tied to wte; not implemented
    max_sequence_length: int = 4096
    init_device: str | None = "meta"
    init_fn: str = "mitchell"
    init_std: float | int = 0.02
    init_cutoff_factor: float | int | None = None
    precision: str | None = "amp_bf16"
    use_cache: bool = False  # diffusion LMs re-encode the whole sequence every step
    mask_token_id: int | None = 126336
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081

    def __post_init__(self, **kwargs) -> None:
        if "rope_parameters" in kwargs:
            theta, self.rope_scaling = rope_scaling_from_parameters(kwargs.pop("rope_parameters"), self.rope_scaling)
            self.rope_theta = self.rope_theta if theta is None else theta
        super().__post_init__(**kwargs)
        check_rope_scaling(self)

    @property
    def effective_n_kv_heads(self) -> int:
        """Key/value heads, resolving n_kv_heads = None the way the original code does."""
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return 1 if self.multi_query_attention else self.n_heads

    @property
    def effective_mlp_hidden_size(self) -> int:
        if self.mlp_hidden_size is not None:
            return self.mlp_hidden_size
        return int(self.mlp_ratio * self.d_model)

    def check_supported(self) -> None:
        """Raise NotImplementedError for settings this port does not implement."""
        expected = {
            "alibi": False,
            "rope": True,
            "attention_layer_norm": False,
            "input_emb_norm": False,
            "layer_norm_with_affine": True,
            "clip_qkv": None,
            "include_bias": False,
            "scale_logits": False,
            "weight_tying": False,
        }
        for name, value in expected.items():
            if getattr(self, name) != value:
                raise NotImplementedError(
                    f"LLaDA port: {name}={getattr(self, name)!r} is not implemented (supported: {name}={value!r})"
                )
        if scaling_type(self.rope_scaling) not in ROPE_TYPES:
            raise NotImplementedError(
                f"LLaDA port: rope_scaling={self.rope_scaling!r} is not implemented (supported rope_type: {ROPE_TYPES})"
            )
        choices = {"layer_norm_type": "rms", "block_type": "llama", "activation_type": "silu"}
        for name, value in choices.items():
            if str(getattr(self, name)).lower() != value:
                raise NotImplementedError(
                    f"LLaDA port: {name}={getattr(self, name)!r} is not implemented (supported: {name}={value!r})"
                )
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model must be divisible by n_heads, got d_model={self.d_model}, n_heads={self.n_heads}"
            )
        if self.n_heads % self.effective_n_kv_heads != 0:
            raise ValueError(
                f"n_heads must be divisible by n_kv_heads, got n_heads={self.n_heads}, "
                f"n_kv_heads={self.effective_n_kv_heads}"
            )
