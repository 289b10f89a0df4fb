"""DreamConfig: the fields of the official Dream-v0-7B ``config.json`` (Qwen2 names)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ..rope import ROPE_TYPES, check_rope_scaling, rope_scaling_from_parameters, scaling_type

__all__ = ["DreamConfig"]


@strict
class DreamConfig(PreTrainedConfig):
    """Configuration of a Dream masked-diffusion language model (Qwen2.5 layout).

    Defaults are those of Dream-v0-Instruct-7B. RoPE keeps the official ``rope_theta`` /
    ``rope_scaling`` fields (not transformers 5's ``rope_parameters``), so a config saved
    here still loads with the official remote code; a ``rope_parameters`` dict in a config is
    turned into those two fields. ``rope_scaling`` may be None (plain RoPE, the official
    value) or a linear / dynamic / yarn / longrope scaling as transformers spells it (checked
    when the config is built; see ``models/rope.py``). Unknown fields are kept as attributes;
    settings this port does not implement raise ``NotImplementedError`` when a model is
    built (see :meth:`check_supported`).
    """

    model_type = "Dream"  # capital D, as in the official checkpoints
    keys_to_ignore_at_inference = ["past_key_values"]
    # Tensor parallelism: Qwen2's plan. Column-wise q/k/v give every rank whole query heads and
    # the kv heads of exactly those query groups (contiguous slices of Hq and Hkv line up when
    # both divide by the TP size, which the model checks when it is built). The embedding is
    # split by vocabulary as transformers >= 5.2x does for Qwen2 by default; naming it here makes
    # 5.17 do the same. The LM head's rule is on DreamModel (``_tp_plan``).
    base_model_tp_plan = {
        "embed_tokens": "embedding_rowwise",
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4  # GQA; None: num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float | int = 0.02
    rms_norm_eps: float | int = 1e-6
    use_cache: bool = False  # diffusion LMs re-encode the whole sequence every step
    tie_word_embeddings: bool = False
    rope_theta: float | int = 1000000.0
    rope_scaling: dict | None = None  # None, or linear / dynamic / yarn / longrope (models/rope.py)
    use_sliding_window: bool = False  # sliding-window attention is not implemented
    sliding_window: int | None = None
    max_window_layers: int = 28
    attention_dropout: float | int = 0.0
    mask_token_id: int | None = 151666
    pad_token_id: int | None = 151643
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151643

    def __post_init__(self, **kwargs) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if "rope_parameters" in kwargs:
            theta, self.rope_scaling = rope_scaling_from_parameters(kwargs.pop("rope_parameters"), self.rope_scaling)
            self.rope_theta = self.rope_theta if theta is None else theta
        super().__post_init__(**kwargs)
        check_rope_scaling(self)

    def check_supported(self) -> None:
        """Raise NotImplementedError for settings this port does not implement."""
        if scaling_type(self.rope_scaling) not in ROPE_TYPES:
            raise NotImplementedError(
                f"Dream port: rope_scaling={self.rope_scaling!r} is not implemented (supported rope_type: {ROPE_TYPES})"
            )
        if self.use_sliding_window:
            raise NotImplementedError("Dream port: use_sliding_window=True is not implemented (supported: False)")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size must be divisible by num_attention_heads, got hidden_size="
                f"{self.hidden_size}, num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                "num_attention_heads must be divisible by num_key_value_heads, got "
                f"{self.num_attention_heads} and {self.num_key_value_heads}"
            )
