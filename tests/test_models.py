"""LLaDA and Dream ports: official configs parse, official checkpoints load with no missing or
unexpected keys, and logits match an independent eager implementation on every backend."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AttentionInterface, AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from eager_models import dream_logits, llada_logits
from numerics import assert_close_3way
from sparsed_backend.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM, register_models
from tiny_models import (
    DREAM_7B_CONFIG,
    LLADA_8B_CONFIG,
    MASK_ID,
    TINY,
    official_shapes,
    tiny_model,
    write_checkpoint,
)

register_models()
register_models()  # idempotent

KINDS = ("llada", "dream")
OFFICIAL = {"llada": LLADA_8B_CONFIG, "dream": DREAM_7B_CONFIG}
CLASSES = {"llada": (LLaDAConfig, LLaDAModelLM), "dream": (DreamConfig, DreamModel)}
EAGER = {"llada": llada_logits, "dream": dream_logits}
BATCH, LENGTH, PAD = 2, 48, 5  # the one (B, L) every backend test runs: compiled kernels are shared


def padded_batch(seed: int = 0):
    """Two rows of LENGTH tokens, the first left-padded by PAD; positions cumsum(mask) - 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, MASK_ID, (BATCH, LENGTH), generator=g)
    ids[1, 30:40] = MASK_ID  # some mask tokens, as during denoising
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[0, :PAD] = 0
    ids[0, :PAD] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, position_ids


def check_logits(kind: str, model, device: torch.device, **kwargs) -> None:
    """Model logits (on `device`) against the independent eager forward: golden in float64 and
    a low-precision reference in the model's dtype, both from the model's own weights
    (the three-way check of docs/testing.md, section 2)."""
    ids, mask, pos = padded_batch()
    with torch.no_grad():
        logits = model(
            ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), **kwargs
        ).logits.cpu()
    sd = {k: v.cpu() for k, v in model.state_dict().items()}
    golden = EAGER[kind](sd, TINY[kind], ids, mask, pos, dtype=torch.float64)
    lowprec = EAGER[kind](sd, TINY[kind], ids, mask, pos, dtype=model.dtype)
    assert_close_3way(logits, golden, lowprec, where=mask.bool())  # pad rows may hold anything


# ------------------------------------------------------------------------- configs, loading


@pytest.mark.parametrize("trust_remote_code", [True, False, None])
@pytest.mark.parametrize("kind", KINDS)
def test_official_config_parses_to_local_class(tmp_path, kind, trust_remote_code):
    cfg = {**OFFICIAL[kind], "some_future_field": [1, 2]}  # unknown fields must parse too
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # The auto_map points at .py files that do not exist here: loading them would fail.
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=trust_remote_code)
    config_class, model_class = CLASSES[kind]
    assert type(config) is config_class
    for key, value in OFFICIAL[kind].items():
        if key not in ("torch_dtype", "transformers_version"):
            assert getattr(config, key) == value, key
    assert config.some_future_field == [1, 2]
    assert config.dtype == torch.bfloat16
    # The 8B / 7B shapes, built on the meta device: exactly the official keys and shapes.
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    assert type(model) is model_class
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_shapes(kind, OFFICIAL[kind])


