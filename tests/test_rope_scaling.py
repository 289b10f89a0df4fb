"""RoPE scaling in both ports: transformers' own frequencies, checkpoints that load and generate
past their trained length, the position limit, config round trips, and clear errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, LlamaConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

import sparsed_backend  # noqa: F401  (registers "sparsed" and the Auto classes)
from sparsed_backend.attention.config import SparseDConfig
from sparsed_backend.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM
from sparsed_backend.models.rope import (
    parse_rope_scaling,
    position_limit,
    position_limit_note,
    with_rope_scaling,
)
from sparsed_backend.sampling.generation import dream_generate, llada_generate
from sparsed_backend.sampling.kv_cache import BlockKVCache
from tiny_models import TINY, long_and_short, random_state_dict, write_checkpoint

KINDS = ["llada", "dream"]
CLASSES = {"llada": (LLaDAConfig, LLaDAModelLM), "dream": (DreamConfig, DreamModel)}
GENERATE = {"llada": llada_generate, "dream": dream_generate}
LIMIT_KEY = {"llada": "max_sequence_length", "dream": "max_position_embeddings"}
ORIGINAL = 32  # trained length of the test configs: 16 prompt + 32 generated tokens go past it
HALF = 8  # head_dim 16 / 2: LongRoPE's factors per dimension
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"type": "dynamic", "factor": 2.0},  # the legacy spelling of the type
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 16},
    "longrope": {
        "rope_type": "longrope",
        "factor": 2.0,
        "long_factor": [1.0 + 0.5 * i for i in range(HALF)],
        "short_factor": [1.0 + 0.05 * i for i in range(HALF)],
    },
}
TYPES = list(SCALINGS)
SCALED = TYPES[1:]
# original x factor, the limit of a config whose max_position_embeddings is the trained length
LIMITS = {"default": 32, "linear": 64, "dynamic": 64, "yarn": 128, "longrope": 64}


def config_dict(kind: str, rope: str | dict | None, **extra) -> dict:
    """The tiny config of ``kind`` with a trained length of ORIGINAL and the given scaling."""
    scaling = SCALINGS[rope] if isinstance(rope, str) else rope
    return {**TINY[kind], LIMIT_KEY[kind]: ORIGINAL, "rope_scaling": copy.deepcopy(scaling), **extra}


def make_config(kind: str, rope: str | dict | None, **extra):
    return CLASSES[kind][0](**config_dict(kind, rope, **extra))


def reference(kind: str, rope: str):
    """transformers' own rotary module (Llama for LLaDA, Qwen2 for Dream) for the same RoPE."""
    cfg = TINY[kind]
    scaling = {k: v for k, v in (SCALINGS[rope] or {}).items() if k != "type"}
    params = {**scaling, "rope_type": rope, "rope_theta": cfg["rope_theta"]}
    shape = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    config_class = LlamaConfig if kind == "llada" else Qwen2Config
    config = config_class(rope_parameters=params, max_position_embeddings=ORIGINAL, **shape)
    return (LlamaRotaryEmbedding if kind == "llada" else Qwen2RotaryEmbedding)(config)


def build(kind: str, rope: str, seed: int = 0):
    config_class, model_class = CLASSES[kind]
    model = model_class(make_config(kind, rope))
    model.load_state_dict(random_state_dict(kind, TINY[kind], seed), strict=True)
    return model.eval()


