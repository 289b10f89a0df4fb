"""Prefix / dual K/V caching for block-wise sampling (kv_cache.py) on the tiny models."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import sparsed_backend  # noqa: F401  (registers the "sparsed" attention)
from sparsed_backend.attention.config import SparseDConfig
from sparsed_backend.attention.state import SparseDState
from sparsed_backend.sampling.generation import dream_generate, llada_generate
from sparsed_backend.sampling.kv_cache import BlockKVCache
from tiny_models import MASK_ID, never_predicting_mask, padded_pair, tiny_model

GENERATE = {"llada": llada_generate, "dream": dream_generate}
P, G, BL = 16, 32, 16  # prompt, generated tokens, block length: the shapes test_generation uses


def prompts(seed: int = 0):
    """Two prompts, the second left padded by 6: ids (2, P), mask (2, P)."""
    return padded_pair(seed, P, 6)


def with_attn(kind: str, attn: str):
    model = tiny_model(kind)
    model.set_attn_implementation(attn)
    return model


def args(kind: str, **overrides) -> dict:
    base = (
        {"steps": 8, "gen_length": G, "block_length": BL}
        if kind == "llada"
        else {"steps": 8, "max_new_tokens": G, "block_length": BL, "alg": "entropy"}
    )
    return {**base, **overrides}


_recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _recording_sdpa(module, query, key, value, attention_mask, **kwargs):
    _recorded[module.layer_idx] = (key.clone(), value.clone())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("recording_sdpa", _recording_sdpa)
AttentionMaskInterface.register("recording_sdpa", sdpa_mask)


def canvas(seed: int = 1):
    ids, mask = prompts(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([ids, torch.randint(2, MASK_ID, (2, G), generator=g)], 1)
    x[:, P + 20 :] = MASK_ID  # later blocks still masked, as during sampling
    full = torch.cat([mask, torch.ones(2, G, dtype=torch.long)], 1)
    return x, full, (full.cumsum(-1) - 1).clamp_min(0)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_refresh_caches_fresh_k_v_and_a_window_on_unchanged_tokens_equals_the_full_forward(kind, mode):
    """A refresh stores exactly the K/V a plain forward computes and returns its logits; a
    windowed forward over unchanged tokens reproduces the full forward's logits there."""
    x, mask, pos = canvas()
    model = with_attn(kind, "recording_sdpa")
    with torch.no_grad():
        plain = model(x, attention_mask=mask, position_ids=pos).logits
        fresh = dict(_recorded)
        model.set_attn_implementation("sdpa")
        cache = BlockKVCache(mode)
        cache.refresh()
        refreshed = model(x, attention_mask=mask, position_ids=pos, kv_cache=cache).logits
        torch.testing.assert_close(refreshed, plain, rtol=0, atol=0)
        for layer, (k, v) in fresh.items():
            torch.testing.assert_close(cache._keys[layer], k, rtol=0, atol=0)
            torch.testing.assert_close(cache._values[layer], v, rtol=0, atol=0)
        start, stop = P + BL, (x.shape[1] if mode == "prefix" else P + 2 * BL)
        cache.set_window(start, stop)
        window = model(x[:, start:stop], attention_mask=mask, position_ids=pos[:, start:stop], kv_cache=cache).logits
    torch.testing.assert_close(window, plain[:, start:stop], rtol=1e-5, atol=1e-5)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