@pytest.mark.parametrize("trust_remote_code", [True, False])
@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForCausalLM])
@pytest.mark.parametrize("kind", KINDS)
def test_official_checkpoint_round_trips(tmp_path, kind, auto_class, trust_remote_code):
    sd = write_checkpoint(tmp_path / "official", kind)
    model, info = auto_class.from_pretrained(
        tmp_path / "official", trust_remote_code=trust_remote_code, output_loading_info=True
    )
    assert type(model) is CLASSES[kind][1]
    assert all(not v for v in info.values()), info
    assert model.dtype == torch.float32  # "torch_dtype" in config.json is float32 here
    loaded = model.state_dict()
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)

    model.save_pretrained(tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert saved.keys() == sd.keys()  # official names on the way out too
    again, info = auto_class.from_pretrained(
        tmp_path / "saved",
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
        dtype=torch.bfloat16,
    )
    assert all(not v for v in info.values()), info
    assert again.dtype == torch.bfloat16
    assert all(torch.equal(again.state_dict()[k], sd[k].to(torch.bfloat16)) for k in sd)


@pytest.mark.parametrize(
    ("kind", "override", "field"),
    [
        ("llada", {"alibi": True}, "alibi"),
        ("llada", {"weight_tying": True}, "weight_tying"),
        ("llada", {"include_bias": True}, "include_bias"),
        ("llada", {"layer_norm_type": "default"}, "layer_norm_type"),
        ("llada", {"block_type": "sequential"}, "block_type"),
        ("llada", {"activation_type": "gelu"}, "activation_type"),
        ("llada", {"rope": False}, "rope"),
        ("llada", {"scale_logits": True}, "scale_logits"),
        ("llada", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ("dream", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ("dream", {"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
    ],
)
def test_unsupported_settings_raise(kind, override, field):
    config_class, model_class = CLASSES[kind]
    config = config_class(**{**TINY[kind], **override})  # parses ...
    with pytest.raises(NotImplementedError, match=field):
        model_class(config)  # ... but building a model refuses


def test_llada_qkv_bias_and_default_kv_heads():
    cfg = {**TINY["llada"], "include_qkv_bias": True, "n_kv_heads": None}
    model = LLaDAModelLM(LLaDAConfig(**cfg))
    keys = model.state_dict().keys()
    assert "model.transformer.blocks.0.q_proj.bias" in keys
    assert model.model.transformer.blocks[0].num_key_value_groups == 1


# --------------------------------------------------------------------------------- logits


# flex_attention's first compile in a process takes 10-30 s on 2 CPU cores (then ~1 s).
@pytest.mark.parametrize("attn", ["eager", "sdpa", pytest.param("flex_attention", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_independent_eager(kind, attn, device):
    model = tiny_model(kind).to(device)
    model.set_attn_implementation(attn)
    # Runs after the "sparsed" tests on purpose: sparsed compiles its own wrapper, so its
    # static-shape cache no longer shares dynamo state with transformers' compiled
    # flex_attention (which used to fail here with CppCompileError 'cur_kvSplitSize0').
    check_logits(kind, model, device)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_logits_match_independent_eager(kind, attn, device):
    model = copy.deepcopy(tiny_model(kind)).to(device=device, dtype=torch.bfloat16)
    model.set_attn_implementation(attn)
    check_logits(kind, model, device)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_without_mask_or_positions(kind):
    model = tiny_model(kind).cpu()
    model.set_attn_implementation("sdpa")
    ids = padded_batch()[0][1:]
    with torch.no_grad():
        logits = model(ids).logits
    sd = model.state_dict()
    golden = EAGER[kind](sd, TINY[kind], ids, dtype=torch.float64)
    lowprec = EAGER[kind](sd, TINY[kind], ids, dtype=torch.float32)
    assert_close_3way(logits, golden, lowprec)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_to_keep(kind):
    model = tiny_model(kind).cpu()
    model.set_attn_implementation("sdpa")
    ids, mask, pos = padded_batch()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        last = model(ids, attention_mask=mask, position_ids=pos, logits_to_keep=7).logits
        index = torch.tensor([3, 10, 11, 47])
        picked = model(ids, attention_mask=mask, position_ids=pos, logits_to_keep=index).logits
    assert full.shape == (BATCH, LENGTH, 128)
    torch.testing.assert_close(last, full[:, -7:], rtol=0, atol=0)
    torch.testing.assert_close(picked, full[:, index], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_hidden_states_and_tuple_output(kind):
    model = tiny_model(kind).cpu()
    model.set_attn_implementation("sdpa")
    ids = padded_batch()[0]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        as_tuple = model(ids, return_dict=False)
    assert len(out.hidden_states) == 3  # embeddings + 2 layers
    torch.testing.assert_close(as_tuple[0], out.logits)


def test_dream_output_attentions_with_eager():
    model = tiny_model("dream").cpu()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(padded_batch()[0], output_attentions=True)
    assert len(out.attentions) == 2
    assert out.attentions[0].shape == (BATCH, 4, LENGTH, LENGTH)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(BATCH, 4, LENGTH))


SENTINEL_MASK = object()
CALLS: list = []


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    CALLS.append({"module": module, "mask": attention_mask, "kwargs": kwargs, "shapes": (query.shape, key.shape)})
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def _recording_mask(*args, **kwargs):
    return SENTINEL_MASK


AttentionInterface.register("recording_test", _recording_attention)
AttentionMaskInterface.register("recording_test", _recording_mask)


@pytest.mark.parametrize("kind", KINDS)
def test_kwargs_and_backend_mask_reach_every_attention_call(kind):
    model = tiny_model(kind).cpu()
    model.set_attn_implementation("recording_test")
    ids, mask, pos = padded_batch()
    state = object()
    CALLS.clear()
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=pos, sparsed_state=state, logits_to_keep=4)
    assert len(CALLS) == 2
    assert sorted(c["module"].layer_idx for c in CALLS) == [0, 1]
    for call in CALLS:
        assert call["mask"] is SENTINEL_MASK  # the backend's own mask object, untouched
        assert call["kwargs"]["sparsed_state"] is state
        assert call["kwargs"]["is_causal"] is False
        assert call["module"].is_causal is False
        assert call["module"].num_key_value_groups == 2
        assert call["kwargs"]["scaling"] == call["module"].scaling == 16**-0.5
        q_shape, k_shape = call["shapes"]
        assert tuple(q_shape) == (BATCH, 4, LENGTH, 16)
        assert tuple(k_shape) == (BATCH, 2, LENGTH, 16)  # K/V not repeated for GQA


@pytest.mark.parametrize("kind", KINDS)
def test_sparsed_logits_match_independent_eager(kind, device):
    import sparsed_backend  # noqa: F401  (registers the "sparsed" attention)
    from sparsed_backend.attention.config import SparseDConfig
    from sparsed_backend.attention.state import SparseDState

    model = tiny_model(kind).to(device)
    model.set_attn_implementation("sparsed")
    config = SparseDConfig(select=1.0, skip=0.0, block_size=16, min_sparse_len=0)
    state = SparseDState(config=config, steps=2)
    try:
        assert state.mode == "switch"
        check_logits(kind, model, device, sparsed_state=state)
        assert len(state.layers) == 2  # the switch step selected blocks for both layers
        state.advance()
        assert state.mode == "sparse"
        check_logits(kind, model, device, sparsed_state=state)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("attn", ["sdpa", "sparsed"])
@pytest.mark.parametrize("kind", KINDS)
def test_nan_in_padded_embeddings_does_not_leak(kind, attn):
    """The models zero padded positions once per forward, so NaN embeddings there (a user's
    inputs_embeds, say) reach no real row: dense, switch and sparse steps alike."""
    import sparsed_backend  # noqa: F401  (registers the "sparsed" attention)
    from sparsed_backend.attention.config import SparseDConfig
    from sparsed_backend.attention.state import SparseDState

    model = tiny_model(kind).cpu()
    model.set_attn_implementation(attn)
    ids, mask, pos = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    poisoned = embeds.clone()
    poisoned[0, :PAD] = float("nan")
    config = SparseDConfig(select=0.5, skip=0.0, block_size=16, min_sparse_len=0)
    states = [SparseDState(config=config, steps=2) for _ in range(2)] if attn == "sparsed" else None
    try:
        for _ in range(2 if states else 1):
            extra = [{"sparsed_state": s} for s in states] if states else [{}, {}]
            with torch.no_grad():
                clean = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, **extra[0]).logits
                dirty = model(inputs_embeds=poisoned, attention_mask=mask, position_ids=pos, **extra[1]).logits
            assert torch.isfinite(dirty[real]).all()
            torch.testing.assert_close(dirty[real], clean[real], rtol=0, atol=0)
            for s in states or ():
                s.advance()
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained_with_sparsed_attention(tmp_path, kind):
    import sparsed_backend  # noqa: F401  (registers the "sparsed" attention)

    write_checkpoint(tmp_path, kind)
    model, info = AutoModel.from_pretrained(tmp_path, attn_implementation="sparsed", output_loading_info=True)
    assert all(not v for v in info.values()), info
    assert model.config._attn_implementation == "sparsed"
    reference = tiny_model(kind).cpu()
    reference.set_attn_implementation("sdpa")
    ids, mask, pos = padded_batch()
    with torch.no_grad():  # no sparsed_state: plain dense attention
        got = model(ids, attention_mask=mask, position_ids=pos, logits_to_keep=8).logits
        expected = reference(ids, attention_mask=mask, position_ids=pos, logits_to_keep=8).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused elementwise kernels run on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_elementwise_match_eager_on_cuda(dtype):
    """RMSNorm, RoPE and SwiGLU compiled into one kernel each compute what the eager code does."""
    from sparsed_backend.models._common import rms_norm, swiglu
    from sparsed_backend.models.dream.modeling_dream import apply_rotary_pos_emb as dream_rope
    from sparsed_backend.models.llada.modeling_llada import apply_rotary_pos_emb as llada_rope

    g = torch.Generator(device="cuda").manual_seed(0)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    for n in (7, 300):  # two lengths through the same dynamic-shape kernels
        x = torch.randn(2, n, 64, device="cuda", dtype=dtype, generator=g)
        w = torch.rand(64, device="cuda", dtype=dtype, generator=g) + 0.5
        torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm.eager(x, w, 1e-5), **tol)
        torch.testing.assert_close(swiglu(x, x.flip(-1)), swiglu.eager(x, x.flip(-1)), **tol)
        q = torch.randn(2, 4, n, 16, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(2, 2, n, 16, device="cuda", dtype=dtype, generator=g)
        ang = torch.rand(2, n, 16, device="cuda", generator=g) * 6.3
        cos, sin = ang.cos(), ang.sin()
        for fused, eager, extra in ((llada_rope, llada_rope.eager, (True,)), (dream_rope, dream_rope.eager, ())):
            for got, want in zip(fused(q, k, cos, sin, *extra), eager(q, k, cos, sin, *extra), strict=True):
                torch.testing.assert_close(got, want, **tol)
