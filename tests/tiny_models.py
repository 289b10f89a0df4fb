"""Official config.json contents, tiny variants of them, and checkpoints with the official key
names, shared by test_models.py and test_generation.py."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# config.json of GSAI-ML/LLaDA-8B-Instruct (the Base and 1.5 checkpoints differ only in version).
LLADA_8B_CONFIG = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 4096,
    "embedding_dropout": 0.0,
    "embedding_size": 126464,
    "eos_token_id": 126081,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "use_cache": False,
    "vocab_size": 126464,
    "weight_tying": False,
}

# config.json of Dream-org/Dream-v0-Instruct-7B.
DREAM_7B_CONFIG = {
    "architectures": ["DreamModel"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_dream.DreamConfig",
        "AutoModel": "modeling_dream.DreamModel",
    },
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "mask_token_id": 151666,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "Dream",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "pad_token_id": 151643,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2",
    "use_cache": False,
    "use_sliding_window": False,
    "vocab_size": 152064,
}

MASK_ID = 127  # the tiny models' mask token (last vocab row)
PAD_ID = 1

# GQA 4 query heads / 2 kv heads, head_dim 16, for both models: one attention shape family.
TINY = {
    "llada": {
        **LLADA_8B_CONFIG,
        "d_model": 64,
        "n_heads": 4,
        "n_kv_heads": 2,
        "n_layers": 2,
        "mlp_hidden_size": 96,
        "vocab_size": 128,
        "embedding_size": 128,
        "max_sequence_length": 256,
        "mask_token_id": MASK_ID,
        "eos_token_id": PAD_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": "float32",
    },
    "dream": {
        **DREAM_7B_CONFIG,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "max_window_layers": 2,
        "vocab_size": 128,
        "max_position_embeddings": 256,
        "mask_token_id": MASK_ID,
        "bos_token_id": PAD_ID,
        "eos_token_id": PAD_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": "float32",
    },
}


def official_shapes(kind: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official checkpoint, by key, with its shape (from the config alone)."""
    if kind == "llada":
        d, m = cfg["d_model"], cfg["mlp_hidden_size"]
        kv = cfg["n_kv_heads"] * d // cfg["n_heads"]
        rows = cfg["embedding_size"]
        shapes = {
            "model.transformer.wte.weight": (rows, d),
            "model.transformer.ln_f.weight": (d,),
            "model.transformer.ff_out.weight": (rows, d),
        }
        for i in range(cfg["n_layers"]):
            p = f"model.transformer.blocks.{i}."
            shapes |= {
                p + "attn_norm.weight": (d,),
                p + "q_proj.weight": (d, d),
                p + "k_proj.weight": (kv, d),
                p + "v_proj.weight": (kv, d),
                p + "attn_out.weight": (d, d),
                p + "ff_norm.weight": (d,),
                p + "ff_proj.weight": (m, d),
                p + "up_proj.weight": (m, d),
                p + "ff_out.weight": (d, m),
            }
        return shapes
    d, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (d, d),
            p + "self_attn.q_proj.bias": (d,),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (m, d),
            p + "mlp.up_proj.weight": (m, d),
            p + "mlp.down_proj.weight": (d, m),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }
    return shapes


def random_state_dict(kind: str, cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights under the official names, scaled so that the logits are peaked (greedy decoding
    is then far from ties): unit embeddings, 1/sqrt(fan_in) matrices, a 3x-scaled LM head."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in official_shapes(kind, cfg).items():
        t = torch.randn(shape, generator=g)
        if key.endswith(("norm.weight", "ln_f.weight")):
            t = 1.0 + 0.1 * t
        elif key.endswith(".bias"):
            t = 0.1 * t
        elif key.endswith(("wte.weight", "embed_tokens.weight")):
            pass
        elif key in ("model.transformer.ff_out.weight", "lm_head.weight"):
            t = 3.0 * t / shape[1] ** 0.5
        else:
            t = t / shape[1] ** 0.5
        sd[key] = t.contiguous()
    return sd


def write_checkpoint(path: Path, kind: str, cfg: dict | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Lay out a directory like the official checkpoint: config.json + model.safetensors."""
    cfg = TINY[kind] if cfg is None else cfg
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    sd = random_state_dict(kind, cfg, seed)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return sd


def padded_pair(seed: int = 0, length: int = 16, pad: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random prompts of ``length`` tokens, the second left padded by ``pad``: ids and mask
    (2, length)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, MASK_ID, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    ids[1, :pad], mask[1, :pad] = PAD_ID, 0
    return ids, mask


def long_and_short(seed: int = 0, length: int = 16, short: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of ``length`` and ``short`` tokens, the short one left padded: ids and mask
    (2, length)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(2, MASK_ID, (length,), generator=g)
    second = torch.randint(2, MASK_ID, (short,), generator=g)
    ids = torch.full((2, length), PAD_ID)
    ids[0], ids[1, length - short :] = first, second
    mask = torch.zeros(2, length, dtype=torch.long)
    mask[0], mask[1, length - short :] = 1, 1
    return ids, mask


@contextlib.contextmanager
def never_predicting_mask(model):
    """Within the block, ``model``'s LM head never predicts the mask token. The random tiny
    models sometimes would, and the official samplers write it like any token; ruled out, a mask
    left in a sampler's output means an undecoded position."""

    def edit(_module, _inputs, logits):  # returns None: the head's output stays, edited in place
        logits[..., MASK_ID] = -1e4

    hook = model.get_output_embeddings().register_forward_hook(edit)
    try:
        yield model
    finally:
        hook.remove()


@functools.cache
def tiny_model(kind: str, seed: int = 0):
    """A float32 tiny model (cached; callers set the attention implementation they need)."""
    from sparsed_backend.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM

    config_class, model_class = (LLaDAConfig, LLaDAModelLM) if kind == "llada" else (DreamConfig, DreamModel)
    model = model_class(config_class(**TINY[kind]))
    model.load_state_dict(random_state_dict(kind, TINY[kind], seed), strict=True)
    return model.float().eval()


def write_blockdiff_checkpoint(path: Path, block_size: int = 4, seed: int = 0) -> None:
    """A tiny block-diffusion checkpoint in SDAR's layout: transformers' own Qwen3ForCausalLM
    whose config carries ``mask_token_id`` and ``block_size``, with the demo tokenizer (text in,
    text out) saved beside it."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sparsed_backend.demo.task import MASK_ID as DEMO_MASK
    from sparsed_backend.demo.task import VOCAB_SIZE
    from sparsed_backend.demo.tokenizer import build_tokenizer

    cfg = Qwen3Config(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=0, pad_token_id=0)  # fmt: skip
    cfg.mask_token_id, cfg.block_size = DEMO_MASK, block_size
    torch.manual_seed(seed)
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
