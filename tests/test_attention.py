"""The "sparsed" attention function: dense/switch/sparse schedule against the fp64 oracle."""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import flex_attention

from numerics import assert_close_3way
from sparsed_backend import SparseDConfig, SparseDState, sparsed_attention_forward
from sparsed_backend._compat import compile_counters
from sparsed_backend.attention.flex_shapes import pad_to_mask
from sparsed_backend.attention.reference import (
    attention_reference,
    block_importance_reference,
    expand_table,
    topk_table_reference,
)
from sparsed_backend.attention.selection import generation_start_block
from sparsed_backend.attention.switch_step import block_importance

# Every distinct static shape compiles FlexAttention once (~5-20 s on 2 CPU cores), so the
# property tests draw shapes from this fixed pool: odd lengths, q_len != kv_len, GQA 1:1,
# 2:1, 4:1, 7:1, batches 1-3, block sizes 16-256, float32 and bfloat16.
# (B, Hq, Hkv, q_len, kv_len, head_dim, block_size, dtype)
SHAPES = [
    (1, 2, 2, 64, 64, 16, 16, torch.float32),
    (2, 4, 2, 100, 100, 32, 32, torch.float32),
    (1, 7, 1, 129, 129, 16, 64, torch.float32),
    (3, 4, 4, 65, 127, 16, 16, torch.float32),
    (1, 4, 1, 1000, 1000, 16, 128, torch.float32),
    (2, 4, 1, 63, 63, 32, 16, torch.bfloat16),
    (1, 2, 2, 7, 7, 16, 256, torch.float32),
    (1, 1, 1, 1, 1, 16, 16, torch.float32),
]
# On a GPU (SPARSED_TEST_DEVICE=cuda) every shape runs in bfloat16, the dtype of real use;
# SPARSED_TEST_SHAPES="1,2,4" restricts the pool to bound compile time on a lent machine.
POOL = SHAPES
if os.environ.get("SPARSED_TEST_DEVICE", "cpu").startswith("cuda"):
    POOL = [(*s[:-1], torch.bfloat16) for s in POOL]
if os.environ.get("SPARSED_TEST_SHAPES"):
    POOL = [POOL[int(i)] for i in os.environ["SPARSED_TEST_SHAPES"].split(",")]


def module(layer_idx=0, is_causal=False):
    return SimpleNamespace(layer_idx=layer_idx, is_causal=is_causal, training=False)