def prompts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 16 and 10 tokens, the second left padded (the shapes test_generation uses)."""
    return long_and_short(seed, 16, 10)


def sampler_args(kind: str, gen: int = 32) -> dict:
    if kind == "llada":
        return {"steps": 8, "gen_length": gen, "block_length": 16}
    return {"steps": 8, "max_new_tokens": gen, "alg": "entropy"}


# ------------------------------------------------------------------ frequencies and cos/sin


@pytest.mark.parametrize("rope", TYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_frequencies_and_attention_factor_are_transformers_own(kind, rope):
    ours = build(kind, rope).model.rotary_emb
    ref = reference(kind, rope)
    init = ref.compute_default_rope_parameters if rope == "default" else ROPE_INIT_FUNCTIONS[rope]
    inv_freq, factor = init(ref.config)
    assert ours.rope_type == rope
    assert torch.equal(ours.inv_freq, inv_freq) and torch.equal(ours.inv_freq, ref.inv_freq)
    assert ours.attention_scaling == factor == ref.attention_scaling
    if rope in ("yarn", "longrope"):
        assert factor > 1.0  # the attention factor is really exercised


@pytest.mark.parametrize("rope", TYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_cos_sin_follow_transformers_past_the_trained_length(kind, rope):
    """A forward longer than the trained length, then a shorter one: dynamic NTK grows and resets
    its frequencies, LongRoPE switches to its long factors and back, exactly as transformers'
    dynamic_rope_update does on its own rotary module; cos/sin carry YaRN's attention factor."""
    model, ref = build(kind, rope), reference(kind, rope)
    ours = model.model.rotary_emb
    for length in (3 * ORIGINAL, ORIGINAL // 2):
        ids = torch.randint(2, 127, (1, length))
        with torch.no_grad():
            model(ids)  # the model's forward drives the update
        x = torch.zeros(1, length, 64)
        pos = torch.arange(length)[None]
        expected = ref(x, pos)
        assert torch.equal(ours.inv_freq, ref.inv_freq), length
        for got, want in zip(ours.frozen(x, pos), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if rope in ("dynamic", "longrope"):
        grown = ROPE_INIT_FUNCTIONS[rope](ref.config, None, seq_len=3 * ORIGINAL)[0]
        assert not torch.equal(grown, ours.original_inv_freq)  # the long forward really changed them


@pytest.mark.parametrize("kind", KINDS)
def test_rope_kernels_receive_the_scaled_cos_sin(kind, monkeypatch):
    """The fused q/k rotation (``apply_rotary_pos_emb``, one compiled kernel on CUDA) gets cos/sin
    with YaRN's attention factor already in them, as transformers' convention has it."""
    from sparsed_backend.models.dream import modeling_dream
    from sparsed_backend.models.llada import modeling_llada

    module = modeling_llada if kind == "llada" else modeling_dream
    seen = []
    real = module.apply_rotary_pos_emb

    def spy(q, k, cos, sin, *rest):
        seen.append((cos, sin))
        return real(q, k, cos, sin, *rest)

    monkeypatch.setattr(module, "apply_rotary_pos_emb", spy)
    model, ref = build(kind, "yarn"), reference(kind, "yarn")
    length = 3 * ORIGINAL
    with torch.no_grad():
        model(torch.randint(2, 127, (1, length)))
    cos, sin = ref(torch.zeros(1, length, 64), torch.arange(length)[None])
    assert len(seen) == 2  # one call per layer
    for got_cos, got_sin in seen:
        torch.testing.assert_close(got_cos, cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_sin, sin, rtol=0, atol=1e-6)
    assert cos.abs().max() > 1.0  # scaled by attention_scaling ~1.14


@pytest.mark.parametrize("kind", KINDS)
def test_cached_windows_keep_the_frequencies_of_the_refresh(kind):
    """Dynamic NTK under a K/V cache: a window forward (positions [start, stop) only, all below
    the trained length) must not reset the frequencies the cached keys were rotated with; with
    unchanged tokens its logits equal the full forward's at those rows."""
    model = build(kind, "dynamic")
    model.set_attn_implementation("sdpa")
    ids = torch.randint(2, 127, (1, 3 * ORIGINAL))
    cache = BlockKVCache("dual")
    with torch.no_grad():
        cache.refresh()
        full = model(ids, kv_cache=cache).logits
        grown = model.model.rotary_emb.inv_freq.clone()
        cache.set_window(0, 16)
        window = model(ids[:, :16], kv_cache=cache).logits
    assert torch.equal(model.model.rotary_emb.inv_freq, grown)
    assert not torch.equal(grown, model.model.rotary_emb.original_inv_freq)
    torch.testing.assert_close(window, full[:, :16], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_dtype_cast_keeps_the_frequencies_in_float32(kind):
    model = build(kind, "yarn")
    before = model.model.rotary_emb.inv_freq.clone()
    model.to(torch.bfloat16)
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.dtype == rotary.original_inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, before)
    assert next(model.parameters()).dtype == torch.bfloat16


# --------------------------------------------------------------- checkpoints that load and run


@pytest.mark.parametrize("rope", SCALED)
@pytest.mark.parametrize("kind", KINDS)
def test_scaled_checkpoints_load_and_generate_past_the_trained_length(tmp_path, kind, rope):
    """config.json carries the scaling; AutoModel loads it (meta device, then transformers fills
    the frequency buffers), and 16 + 32 tokens run where 32 were trained. At select 1.0 SparseD
    gives the tokens SDPA gives."""
    write_checkpoint(tmp_path, kind, config_dict(kind, rope))
    model = AutoModel.from_pretrained(tmp_path, attn_implementation="sparsed")
    assert position_limit(model.config) == LIMITS[rope] >= 48
    rotary, ref = model.model.rotary_emb, reference(kind, rope)
    assert torch.equal(rotary.inv_freq, ref.inv_freq) and rotary.attention_scaling == ref.attention_scaling

    ids, mask = prompts()
    sparsed = SparseDConfig(select=1.0, skip=0.0, block_size=16, min_sparse_len=0)
    out = GENERATE[kind](model, ids, mask, sparsed=sparsed, return_dict_in_generate=True, **sampler_args(kind))
    model.set_attn_implementation("sdpa")
    dense = GENERATE[kind](model, ids, mask, **sampler_args(kind))
    assert dense.shape == (2, 48) and ORIGINAL < 48
    assert torch.equal(out.sequences, dense)
    assert out.sparsed_state.density() == pytest.approx(1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_scaling_changes_the_output_past_the_trained_length(kind):
    """The scaling is really applied: the same weights give other logits with YaRN on."""
    ids = torch.randint(2, 127, (1, 3 * ORIGINAL))
    with torch.no_grad():
        plain, yarn = (build(kind, rope)(ids).logits for rope in ("default", "yarn"))
    assert not torch.allclose(plain, yarn, atol=1e-3)


# ------------------------------------------------------------------------ configs round trip


@pytest.mark.parametrize("rope", TYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_config_reloads_identically(tmp_path, kind, rope):
    config = make_config(kind, rope)
    config.save_pretrained(tmp_path / "a")
    again = AutoConfig.from_pretrained(tmp_path / "a")
    assert type(again) is type(config)
    assert again.rope_scaling == SCALINGS[rope]  # as the checkpoint spells it ("type" stays "type")
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert strip(again) == strip(config)
    again.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "config.json").read_text() == (tmp_path / "a" / "config.json").read_text()


@pytest.mark.parametrize("kind", KINDS)
def test_transformers5_rope_parameters_become_rope_theta_and_rope_scaling(tmp_path, kind):
    cfg = config_dict(kind, None)
    del cfg["rope_scaling"], cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 20000.0, "factor": 4.0}
    write_checkpoint(tmp_path, kind, cfg)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.rope_theta == 20000.0
    assert config.rope_scaling == {"rope_type": "yarn", "factor": 4.0}
    assert not hasattr(config, "rope_parameters")
    config.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "rope_parameters" not in saved and saved["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0}
    plain = CLASSES[kind][0](**{**cfg, "rope_parameters": {"rope_type": "default", "rope_theta": 30000.0}})
    assert (plain.rope_theta, plain.rope_scaling) == (30000.0, None)


def test_plain_rope_theta_changes_still_apply():
    config = make_config("llada", None, rope_theta=10000.0)
    inv_freq = CLASSES["llada"][1](config).model.rotary_emb.inv_freq
    torch.testing.assert_close(inv_freq, 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16), rtol=0, atol=0)


# ------------------------------------------------------------------------- the position limit


@pytest.mark.parametrize("rope", TYPES)
def test_limit_is_the_original_times_factor_when_the_config_states_the_original(rope):
    for kind in KINDS:
        config = make_config(kind, rope)
        assert position_limit(config) == LIMITS[rope]
    note = position_limit_note(config)
    assert note == "no RoPE scaling" if rope == "default" else note.startswith("32 original positions x ")


@pytest.mark.parametrize(
    ("scaling", "extra", "limit"),
    [
        # Phi-3 style: the checkpoint states its extended window itself
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}, {}, 32),
        ({"type": "longrope", "long_factor": [2.0] * HALF, "short_factor": [1.0] * HALF}, {}, 32),  # no factor
        (
            {"type": "longrope", "long_factor": [2.0] * HALF, "short_factor": [1.0] * HALF},
            {"original_max_position_embeddings": 8},  # next to max_position_embeddings, as Phi-3 writes it
            32,
        ),
        ({"rope_type": "default"}, {}, 32),
    ],
)
def test_limit_trusts_a_config_that_states_its_own_window(scaling, extra, limit):
    config = make_config("dream", scaling, **extra)
    assert position_limit(config) == limit
    assert "as the config states" in position_limit_note(config) or scaling.get("rope_type") == "default"


