"""The shape policy of compiled FlexAttention (flex_shapes.py): bucket lengths, exact results on
padded inputs, and a compile count that stays bounded over many prompt lengths and cached windows."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsed_backend  # noqa: F401  (registers the "sparsed" attention)
from sparsed_backend import SparseDConfig
from sparsed_backend._compat import compile_counters
from sparsed_backend.attention.backend import sparse_attention
from sparsed_backend.attention.flex_shapes import CompileGuard, bucket_length, pad_to_mask
from sparsed_backend.attention.masks import block_mask_from_table
from sparsed_backend.attention.reference import attention_reference, expand_table
from sparsed_backend.sampling.generation import llada_generate
from tiny_models import MASK_ID, tiny_model


def graphs() -> int:
    return compile_counters().get("stats", {}).get("unique_graphs", 0)


@given(n=st.integers(1, 1 << 20), block=st.sampled_from([16, 32, 64, 128, 256]))
def test_bucket_length_is_whole_blocks_at_most_an_eighth_longer(n, block):
    b = bucket_length(n, block)
    blocks = -(-n // block)
    assert b % block == 0 and b >= n
    assert b // block - blocks <= max(blocks - 1, 0) // 8, "padding beyond 1/8 of the length"
    assert bucket_length(b, block) == b, "a bucket length is its own bucket"


def test_bucket_grid_has_eight_points_per_octave():
    for e in range(4, 14):  # block counts [2^e, 2^(e+1))
        points = {bucket_length(n * 16, 16) // 16 for n in range(2**e, 2 ** (e + 1))}
        assert len(points - {2 ** (e + 1)}) == 8, (e, sorted(points))
    assert [bucket_length(n * 16, 16) // 16 for n in range(1, 16)] == list(range(1, 16))


def test_bucket_length_refuses_nonpositive_input():
    with pytest.raises(ValueError, match=r"bucket_length needs n > 0 and block_size > 0, got n=0"):
        bucket_length(0, 16)


@pytest.mark.parametrize("length", [150, 300, 304])  # 10 blocks (its own bucket); 19 -> 20 blocks
def test_a_bucketed_mask_gives_the_unpadded_result(length):
    """Padded keys get no probability and padded query rows are dropped: the padded run equals
    the reference masked by the same blocks, and padding copies nothing when none is needed."""
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, 2, length, 16, generator=g) for _ in range(3))
    n = -(-length // 16)
    table = torch.rand(1, 2, n, n, generator=g) < 0.4
    table[..., 0] = True
    padded = (bucket_length(length, 16),) * 2
    mask = block_mask_from_table(table, length, length, 16, None, full_blocks=False, pad_to=padded)
    assert mask.seq_lengths == padded
    if length % 16 == 0:  # with full blocks (CUDA): the padding blocks are listed nowhere, one index tensor
        full = block_mask_from_table(table, length, length, 16, None, full_blocks=True, pad_to=padded)
        assert full.kv_indices is full.full_kv_indices and int(full.kv_num_blocks.sum()) == 0
    out = sparse_attention(q, k, v, mask, 0.25)
    expected = attention_reference(q, k, v, 0.25, token_mask=expand_table(table, 16, length, length))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    same = pad_to_mask(q, k, v, block_mask_from_table(table, length, length, 16, None, full_blocks=False))
    assert all(a is b for a, b in zip(same, (q, k, v), strict=True)), "no padding needed: no copy"


def test_pad_to_must_be_whole_blocks_and_long_enough():
    table = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"pad_to must be whole blocks of 16 at least \(q_len, kv_len\) = \(20, 20\)"):
        block_mask_from_table(table, 20, 20, 16, pad_to=(24, 32))
    with pytest.raises(ValueError, match=r"pad_to must be whole blocks"):
        block_mask_from_table(table, 20, 20, 16, pad_to=(16, 32))


def test_compile_guard_names_what_it_saw():
    guard = CompileGuard()
    q, k = torch.zeros(2, 4, 32, 8), torch.zeros(2, 2, 48, 8)
    table = torch.ones(2, 4, 2, 3, dtype=torch.bool)
    mask = block_mask_from_table(table, 32, 48, 16, full_blocks=False)
    guard.note(q, k, mask)
    guard.note(q, k, mask)
    assert len(guard.seen) == 1
    assert guard.describe() == (
        "1 distinct signatures, the last 1: B=2 H=4/2 L=32 S=48 D=8 torch.float32 cpu sparsed_table_bs16"
    )


def _generate(model, prompt_len: int, config: SparseDConfig, **kwargs):
    ids = torch.randint(3, MASK_ID, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    return llada_generate(model, ids, sparsed=config, return_dict_in_generate=True, **kwargs)


def test_seventy_prompt_lengths_compile_one_graph_per_bucket():
    """71 distinct prompt lengths in one process: no error, and at most one graph per bucket
    length (10 here), where static compiles would have built 71."""
    model = tiny_model("llada")
    model.set_attn_implementation("sparsed")
    config = SparseDConfig(skip=0.25, select=0.5, block_size=16, min_sparse_len=0)
    lengths = range(9, 9 + 71 * 2, 2)
    buckets = {bucket_length(p + 16, 16) for p in lengths}
    start = graphs()
    try:
        for p in lengths:
            out = _generate(model, p, config, steps=4, gen_length=16)
            assert out.sparsed_state.layers and not (out.sequences == MASK_ID).any()
    finally:
        model.set_attn_implementation("sdpa")
    assert len(buckets) == 10
    assert graphs() - start <= len(buckets)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_windows_over_eight_blocks_compile_a_bounded_set(mode):
    """A cached generation of 8 decoding blocks (2 steps each) runs a window per block (on the
    default grid, moved by 0 and 3 rows for these prompts); the windows run on bucket lengths,
    so two prompt lengths add at most one graph per distinct bucketed window (and per full
    length), not one per decoding block."""
    model = tiny_model("llada")
    model.set_attn_implementation("sparsed")
    config = SparseDConfig(skip=0.1, select=0.5, block_size=16, min_sparse_len=0)
    start = graphs()
    windows = set()
    try:
        for p in (40, 53):
            out = _generate(model, p, config, steps=16, gen_length=64, block_length=8, kv_cache=mode)
            assert not (out.sequences == MASK_ID).any()
            for sel in out.sparsed_state.layers.values():
                windows.add(sel.block_mask.seq_lengths)
                windows.add(sel._window[2].seq_lengths)
    finally:
        model.set_attn_implementation("sdpa")
    shapes = set()
    for p in (40, 53):  # every window on the selection's grid: moved by `front`, from its block's edge
        front = config.grid_front(p)
        kv = bucket_length(front + p + 64, 16)
        shapes.add((kv, kv))
        for b in range(8):
            s0 = p + b * 8
            stop = p + 64 if mode == "prefix" else s0 + 8
            shapes.add((bucket_length((s0 + front) % 16 + stop - s0, 16), kv))
    assert windows <= shapes
    assert graphs() - start <= len(shapes) < 2 * 9