def make_inputs(shape, seed, pad_kind="none", device="cpu"):
    b, hq, hkv, q_len, kv_len, d, _, dtype = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, q_len, d, generator=g)
    # Peaked attention (large logits) so that dropping blocks visibly changes the output.
    k = torch.randn(b, hkv, kv_len, d, generator=g) * 1.5
    v = torch.randn(b, hkv, kv_len, d, generator=g)
    valid = None
    if pad_kind != "none" and kv_len > 1:
        valid = torch.ones(b, kv_len, dtype=torch.bool)
        for i in range(b):
            n_pad = int(torch.randint(0, kv_len // 2 + 1, (1,), generator=g))
            if pad_kind == "left":
                valid[i, :n_pad] = False
            else:
                valid[i, kv_len - n_pad :] = False
        valid = valid.to(device)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), valid


def run_schedule(q, k, v, valid, cfg, gen_start=None, steps=3):
    """Switch at step 0 (skip=0), then one sparse step. Returns (switch_out, sparse_out, state)."""
    state = SparseDState(cfg, steps=steps, gen_start=gen_start)
    mask = None if valid is None else valid[:, None, None, :]
    scale = q.shape[-1] ** -0.5
    outs = []
    for _ in range(2):
        out, weights = sparsed_attention_forward(module(), q, k, v, mask, scaling=scale, sparsed_state=state)
        assert weights is None
        outs.append(out.transpose(1, 2))  # back to (B, H, L, D)
        state.advance()
    return outs[0], outs[1], state


def real_rows(valid, q_len, kv_len, shape):
    """Query rows that stand for real tokens (q aligned to the end of kv, as in padding)."""
    b, hq, _, _, _, d, _, _ = shape
    if valid is None:
        return None
    rows = valid[:, kv_len - q_len :] if kv_len >= q_len else valid.new_ones(b, q_len)
    return rows[:, None, :, None].expand(b, hq, q_len, d)


shape_idx = st.integers(0, len(POOL) - 1)
seeds = st.integers(0, 2**31 - 1)
pads = st.sampled_from(["none", "left", "right"])


@settings(max_examples=min(40, settings.default.max_examples))  # the loaded profile may ask fewer (gpu: 30)
@given(shape_idx, seeds, pads)
def test_select_one_equals_dense(device, idx, seed, pad):
    shape = POOL[idx]
    q, k, v, valid = make_inputs(shape, seed, pad, device)
    cfg = SparseDConfig(skip=0.0, select=1.0, block_size=shape[6], min_sparse_len=0)
    switch_out, sparse_out, state = run_schedule(q, k, v, valid, cfg)
    scale = shape[5] ** -0.5
    golden = attention_reference(q, k, v, scale, valid)
    lowprec = attention_reference(q, k, v, scale, valid, dtype=q.dtype)
    where = real_rows(valid, shape[3], shape[4], shape)
    assert_close_3way(switch_out, golden, lowprec, where)
    assert_close_3way(sparse_out, golden, lowprec, where)
    assert state.density() == pytest.approx(1.0)


@settings(max_examples=min(40, settings.default.max_examples))  # the loaded profile may ask fewer (gpu: 30)
@given(shape_idx, seeds, pads, st.sampled_from([0.1, 0.2, 0.3, 0.5]), st.booleans())
def test_select_below_one_equals_reference_masked_by_the_same_blocks(device, idx, seed, pad, select, gen):
    shape = POOL[idx]
    b, hq, _, q_len, kv_len, d, block, _ = shape
    q, k, v, valid = make_inputs(shape, seed, pad, device)
    gen_start = kv_len // 2 if gen else None
    # The reference's grid (prompt_end_offset None): the oracle below ranks the blocks from 0.
    cfg = SparseDConfig(skip=0.0, select=select, block_size=block, min_sparse_len=0, prompt_end_offset=None)
    _, sparse_out, state = run_schedule(q, k, v, valid, cfg, gen_start)
    table = state.layers[0].table
    # The selection is SparseD's rule applied to the layer's real block importance (computed
    # by the device's implementation; tests/test_kernels.py checks it against the oracle).
    importance = block_importance(q, k, d**-0.5, block, valid)
    gen_block = generation_start_block(gen_start, block, importance.shape[-1])
    gen_imp = None
    if gen_block is not None and 0 < gen_block < importance.shape[-1]:
        # The generation blocks are ranked under a softmax over the generation keys alone.
        g0 = gen_block * block
        gen_imp = block_importance(q, k[:, :, g0:], d**-0.5, block, None if valid is None else valid[:, g0:])
    assert torch.equal(table.cpu(), topk_table_reference(importance, select, gen_block, True, gen_imp))
    # The output is attention restricted to exactly those blocks, built without BlockMask.
    tokens = expand_table(table, block, q_len, kv_len)
    golden = attention_reference(q, k, v, d**-0.5, valid, tokens)
    lowprec = attention_reference(q, k, v, d**-0.5, valid, tokens, dtype=q.dtype)
    assert_close_3way(sparse_out, golden, lowprec, real_rows(valid, q_len, kv_len, shape))


def test_importance_of_the_backend_matches_the_oracle_selection():
    shape = SHAPES[1]
    q, k, _, valid = make_inputs(shape, 7, "left")
    imp = block_importance(q, k, 32**-0.5, 32, valid)
    ref = block_importance_reference(q, k, 32**-0.5, 32, valid)
    assert torch.equal(topk_table_reference(imp, 0.3), topk_table_reference(ref, 0.3))


def test_sparse_path_really_skips_blocks():
    """The BlockMask lists exactly the selected blocks (far fewer than all), the output differs
    from dense, and running the same BlockMask eagerly still applies the table (no dense)."""
    shape = (1, 4, 1, 1000, 1000, 16, 128, torch.float32)
    q, k, v, _ = make_inputs(shape, 0)
    cfg = SparseDConfig(skip=0.0, select=0.2, block_size=128, min_sparse_len=0)
    switch_out, sparse_out, state = run_schedule(q, k, v, None, cfg)
    sel = state.layers[0]
    mask = sel.block_mask
    listed = mask.kv_num_blocks.sum() + (0 if mask.full_kv_num_blocks is None else mask.full_kv_num_blocks.sum())
    n_blocks = 4 * 8 * 8  # heads x query blocks x key blocks
    assert int(listed) == int(sel.table.sum()) == 4 * 8 * 2  # ceil(0.2 * 8) = 2 key blocks per query block
    assert int(listed) < n_blocks / 3
    dense = attention_reference(q, k, v, 16**-0.5, None)
    assert (sparse_out.double() - dense).abs().max() > 1e-2, "sparse output equals dense: blocks not skipped"
    assert (switch_out.double() - dense).abs().max() < 1e-4
    assert mask.seq_lengths == (1024, 1024), "the mask is for the bucket lengths (flex_shapes)"
    eager = flex_attention(*pad_to_mask(q, k, v, mask), block_mask=mask, scale=16**-0.5, enable_gqa=True)
    torch.testing.assert_close(eager[:, :, :1000], sparse_out, atol=1e-5, rtol=1e-5)


def test_padding_garbage_does_not_leak_and_k_v_are_not_copied():
    """Padded keys/values hold garbage (any finite values): real rows do not see it. The
    backend reads K and V in place (the models keep padded positions finite, see
    test_models.py::test_nan_in_padded_embeddings_does_not_leak)."""
    shape = SHAPES[1]
    q, k, v, valid = make_inputs(shape, 3, "left")
    k2, v2 = k.clone(), v.clone()
    pad = ~valid[:, None, :].expand_as(k2[..., 0])
    k2[pad], v2[pad] = 3e4, -3e4
    cfg = SparseDConfig(skip=0.0, select=0.3, block_size=32, min_sparse_len=0)
    a = run_schedule(q, k, v, valid, cfg)
    b = run_schedule(q, k2, v2, valid, cfg)
    where = real_rows(valid, 100, 100, shape)
    for clean, poisoned in zip(a[:2], b[:2], strict=True):
        assert torch.isfinite(poisoned[where]).all()
        assert torch.equal(clean[where], poisoned[where])
    assert torch.equal(a[2].layers[0].table, b[2].layers[0].table)
    assert (k2[pad] == 3e4).all() and (v2[pad] == -3e4).all(), "the backend wrote into K/V"


def test_padding_in_whole_blocks_keeps_a_row_equal_to_running_alone():
    """Left padding by a multiple of block_size keeps the block grid: the padded row selects the
    same blocks (shifted by the padding) and computes the same output as the prompt alone."""
    g = torch.Generator().manual_seed(21)
    n, bs, pad = 68, 32, 32
    q, k, v = (torch.randn(1, 4 if i == 0 else 2, n, 32, generator=g) * (1.5 if i == 1 else 1) for i in range(3))
    cfg = SparseDConfig(skip=0.0, select=0.3, block_size=bs, min_sparse_len=0)
    _, alone, alone_state = run_schedule(q, k, v, None, cfg, gen_start=n - 20)
    other = [torch.randn(1, t.shape[1], n + pad, 32, generator=g) for t in (q, k, v)]
    batch = [torch.cat([F.pad(t, (0, 0, pad, 0)), o]) for t, o in zip((q, k, v), other, strict=True)]
    valid = torch.ones(2, n + pad, dtype=torch.bool)
    valid[0, :pad] = False
    _, padded, state = run_schedule(*batch, valid, cfg, gen_start=n + pad - 20)
    torch.testing.assert_close(padded[:1, :, pad:], alone, atol=1e-6, rtol=1e-5)
    shift = pad // bs
    assert torch.equal(state.layers[0].table[:1, :, shift:, shift:], alone_state.layers[0].table)


def test_deterministic_and_independent_of_batch_mates():
    shape = SHAPES[1]
    q, k, v, valid = make_inputs(shape, 11, "right")
    cfg = SparseDConfig(skip=0.0, select=0.3, block_size=32, min_sparse_len=0)
    first, second = run_schedule(q, k, v, valid, cfg), run_schedule(q, k, v, valid, cfg)
    assert torch.equal(first[1], second[1])
    assert torch.equal(first[2].layers[0].table, second[2].layers[0].table)
    q2, k2, v2, valid2 = make_inputs(shape, 12, "right")
    mixed = [torch.cat([a[:1], b[1:]]) for a, b in zip((q, k, v, valid), (q2, k2, v2, valid2), strict=True)]
    other = run_schedule(*mixed, cfg)
    assert torch.equal(other[1][:1], first[1][:1])


def test_no_state_is_plain_dense_attention():
    shape = SHAPES[2]
    q, k, v, _ = make_inputs(shape, 5)
    out, _ = sparsed_attention_forward(module(), q, k, v, None, scaling=0.25)
    assert out.shape == (1, 129, 7, 16) and out.is_contiguous()
    torch.testing.assert_close(out.transpose(1, 2).double(), attention_reference(q, k, v, 0.25), atol=1e-5, rtol=1e-5)


def test_short_sequences_stay_dense_and_say_so():
    shape = SHAPES[0]
    q, k, v, _ = make_inputs(shape, 5)
    cfg = SparseDConfig(skip=0.0, select=0.1, block_size=16, min_sparse_len=65)
    with pytest.warns(RuntimeWarning, match=r"kv length 64 < min_sparse_len 65; SparseD stays dense"):
        _, sparse_out, state = run_schedule(q, k, v, None, cfg)
    assert state.dense_reason == "kv length 64 < min_sparse_len 65"
    assert not state.layers
    torch.testing.assert_close(sparse_out.double(), attention_reference(q, k, v, 0.25), atol=1e-5, rtol=1e-5)


def _graphs() -> int:
    return compile_counters().get("stats", {}).get("unique_graphs", 0)


def test_no_recompilation_across_steps_and_new_length_compiles():
    cfg = SparseDConfig(skip=0.0, select=0.5, block_size=16, min_sparse_len=0)

    def steps(n, count, seed):
        q, k, v = (torch.randn(1, 2, n, 16, generator=torch.Generator().manual_seed(seed)) for _ in range(3))
        state = SparseDState(cfg, steps=count + 1)
        for _ in range(count + 1):  # the switch step, then `count` sparse steps
            sparsed_attention_forward(module(), q, k, v, None, sparsed_state=state)
            state.advance()

    steps(64, 1, 0)  # warm-up: compiles the 64-token shape (if no earlier test did)
    before = _graphs()
    steps(64, 3, 1)
    assert _graphs() == before, "compiled attention recompiled between steps of one shape"
    steps(80, 1, 2)  # a length this process has not compiled yet
    assert _graphs() == before + 1, "a new length must compile exactly one new graph"
    steps(80, 3, 3)
    assert _graphs() == before + 1, "the new length recompiled on later steps"


def test_reselect_every_step_tracks_new_inputs():
    shape = SHAPES[0]
    q, k, v, _ = make_inputs(shape, 2)
    cfg = SparseDConfig(skip=0.0, select=0.25, block_size=16, min_sparse_len=0, reselect=True)
    state = SparseDState(cfg, steps=3)
    sparsed_attention_forward(module(), q, k, v, None, sparsed_state=state)
    first = state.layers[0].table.clone()
    state.advance()
    sparsed_attention_forward(module(), q, k.flip(2), v, None, sparsed_state=state)
    assert not torch.equal(first, state.layers[0].table)


# --- bad input -------------------------------------------------------------------------------


def good():
    return torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda q, k, v: (q.double(), k, v), TypeError, r"query, key and value must share a dtype"),
        (lambda q, k, v: (q[0], k, v), ValueError, r"query must be 4D \(batch, heads, seq, head_dim\)"),
        (lambda q, k, v: (q, k.repeat(1, 1, 1, 1)[:, :, :, :8], v), ValueError, r"head_dim differ: 16 vs 8"),
        (lambda q, k, v: (q[:, :, :0], k, v), ValueError, r"batch and lengths must be > 0"),
        (lambda q, k, v: (q[:0], k[:0], v[:0]), ValueError, r"batch and lengths must be > 0"),
        (
            lambda q, k, v: (torch.randn(1, 3, 8, 16), k, v),
            ValueError,
            r"query heads must be a multiple of key/value heads \(GQA\), got Hq=3, Hkv=2",
        ),
        (lambda q, k, v: (q, k, v[:, :, :4]), ValueError, r"key and value shapes differ"),
        (lambda q, k, v: (q, k, "v"), TypeError, r"value must be a torch.Tensor, got str"),
    ],
)
def test_bad_tensors_raise(mutate, error, match):
    q, k, v = mutate(*good())
    with pytest.raises(error, match=match):
        sparsed_attention_forward(module(), q, k, v, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch_raises():
    q, k, v = good()
    with pytest.raises(ValueError, match=r"must be on one device"):
        sparsed_attention_forward(module(), q.cuda(), k, v, None)


def test_causal_module_is_refused():
    with pytest.raises(NotImplementedError, match=r"bidirectional only .* is_causal=True"):
        sparsed_attention_forward(module(is_causal=True), *good(), None)


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (
            torch.ones(1, 7, dtype=torch.bool),
            ValueError,
            r"built for another shape: expected .* \(1, 8\), got \(1, 7\)",
        ),
        (torch.zeros(1, 1, 1, 8), TypeError, r"must be a bool padding mask .* got torch.float32 tensor"),
        (
            torch.ones(1, 1, 8, 8, dtype=torch.bool),
            NotImplementedError,
            r"general 4D masks are not supported",
        ),
    ],
)
def test_bad_masks_raise(mask, error, match):
    with pytest.raises(error, match=match):
        sparsed_attention_forward(module(), *good(), mask)