def test_limit_of_configs_without_a_stated_maximum_is_none():
    assert position_limit(None) is None
    assert position_limit(object()) is None


@pytest.mark.parametrize("kind", KINDS)
def test_a_canvas_past_the_scaled_limit_names_both_numbers(kind):
    model = build(kind, "yarn")
    ids, mask = prompts()
    gen = "gen_length" if kind == "llada" else "max_new_tokens"
    too_long = {gen: 113, "steps": 1, **({"block_length": 113} if kind == "llada" else {})}
    match = (
        rf"prompt length 16 \+ {gen} 113 = 129 tokens, more than the model's position limit of 128 "
        r"\(32 original positions x yarn RoPE scaling factor 4\)"
    )
    with pytest.raises(ValueError, match=match):
        GENERATE[kind](model, ids, mask, **too_long)


# --------------------------------------------------------------------- overrides (CLI, harness)


@pytest.mark.parametrize(
    ("text", "scaling"),
    [
        ("yarn:4", {"rope_type": "yarn", "factor": 4}),
        ("linear:2", {"rope_type": "linear", "factor": 2}),
        ("dynamic:1.5", {"rope_type": "dynamic", "factor": 1.5}),
        ("Yarn:8", {"rope_type": "yarn", "factor": 8}),
        ("none", None),
    ],
)
def test_parse_rope_scaling(text, scaling):
    assert parse_rope_scaling(text) == scaling