def count_kernel_calls(monkeypatch, name: str) -> list[int]:
    """The query rows of every call to ``kernels.sparse_decode.<name>`` from now on (the kernel
    still runs)."""
    from sparsed_backend.attention.kernels import sparse_decode

    calls, real = [], getattr(sparse_decode, name)
    monkeypatch.setattr(sparse_decode, name, lambda *a, **k: calls.append(a[0].shape[2]) or real(*a, **k))
    return calls


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("start", [P, P + 4])
@pytest.mark.parametrize("offset", [None, 8])
@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_sparse_window_uses_the_switch_steps_rows(kind, offset, start, device, monkeypatch):
    """A refresh on a sparse step, then a cached sparse step on a window with the tokens
    unchanged: the window's logits are the refresh's rows (the same selected blocks). Windows
    on a block edge of the selection's grid and inside a block (zero query rows in front), on
    the reference grid (offset None) and on a moved one (front 8 at P 16). On CUDA a window in
    one query block of the grid (the reference grid's) runs through the block-sparse decode
    kernel (counted; its dot products in TF32, hence the tolerance), the others through
    FlexAttention; under Triton's interpreter the kernel's windows match to 1e-5
    (tests/interpreted_checks.py)."""
    taken = count_kernel_calls(monkeypatch, "sparse_decode_attention") if device == "cuda" else []
    x, mask, pos = (t.to(device) for t in canvas(2))
    model = with_attn(kind, "sparsed").to(device)
    cfg = SparseDConfig(skip=0.0, select=0.5, block_size=16, min_sparse_len=0, prompt_end_offset=offset)
    state = SparseDState(cfg, steps=3, gen_start=P)
    cache = BlockKVCache("dual")
    try:
        with torch.no_grad():
            model(x, attention_mask=mask, position_ids=pos, sparsed_state=state)  # the switch step
            state.advance()
            cache.refresh()
            full = model(x, attention_mask=mask, position_ids=pos, sparsed_state=state, kv_cache=cache).logits
            state.advance()
            cache.set_window(start, P + BL)
            rows = {"position_ids": pos[:, start : P + BL], "sparsed_state": state, "kv_cache": cache}
            part = model(x[:, start : P + BL], attention_mask=mask, **rows).logits
    finally:
        model.set_attn_implementation("sdpa")
        model.cpu()
    assert state.mode == "sparse" and state.layers[0].density < 1
    assert state.layers[0].front == (0 if offset is None else 8)
    assert len(taken) == (2 if device == "cuda" and offset is None else 0)  # both layers' windows
    tolerance = 1e-5 if device == "cpu" else 2e-3
    torch.testing.assert_close(part, full[:, start : P + BL], rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the split-KV dense decode kernel)")