def test_sparse_step_without_a_switch_raises():
    state = SparseDState(SparseDConfig(skip=0.0, min_sparse_len=0), steps=3)
    state.advance()
    with pytest.raises(ValueError, match=r"sparse step 1 for layer 0 but the state holds no selection"):
        sparsed_attention_forward(module(), *good(), None, sparsed_state=state)


def test_mask_for_another_length_raises():
    q, k, v = good()
    state = SparseDState(SparseDConfig(skip=0.0, min_sparse_len=0, block_size=16), steps=3)
    sparsed_attention_forward(module(), q, k, v, None, sparsed_state=state)
    state.advance()
    q2, k2, v2 = (torch.randn(1, 2, 9, 16) for _ in range(3))
    with pytest.raises(ValueError, match=r"mask was built for .* \(1, 2, 8, 8\), got \(1, 2, 9, 9\)"):
        sparsed_attention_forward(module(), q2, k2, v2, None, sparsed_state=state)


def test_missing_layer_idx_and_bad_state_raise():
    state = SparseDState(SparseDConfig(skip=0.0, min_sparse_len=0), steps=3)
    with pytest.raises(ValueError, match=r"needs module.layer_idx"):
        sparsed_attention_forward(SimpleNamespace(is_causal=False), *good(), None, sparsed_state=state)
    with pytest.raises(TypeError, match=r"sparsed_state must be a SparseDState or None, got dict"):
        sparsed_attention_forward(module(), *good(), None, sparsed_state={})