@pytest.mark.parametrize("text", ["yarn", "yarn:", "yarn:x", "yarn:0.5", "yarn:nan", "ntk:2", "llama3:8", ":4", ""])
def test_parse_rope_scaling_refuses_with_what_it_expected(text):
    with pytest.raises(ValueError, match=r"^none or TYPE:FACTOR with TYPE linear, dynamic or yarn and FACTOR"):
        parse_rope_scaling(text)


def test_parse_rope_scaling_sends_longrope_to_config_json():
    with pytest.raises(ValueError, match=r"longrope takes per-dimension factors, which only a config\.json can give"):
        parse_rope_scaling("longrope:4")


@pytest.mark.parametrize("kind", KINDS)
def test_with_rope_scaling_starts_from_the_trained_length(kind):
    base = make_config(kind, None)
    yarn = with_rope_scaling(base, {"rope_type": "yarn", "factor": 4})
    assert type(yarn) is type(base) and base.rope_scaling is None  # a copy
    assert yarn.rope_scaling == {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": ORIGINAL}
    assert position_limit(yarn) == 128
    # a checkpoint that already extends its window: the new scaling replaces it over the original
    extended = make_config(kind, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8})
    assert position_limit(extended) == ORIGINAL
    assert position_limit(with_rope_scaling(extended, {"rope_type": "linear", "factor": 2})) == 16
    assert position_limit(with_rope_scaling(extended, None)) == 8
    assert with_rope_scaling(extended, None).rope_scaling is None


# --------------------------------------------------------------------------------- bad dicts


LONG = {"long_factor": [2.0] * HALF, "short_factor": [1.0] * HALF}