@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_a_dense_window_through_the_decode_kernel_gives_sdpas_logits(kind, monkeypatch):
    """On CUDA (fp32 model, TF32 dot products): loaded with "sparsed" and no SparseD state, a
    cache window runs through the split-KV dense decode kernel (counted) and its logits are the
    same model's on SDPA (checked exactly under Triton's interpreter: tests/interpreted_checks.py)."""
    taken = count_kernel_calls(monkeypatch, "dense_decode_attention")
    x, mask, pos = (t.cuda() for t in canvas(3))
    model = tiny_model(kind).cuda()
    logits = []
    try:
        for attn in ("sdpa", "sparsed"):
            model.set_attn_implementation(attn)
            cache = BlockKVCache("dual")
            with torch.no_grad():
                cache.refresh()
                model(x, attention_mask=mask, position_ids=pos, kv_cache=cache)
                cache.set_window(P, P + BL)
                rows = {"position_ids": pos[:, P : P + BL], "kv_cache": cache}
                logits.append(model(x[:, P : P + BL], attention_mask=mask, **rows).logits)
    finally:
        model.set_attn_implementation("sdpa")
        model.cpu()
    assert len(taken) == 2  # both layers' windows
    torch.testing.assert_close(logits[1], logits[0], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_one_step_per_block_never_uses_the_cache_and_equals_no_cache(kind, mode):
    """With one step per block every step is a refresh: the cached sampler is exactly the plain one."""
    model = with_attn(kind, "sdpa")
    ids, mask = prompts()
    plain = GENERATE[kind](model, ids, mask, **args(kind, steps=2))
    cached = GENERATE[kind](model, ids, mask, kv_cache=mode, **args(kind, steps=2))
    assert torch.equal(cached, plain)


def test_dream_block_length_of_the_whole_generation_is_the_unblocked_sampler():
    model = with_attn("dream", "sdpa")
    ids, mask = prompts()
    a = dream_generate(model, ids, mask, steps=8, max_new_tokens=G, alg="entropy")
    b = dream_generate(model, ids, mask, steps=8, max_new_tokens=G, alg="entropy", block_length=G)
    assert torch.equal(a, b)


CASES = [
    ("llada", {"remasking": "low_confidence"}),
    ("llada", {"remasking": "random", "temperature": 0.7}),
    ("dream", {"alg": "entropy"}),
    ("dream", {"alg": "origin", "temperature": 0.7}),
    ("dream", {"alg": "maskgit_plus", "temperature": 0.7, "alg_temp": 0.5}),
]


@pytest.mark.parametrize("sparsed", [False, True])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize(("kind", "overrides"), CASES)
def test_cached_sampling_decodes_everything_and_padded_rows_do_not_touch_batch_mates(kind, overrides, mode, sparsed):
    """Every remasking rule, GQA (the tiny models have 4 query / 2 kv heads), a padded row: the
    cached sampler keeps the prompt, and a row's tokens do not depend on the other row of its
    batch."""
    model = with_attn(kind, "sparsed" if sparsed else "sdpa")
    cfg = SparseDConfig(skip=0.25, select=0.5, block_size=16, min_sparse_len=0) if sparsed else None
    ids, mask = prompts(3)
    other, other_mask = prompts(4)
    run = lambda i, m: GENERATE[kind](  # noqa: E731
        model, i, m, kv_cache=mode, sparsed=cfg, generator=torch.Generator().manual_seed(0),
        return_dict_in_generate=True, **args(kind, **overrides),
    )  # fmt: skip

    try:
        with never_predicting_mask(model):  # a mask left in the output = an undecoded position
            out = run(ids, mask)
            mixed = run(torch.stack([other[0], ids[1]]), torch.stack([other_mask[0], mask[1]]))
    finally:
        model.set_attn_implementation("sdpa")
    seq = out.sequences
    assert torch.equal(seq[:, :P], ids)
    assert not (seq[:, P:] == MASK_ID).any(), "a mask token is left"
    assert out.num_forwards == 8 and seq.shape == (2, P + G)
    # skip 0.25 of 8 steps: the paper's switch is step 2, inside the first block; cached, it
    # moves to the second block's first step (step 4), a refresh the cache runs anyway, and
    # selects there for every layer: no extra full forward.
    if sparsed:
        assert out.sparsed_state.switch == 4 and sorted(out.sparsed_state.layers) == [0, 1]
    assert out.kv_cache.refreshes == 2
    if overrides.get("temperature", 0) == 0 and overrides.get("remasking") != "random":
        assert torch.equal(mixed.sequences[1], seq[1])


@pytest.mark.parametrize(
    ("paper", "per_block", "blocks", "want"),
    [(2, 4, 2, 4), (4, 4, 2, 4), (0, 4, 2, 0), (5, 4, 2, 5), (3, 8, 1, 3), (51, 32, 8, 64)],
)
def test_a_cached_schedule_switches_on_the_next_block_start(paper, per_block, blocks, want):
    """The first block start at or after the paper's switch step (256 steps in 8 blocks, skip 0.2:
    step 51 -> 64), or the paper's step when no block starts after it."""
    from sparsed_backend.sampling._shared import cached_switch_step

    assert cached_switch_step(paper, per_block, blocks) == want


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_one_cached_block_switches_at_the_papers_step_with_one_more_refresh(kind):
    """No block starts after the paper's switch step: it stays, and refreshes the cache once more."""
    model = with_attn(kind, "sparsed")
    ids, mask = prompts(6)
    cfg = SparseDConfig(skip=0.25, select=0.5, block_size=16, min_sparse_len=0)
    one_block = {"block_length": G} if kind == "llada" else {"block_length": G, "steps": 8}
    try:
        out = GENERATE[kind](
            model, ids, mask, kv_cache="prefix", sparsed=cfg, return_dict_in_generate=True, **args(kind, **one_block)
        )
    finally:
        model.set_attn_implementation("sdpa")
    assert out.sparsed_state.switch == 2 and out.kv_cache.refreshes == 2


def test_switch_at_must_be_a_later_step_of_a_fixed_schedule():
    cfg = SparseDConfig(skip=0.25)
    assert SparseDState(cfg, steps=8, switch_at=4).switch == 4
    with pytest.raises(ValueError, match=r"switch_at must be in \[2, 8\)"):
        SparseDState(cfg, steps=8, switch_at=1)
    with pytest.raises(ValueError, match=r"switch_at must be in \[2, 8\)"):
        SparseDState(cfg, steps=8, switch_at=8)
    with pytest.raises(ValueError, match="switch_at needs a fixed schedule"):
        SparseDState(cfg, steps=None, switch_at=4)


BAD = [
    ("llada", {"kv_cache": "full"}, ValueError, r"kv_cache must be None, 'prefix' or 'dual', got 'full'"),
    ("dream", {"kv_cache": "prefix", "block_length": None}, ValueError, r"kv_cache='prefix' needs block_length"),
    ("llada", {"kv_cache": "dual", "cfg_scale": 1.0}, ValueError, r"does not support classifier-free guidance"),
    ("dream", {"block_length": 10}, ValueError, r"max_new_tokens must be divisible by block_length"),
    ("dream", {"steps": 3}, ValueError, r"steps must be divisible by the number of blocks .* = 2, got steps=3"),
]


@pytest.mark.parametrize(("kind", "overrides", "error", "match"), BAD)
def test_bad_cache_arguments_raise(kind, overrides, error, match):
    model = with_attn(kind, "sdpa")
    ids, mask = prompts()
    with pytest.raises(error, match=match):
        GENERATE[kind](model, ids, mask, **args(kind, **overrides))


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_a_moved_block_grid_with_a_cache_at_select_one_equals_the_reference_grid(kind, mode):
    """The default grid (prompt_end_offset "middle": front 8 at P 16, block 16) through the
    cached sampler, whose windows begin mid-block on that grid: keeping every block, it decodes
    the tokens of the reference grid (offset None) under the same cache and refresh schedule."""
    ids, mask = prompts(5)
    model = with_attn(kind, "sparsed")
    outs = {}
    try:
        for offset in ("middle", None):
            cfg = SparseDConfig(skip=0.25, select=1.0, block_size=16, min_sparse_len=0, prompt_end_offset=offset)
            outs[offset] = GENERATE[kind](
                model, ids, mask, kv_cache=mode, sparsed=cfg, return_dict_in_generate=True, **args(kind)
            )
    finally:
        model.set_attn_implementation("sdpa")
    assert all(sel.front == 8 for sel in outs["middle"].sparsed_state.layers.values())
    assert all(sel.front == 0 for sel in outs[None].sparsed_state.layers.values())
    assert torch.equal(outs["middle"].sequences, outs[None].sequences)


def test_reselect_and_unsupported_attention_are_refused_with_a_cache():
    ids, mask = prompts()
    model = with_attn("llada", "sparsed")
    try:
        with pytest.raises(ValueError, match=r"reselect=True needs a full forward at every step"):
            llada_generate(model, ids, mask, kv_cache="prefix", sparsed=SparseDConfig(reselect=True), **args("llada"))
    finally:
        model.set_attn_implementation("sdpa")
    cache = BlockKVCache("prefix")
    with pytest.raises(ValueError, match=r"set_window before any refresh"):
        cache.set_window(0, 4)
    model = with_attn("llada", "flex_attention")
    x, full, pos = canvas()
    try:
        cache.refresh()
        with torch.no_grad():
            model(x, attention_mask=full, position_ids=pos, kv_cache=cache)
        cache.set_window(P, P + BL)
        with pytest.raises(NotImplementedError, match=r"kv_cache supports the 'sdpa', 'eager' and 'sparsed'"):
            model(x[:, P : P + BL], attention_mask=full, position_ids=pos[:, P : P + BL], kv_cache=cache)
    finally:
        model.set_attn_implementation("sdpa")


# ------------------------------------------- what the cache approximates, on a trained model

# Token agreement of the cached sampler with the uncached one, on the shipped retrieval model:
# 16 fresh prompts of 512 tokens (seed 52000; training and the benchmarks never use it), 10
# tokens in 2 blocks of 5 with 5 steps each, so windows run on K/V that went stale inside a
# block and the second block starts from the first one's cache refresh. SparseD at block 32
# (16 key blocks), select 0.3. The floors come from the same settings on 64 other prompts
# (seed 53000): dense agreed on 614/640 tokens with either cache (95.9%), SparseD on 608/640
# (95.0%). A floor is that rate minus 3 binomial standard errors at this test's 160 tokens, so a
# fresh sample passes it, and a regression of about 5 points does not.
CACHE_FLOOR = {"dense": 0.912, "sparsed": 0.898}


@functools.cache
def _shipped_answers(attn: str, kv_cache: str | None, n_prompts: int = 16, seed: int = 52000) -> torch.Tensor:
    from transformers import AutoModel

    from sparsed_backend.demo import model_path
    from sparsed_backend.demo.task import sample_prompts

    model = AutoModel.from_pretrained(model_path(), attn_implementation="sparsed", dtype=torch.float32).eval()
    prompts = sample_prompts(512, n_prompts, seed=seed)
    cfg = SparseDConfig(skip=0.2, select=0.3, block_size=32, min_sparse_len=0) if attn == "sparsed" else None
    out = llada_generate(model, prompts.input_ids, steps=10, gen_length=10, block_length=5, sparsed=cfg,
                         kv_cache=kv_cache)  # fmt: skip
    return out[:, 512:]


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("attn", ["dense", "sparsed"])
def test_cached_decoding_agrees_with_uncached_on_the_shipped_model(attn, mode):
    """Several steps per block, two blocks: the cached tokens agree with the uncached sampler's
    at least as often as the measured floor, and nothing is left masked."""
    cached, uncached = _shipped_answers(attn, mode), _shipped_answers(attn, None)
    from sparsed_backend.demo.task import MASK_ID as SHIPPED_MASK_ID

    assert not (cached == SHIPPED_MASK_ID).any() and not (uncached == SHIPPED_MASK_ID).any(), "a mask token is left"
    agreement = (cached == uncached).float().mean().item()
    assert agreement >= CACHE_FLOOR[attn], f"{attn} + {mode}: {agreement:.3f} of tokens agree with no cache"