def test_disabled_compile_warns_and_still_computes_the_sparse_result(monkeypatch):
    """TORCH_COMPILE_DISABLE=1: one warning, then eager FlexAttention over the same blocks."""
    from sparsed_backend import _warn

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=g) for _ in range(3))
    cfg = SparseDConfig(skip=0.0, select=0.34, block_size=32, min_sparse_len=0)
    _, compiled, state = run_schedule(q, k, v, None, cfg)
    monkeypatch.setattr(_warn, "_warned", set())
    with torch._dynamo.config.patch(disable=True), pytest.warns(RuntimeWarning, match="torch.compile is disabled"):
        _, eager, eager_state = run_schedule(q, k, v, None, cfg)
    assert torch.equal(eager_state.layers[0].table, state.layers[0].table)
    torch.testing.assert_close(eager, compiled, rtol=1e-5, atol=1e-5)
    dense = attention_reference(q, k, v, 16**-0.5).float()
    assert not torch.allclose(eager, dense, atol=1e-3), "the eager run must still be sparse"


def test_recompile_limit_raises_instead_of_running_eagerly(monkeypatch):
    from sparsed_backend.attention import backend as attention

    monkeypatch.setattr(attention.compile_guard, "limit", 1)
    cfg = SparseDConfig(skip=0.0, select=0.5, block_size=16, min_sparse_len=0)
    pattern = (
        r"hit the recompile limit \(1 graphs\); refusing to fall back to eager.* signatures"
        r".*B=1 H=1/1 L=(80|112|144) S=(80|112|144) D=24 torch.float32 cpu"
    )
    with pytest.raises(RuntimeError, match=pattern):
        for n in (80, 112, 144):  # new static shapes: the second one already exceeds a limit of 1
            q, k, v = (torch.randn(1, 1, n, 24) for _ in range(3))
            run_schedule(q, k, v, None, cfg)