@pytest.mark.parametrize(
    ("scaling", "error", "match"),
    [
        ("yarn", TypeError, r"rope_scaling must be a dict or None, got str \('yarn'\)"),
        ({"factor": 2.0}, ValueError, r"rope_scaling must name its type in 'rope_type' \(or 'type'\), one of \("),
        ({"rope_type": "yarnn", "factor": 2.0}, ValueError,
         r"rope_scaling\['rope_type'\] must be one of \('default', 'linear', 'dynamic', 'yarn', 'longrope'\), "
         r"got 'yarnn'"),
        ({"rope_type": "linear", "type": "yarn", "factor": 2.0}, ValueError,
         r"rope_scaling\['rope_type'\] and rope_scaling\['type'\] must name the same type, got 'linear' and 'yarn'"),
        ({"rope_type": "yarn"}, ValueError, r"rope_scaling must hold 'factor' for rope_type 'yarn', got \{"),
        ({"rope_type": "longrope", "short_factor": [1.0] * HALF}, ValueError,
         r"rope_scaling must hold 'long_factor' for rope_type 'longrope'"),
        ({"rope_type": "linear", "factor": 0.5}, ValueError,
         r"rope_scaling\['factor'\] must be a number >= 1.0 for rope_type 'linear', got 0.5"),
        ({"rope_type": "dynamic", "factor": "2"}, TypeError,
         r"rope_scaling\['factor'\] must be a number >= 1.0 for rope_type 'dynamic', got '2'"),
        ({"rope_type": "linear", "factor": True}, TypeError, r"rope_scaling\['factor'\] must be a number .*got True"),
        ({"rope_type": "linear", "factor": float("inf")}, ValueError, r"rope_scaling\['factor'\] .*got inf"),
        ({"rope_type": "linear", "factor": 2.0, "beta_fast": 32}, ValueError,
         r"rope_scaling for rope_type 'linear' accepts the fields \['factor', 'rope_type'\], got 'beta_fast'"),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}, ValueError,
         r"rope_scaling\['original_max_position_embeddings'\] must be an int >= 1 for rope_type 'yarn', got 0"),
        ({"rope_type": "yarn", "factor": 4.0, "attention_factor": -1.0}, ValueError,
         r"rope_scaling\['attention_factor'\] must be a number > 0.0 for rope_type 'yarn', got -1.0"),
        ({"rope_type": "yarn", "factor": 4.0, "beta_fast": 1, "beta_slow": 2}, ValueError,
         r"rope_scaling\['beta_fast'\] must be greater than beta_slow=2, got 1"),
        ({"rope_type": "yarn", "factor": 4.0, "truncate": "no"}, TypeError,
         r"rope_scaling\['truncate'\] must be a bool for rope_type 'yarn', got 'no'"),
        ({"rope_type": "longrope", **LONG, "short_factor": [1.0] * 7}, ValueError,
         r"rope_scaling\['short_factor'\] must be a list of 8 numbers > 0 \(head_dim / 2\) for rope_type "
         r"'longrope', got 7 numbers"),
        ({"rope_type": "longrope", **LONG, "long_factor": [2.0] * 7 + [0.0]}, ValueError,
         r"rope_scaling\['long_factor'\] must be a list of 8 numbers > 0 .*got 0.0 among them"),
        ({"rope_type": "longrope", **LONG, "long_factor": 2.0}, TypeError,
         r"rope_scaling\['long_factor'\] must be a list of 8 numbers > 0 .*got float \(2.0\)"),
        ({"rope_type": "linear", "factor": 2.0, "rope_theta": 5.0}, ValueError,
         r"rope_scaling\['rope_theta'\] must equal rope_theta=\S+, got 5.0"),
        ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, ValueError,
         r"rope_scaling\['partial_rotary_factor'\] must be 1.0 \(the ports rotate whole heads\), got 0.5"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("kind", KINDS)
def test_bad_scaling_dicts_raise_when_the_config_is_built(kind, scaling, error, match):
    with pytest.raises(error, match=match):
        make_config(kind, None, rope_scaling=scaling)


@pytest.mark.parametrize("kind", KINDS)
def test_more_bad_configs(kind):
    with pytest.raises(ValueError, match=r"rope_scaling\['original_max_position_embeddings'\] must equal the "
                                         r"config's original_max_position_embeddings=16, got 8"):  # fmt: skip
        make_config(kind, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
                    original_max_position_embeddings=16)  # fmt: skip
    with pytest.raises(ValueError, match=r"rope_scaling and rope_parameters must not disagree, got rope_scaling="):
        make_config(kind, "linear", rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(TypeError, match=r"rope_parameters must be a dict, got list"):
        make_config(kind, None, rope_parameters=[])


@pytest.mark.parametrize("kind", KINDS)
def test_a_type_transformers_knows_but_the_ports_do_not_parses_and_refuses_to_build(kind):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    config = make_config(kind, scaling)  # parses, as every unimplemented setting does
    with pytest.raises(NotImplementedError, match=r"rope_scaling=.*'llama3'.* is not implemented \(supported "):
        CLASSES[kind][1](config)
