"""Block importance and top-k selection against the slow oracle (no FlexAttention here)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsed_backend import SparseDConfig
from sparsed_backend.reference import block_importance_reference, topk_table_reference
from sparsed_backend.selection import block_importance, select_blocks, select_local, select_topk

LENGTHS = [1, 7, 63, 64, 65, 127, 129]


@st.composite
def qk_inputs(draw):
    hkv = draw(st.sampled_from([1, 2, 4]))
    hq = hkv * draw(st.sampled_from([1, 2, 7]))
    b = draw(st.integers(1, 3))
    q_len = draw(st.sampled_from(LENGTHS))
    kv_len = draw(st.sampled_from([q_len, *LENGTHS]))
    d = draw(st.sampled_from([8, 16, 40]))
    block = draw(st.sampled_from([16, 32, 64]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, q_len, d, generator=g)
    k = torch.randn(b, hkv, kv_len, d, generator=g) * draw(st.sampled_from([0.5, 2.0]))
    valid = torch.ones(b, kv_len, dtype=torch.bool)
    for i in range(b):
        pad = draw(st.integers(0, kv_len - 1))
        if draw(st.booleans()):
            valid[i, :pad] = False  # left padding
        else:
            valid[i, kv_len - pad :] = False  # right padding
    return q, k, valid, block


@given(qk_inputs(), st.booleans())
def test_importance_matches_oracle(inputs, with_padding):
    q, k, valid, block = inputs
    valid = valid if with_padding else None
    scale = q.shape[-1] ** -0.5
    got = block_importance(q, k, scale, block, valid)
    want = block_importance_reference(q, k, scale, block, valid)
    assert got.shape == want.shape
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin].double(), want[fin], atol=1e-6, rtol=1e-5)


def test_importance_uses_bounded_chunks():
    # A tiny chunk budget forces one query block per chunk; the result must not change.
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 200, 16, generator=g), torch.randn(1, 2, 200, 16, generator=g)
    whole = block_importance(q, k, 0.25, 32)
    chunked = block_importance(q, k, 0.25, 32, chunk_bytes=1)
    torch.testing.assert_close(whole, chunked)


def test_importance_ignores_nan_in_padded_keys():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 2, 70, 16, generator=g), torch.randn(2, 1, 70, 16, generator=g)
    valid = torch.ones(2, 70, dtype=torch.bool)
    valid[0, :20] = False
    poisoned = k.clone()
    poisoned[0, :, :20] = float("nan")
    torch.testing.assert_close(block_importance(q, poisoned, 0.3, 16, valid), block_importance(q, k, 0.3, 16, valid))


@st.composite
def importance_tables(draw):
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n_q, n_kv = draw(st.integers(1, 9)), draw(st.integers(1, 12))
    # Few distinct values force ties: the tie-break rule is part of the contract.
    values = st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0, 2.0, float("-inf")])
    flat = draw(st.lists(values, min_size=b * h * n_q * n_kv, max_size=b * h * n_q * n_kv))
    imp = torch.tensor(flat, dtype=torch.float32).view(b, h, n_q, n_kv)
    select = draw(st.sampled_from([0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]))
    gen = draw(st.one_of(st.none(), st.integers(0, n_kv)))
    return imp, select, gen


@given(importance_tables(), st.booleans())
def test_topk_is_exact_with_lower_index_tie_break(case, share):
    imp, select, gen = case
    cfg = SparseDConfig(select=select, generation_share=share)
    got = select_topk(imp, cfg, gen)
    want = topk_table_reference(imp, select, gen, share)
    assert torch.equal(got, want)
    assert not (got & torch.isinf(imp)).any(), "selected a block with nothing to attend"


@given(importance_tables())
def test_select_one_keeps_every_attendable_block(case):
    imp, _, gen = case
    table = select_topk(imp, SparseDConfig(select=1.0), gen)
    assert torch.equal(table, torch.isfinite(imp))


def test_generation_region_keeps_its_own_share():
    # Prompt blocks dominate every row; without the share the generation region gets nothing.
    imp = torch.tensor([[[[9.0, 8.0, 7.0, 6.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]]])
    cfg = SparseDConfig(select=0.2)
    assert select_topk(imp, cfg, None)[0, 0, 0].nonzero().flatten().tolist() == [0, 1]
    shared = select_topk(imp, cfg, 4)[0, 0, 0].nonzero().flatten().tolist()
    assert shared == [0, 1, 8, 9]  # global top-2 (both prompt) + top-2 of the 6 generation blocks


def test_heads_select_independently():
    g = torch.Generator().manual_seed(3)
    imp = torch.rand(1, 2, 4, 10, generator=g)
    cfg = SparseDConfig(select=0.3)
    both = select_topk(imp, cfg)
    for h in range(2):
        assert torch.equal(both[:, h : h + 1], select_topk(imp[:, h : h + 1], cfg))
    imp2 = imp.clone()
    imp2[:, 1] = imp2[:, 1].flip(-1)
    changed = select_topk(imp2, cfg)
    assert torch.equal(changed[:, 0], both[:, 0]) and not torch.equal(changed[:, 1], both[:, 1])


@pytest.mark.parametrize(("n_q", "n_kv", "select"), [(8, 8, 0.3), (5, 13, 0.2), (1, 1, 0.5), (3, 7, 1.0)])
def test_local_window_has_the_same_density_as_topk(n_q, n_kv, select):
    imp = torch.rand(1, 1, n_q, n_kv)
    cfg = SparseDConfig(select=select, pattern="local")
    local = select_local(imp, cfg)
    assert torch.equal(local, select_blocks(imp, cfg))
    k = cfg.blocks_kept(n_kv)
    assert (local.sum(-1) == k).all()
    # Each row is one contiguous window.
    for row in local[0, 0]:
        idx = row.nonzero().flatten()
        assert idx.numel() == k and int(idx[-1] - idx[0]) == k - 1
    assert math.isclose(local.float().mean().item(), select_topk(imp, SparseDConfig(select=select)).float().mean())