def test_cudnn_log_sum_exp_unavailable_warns_and_scores_without_it(monkeypatch):
    """Where cuDNN refuses the switch step's inputs, one warning, then the dense output and a
    selection scored without the log-sum-exp (the same blocks)."""
    from sparsed_backend import _compat, _warn
    from sparsed_backend.attention import switch_step

    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=g) for _ in range(3))
    cfg = SparseDConfig(skip=0.0, select=0.34, block_size=32, min_sparse_len=0)
    plain_out, plain = switch_step.run_switch_step(q, k, v, 0.25, cfg)

    def refuse(*args, **kwargs):
        raise RuntimeError("cuDNN Frontend error: no valid execution plans\nmore detail")

    monkeypatch.setattr(switch_step, "cudnn_lse_applies", lambda query, key_valid: True)
    monkeypatch.setattr(_compat, "cudnn_attention_with_lse", refuse)
    monkeypatch.setattr(_warn, "_warned", set())
    with pytest.warns(RuntimeWarning, match=r"cuDNN attention with log-sum-exp is unavailable \(cuDNN Frontend"):
        out, sel = switch_step.run_switch_step(q, k, v, 0.25, cfg)
    torch.testing.assert_close(out, plain_out)
    assert torch.equal(sel.table, plain.table)


def test_flash_log_sum_exp_is_cut_to_the_rows_and_its_refusal_warns(monkeypatch):
    """dense_with_lse(kernel="flash") takes FlashAttention's output and log-sum-exp (cut to the
    query rows, whatever padding it carries); where FlashAttention refuses, one warning, then
    cuDNN's."""
    from sparsed_backend import _compat, _warn
    from sparsed_backend.attention import switch_step

    g = torch.Generator().manual_seed(10)
    q = torch.randn(1, 8, 5, 16, generator=g)
    k, v = torch.randn(1, 2, 64, 16, generator=g), torch.randn(1, 2, 64, 16, generator=g)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=True)
    lse = torch.logsumexp(q @ k.repeat_interleave(4, 1).transpose(-1, -2) * 0.25, -1)
    padded = torch.cat([lse, torch.full((1, 8, 3), 99.0)], -1)  # rows past L: whatever the kernel left
    monkeypatch.setattr(switch_step, "cudnn_lse_applies", lambda query, key_valid: True)
    monkeypatch.setattr(_compat, "flash_attention_with_lse", lambda *a: (out, padded))
    monkeypatch.setattr(_compat, "cudnn_attention_with_lse", lambda *a: (out, lse))
    got_out, got_lse = switch_step.dense_with_lse(q, k, v, 0.25, kernel="flash")
    assert got_out is out and torch.equal(got_lse, lse)

    def refuse(*args):
        raise RuntimeError("No available kernel\nmore detail")

    monkeypatch.setattr(_compat, "flash_attention_with_lse", refuse)
    monkeypatch.setattr(_warn, "_warned", set())
    with pytest.warns(RuntimeWarning, match=r"FlashAttention with log-sum-exp is unavailable \(No available kernel\)"):
        got_out, got_lse = switch_step.dense_with_lse(q, k, v, 0.25, kernel="flash")
    assert got_out is out and torch.equal(got_lse, lse)
    with pytest.raises(ValueError, match="kernel must be one of"):
        switch_step.dense_with_lse(q, k, v, 0.25, kernel="fast")


def test_switch_step_hands_grouped_kv_heads_to_cudnn_unrepeated(monkeypatch):
    """GQA: cuDNN's attention with log-sum-exp gets K/V with their own head count (no repeat,
    7x less K/V memory for Dream's 28 / 4 heads); H200: bit-equal to the repeated call."""
    from sparsed_backend import _compat
    from sparsed_backend.attention import switch_step

    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 8, 64, 16, generator=g)
    k, v = torch.randn(1, 2, 64, 16, generator=g), torch.randn(1, 2, 64, 16, generator=g)
    seen = []

    def cudnn(query, key, value, scaling):
        seen.append((key.shape[1], value.shape[1], key.data_ptr(), value.data_ptr()))
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)
        lse = torch.logsumexp(query @ key.repeat_interleave(4, 1).transpose(-1, -2) * scaling, -1)
        return out, lse

    monkeypatch.setattr(switch_step, "cudnn_lse_applies", lambda query, key_valid: True)
    monkeypatch.setattr(_compat, "cudnn_attention_with_lse", cudnn)
    out, lse = switch_step.dense_with_lse(q, k, v, 0.25)
    assert seen == [(2, 2, k.data_ptr(), v.data_ptr())]
    assert lse.shape == (1, 8, 64)


def test_private_and_version_dependent_apis_are_all_present():
    """torch and transformers APIs listed in _compat (RoPE init functions included) all exist."""
    from sparsed_backend import _compat

    assert _compat.missing() == []


_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _SM90, reason="the tuned kernel options are for sm90 (H100/H200)")
@pytest.mark.parametrize(("hq", "hkv", "pad"), [(32, 32, False), (28, 4, False), (8, 8, True)])
def test_sm90_kernel_options_compute_the_selected_blocks(hq, hkv, pad):
    """head_dim 128, bf16, block 128 on sm90 runs FlexAttention with the measured options
    (BLOCK 128x128, TMA, rows guaranteed safe): the result is attention over the same blocks."""
    from sparsed_backend.attention import policy

    n, d = 1000, 128
    g = torch.Generator(device="cuda").manual_seed(4)
    q = torch.randn(1, hq, n, d, device="cuda", generator=g).bfloat16()
    k = (torch.randn(1, hkv, n, d, device="cuda", generator=g) * 1.5).bfloat16()
    v = torch.randn(1, hkv, n, d, device="cuda", generator=g).bfloat16()
    valid = None
    if pad:
        valid = torch.ones(1, n, dtype=torch.bool, device="cuda")
        valid[:, :200] = False
    cfg = SparseDConfig(skip=0.0, select=0.3, block_size=128, min_sparse_len=0)
    _, out, state = run_schedule(q, k, v, valid, cfg)
    sel = state.layers[0]
    options = policy.flex_kernel_options(q, sel.block_mask)
    assert options is not None and options["BLOCK_M"] == options["BLOCK_N"] == 128 and options["USE_TMA"]
    tokens = expand_table(sel.table, 128, n, n)
    golden = attention_reference(q, k, v, d**-0.5, valid, tokens)
    lowprec = attention_reference(q, k, v, d**-0.5, valid, tokens, dtype=q.dtype)
    assert_close_3way(out, golden, lowprec, real_rows(valid, n, n, (1, hq, hkv, n, n, d, 128, q.dtype)))


def test_prompt_end_offset_equals_the_paper_rule_on_front_padded_inputs():
    """A moved block grid (prompt_end_offset) is the paper rule run on inputs with zero rows
    before position 0, masked as padding: the same table, the same sparse output on the real rows,
    and the prompt ends ``offset`` tokens into a block."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 100, 16, generator=g) for _ in range(3))
    cfg = SparseDConfig(skip=0.0, select=0.4, block_size=16, min_sparse_len=0, prompt_end_offset=5)
    front = cfg.grid_front(70)
    assert front == 15 and (70 + front) % 16 == 5  # 70 = 4 blocks + 6: 15 rows end it at 5 into block 5
    _, moved, state = run_schedule(q, k, v, None, cfg, gen_start=70)
    assert state.layers[0].front == front and state.layers[0].q_len == 100
    padded = [torch.cat([torch.zeros(1, 2, front, 16), t], 2) for t in (q, k, v)]
    valid = torch.cat([torch.zeros(1, front, dtype=torch.bool), torch.ones(1, 100, dtype=torch.bool)], 1)
    paper = SparseDConfig(skip=0.0, select=0.4, block_size=16, min_sparse_len=0, prompt_end_offset=None)
    _, explicit, reference = run_schedule(*padded, valid, paper, gen_start=70 + front)
    assert torch.equal(state.layers[0].table, reference.layers[0].table)
    torch.testing.assert_close(moved, explicit[:, :, front:], atol=1e-5, rtol=1e-5)
    unmoved = run_schedule(q, k, v, None, paper, gen_start=70)[1]
    assert (moved - unmoved).abs().max() > 1e-3, "the moved grid selected the same blocks as the unmoved one"


def test_prompt_end_offset_at_select_one_equals_dense():
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 4, 90, 16, generator=g) for _ in range(3))
    cfg = SparseDConfig(skip=0.0, select=1.0, block_size=16, min_sparse_len=0, prompt_end_offset=3)
    _, sparse_out, _ = run_schedule(q, k, v, None, cfg, gen_start=61)
    torch.testing.assert_close(sparse_out.double(), attention_reference(q, k, v, 0.25), atol=1e-5, rtol=1e-5)
