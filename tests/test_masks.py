"""BlockMasks built from block tables: the block lists equal the table, padding and tails."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsed_backend.attention.masks import block_mask_from_table, block_table, table_mask_mod
from sparsed_backend.attention.reference import expand_table


@st.composite
def tables(draw):
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    block = draw(st.sampled_from([16, 32, 64, 128, 256]))
    q_len = draw(st.sampled_from([1, 7, 63, 64, 65, 127, 129, 1000]))
    kv_len = draw(st.sampled_from([q_len, 1, 65, 129, 1000]))
    n_q, n_kv = -(-q_len // block), -(-kv_len // block)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(b, h, n_q, n_kv, generator=g) < draw(st.sampled_from([0.1, 0.5, 1.0]))
    valid = None
    if draw(st.booleans()):
        valid = torch.ones(b, kv_len, dtype=torch.bool)
        for i in range(b):
            valid[i, : draw(st.integers(0, kv_len - 1))] = False
    return table, q_len, kv_len, block, valid


@given(tables(), st.booleans())
def test_block_lists_equal_the_table(case, full_blocks):
    table, q_len, kv_len, block, valid = case
    bm = block_mask_from_table(table, q_len, kv_len, block, valid, full_blocks=full_blocks)
    b, _, _, n_kv = table.shape
    if valid is None:
        attendable = torch.ones(b, n_kv, dtype=torch.bool)
    else:
        padded = torch.nn.functional.pad(valid, (0, n_kv * block - kv_len), value=False)
        attendable = padded.view(b, n_kv, block).any(-1)
    assert torch.equal(bm.to_dense().bool(), table & attendable[:, None, None, :])
    assert bm.seq_lengths == (q_len, kv_len)
    if full_blocks and bm.full_kv_num_blocks is not None:
        # Full blocks never contain padding or the ragged tail.
        full = torch.zeros_like(table)
        for idx in torch.nonzero(torch.ones_like(table[..., 0])):
            bb, hh, ii = idx.tolist()
            n = int(bm.full_kv_num_blocks[bb, hh, ii])
            full[bb, hh, ii, bm.full_kv_indices[bb, hh, ii, :n].long()] = True
        counts = torch.full((b, n_kv), block)
        counts[:, -1] = kv_len - (n_kv - 1) * block
        if valid is not None:
            counts = padded.view(b, n_kv, block).sum(-1)
        assert not (full & (counts < block)[:, None, None, :]).any()


@given(tables(), st.sampled_from([None, 0, 1]))
def test_lists_trimmed_to_the_widest_row_keep_every_block(case, slack):
    """With max_row_blocks (the CUDA path) the index lists keep that many columns: the widest
    row's count (plus ``slack``), never fewer; the listed blocks are still exactly the table."""
    table, q_len, kv_len, block, valid = case
    widest = int(table.sum(-1).max())
    width = None if slack is None else widest + slack
    bm = block_mask_from_table(table, q_len, kv_len, block, valid, full_blocks=True, max_row_blocks=width)
    n_kv = table.shape[-1]
    full = block_mask_from_table(table, q_len, kv_len, block, valid, full_blocks=True)
    assert torch.equal(block_table(bm, n_kv), full.to_dense().bool())
    expected = n_kv if width is None else min(max(width, 1), n_kv)
    assert bm.kv_indices.shape[-1] == bm.full_kv_indices.shape[-1] == expected
    assert bm.kv_indices.is_contiguous() and bm.full_kv_indices.is_contiguous()


@given(tables())
def test_mask_mod_expands_to_the_token_mask(case):
    table, q_len, kv_len, block, valid = case
    real = torch.ones(table.shape[0], kv_len, dtype=torch.bool) if valid is None else valid
    padded = torch.nn.functional.pad(real, (0, table.shape[-1] * block - kv_len), value=False)
    mod = table_mask_mod(table, block, padded)
    b, h = table.shape[:2]
    bi = torch.arange(b).view(b, 1, 1, 1)
    hi = torch.arange(h).view(1, h, 1, 1)
    qi = torch.arange(q_len).view(1, 1, q_len, 1)
    ki = torch.arange(kv_len).view(1, 1, 1, kv_len)
    want = expand_table(table, block, q_len, kv_len)
    if valid is not None:
        want = want & valid[:, None, None, :]
    assert torch.equal(mod(bi, hi, qi, ki), want)
    assert mod.__name__ == f"sparsed_table_bs{block}"


def test_table_of_the_wrong_size_is_rejected():
    with pytest.raises(ValueError, match=r"does not fit q_len=100, kv_len=100 with block_size=16"):
        block_mask_from_table(torch.ones(1, 1, 6, 7, dtype=torch.bool), 100, 100, 16)


@given(
    tables(),
    st.integers(0, 127),
    st.integers(1, 200),
    st.sampled_from([None, 0, 1]),
    st.integers(0, 255),
)
def test_a_windows_kernel_block_lists_are_its_query_blocks_table_row(case, front, q_len, slack, start_seed):
    """`LayerSelection.window_blocks` (what the decode kernel reads for a cache window): for a
    window in one query block of the grid (``front`` rows before position 0), each head's
    list is that block's table row, ascending, padded with -1 to ``max_row_blocks`` (or every
    key block); a window across query blocks gets None (it stays on FlexAttention)."""
    from sparsed_backend.attention.state import LayerSelection

    table, _, kv_len, block, _ = case
    b, h, n_q, n_kv = table.shape
    front = front % block
    rows = n_q * block - front  # the real query rows the table covers
    start = start_seed % max(1, rows)
    q_len = max(1, min(q_len, rows - start))
    widest = int(table.sum(-1).max())
    width = None if slack is None else max(1, widest + slack)
    sel = LayerSelection(None, table, b, h, rows, kv_len, torch.tensor(0.0), front=front, max_row_blocks=width)
    got = sel.window_blocks(start, q_len, block)
    first, last = (start + front) // block, (start + q_len - 1 + front) // block
    if first != last:
        assert got is None
        return
    expected_width = n_kv if width is None else min(width, n_kv)
    assert got.shape == (b, h, expected_width)
    for bb in range(b):
        for hh in range(h):
            kept = torch.nonzero(table[bb, hh, first]).flatten()
            row = got[bb, hh]
            assert torch.equal(row[: kept.numel()], kept)
            assert (row[kept.numel() :] == -1).all()
    assert sel.window_blocks(start, q_len, block) is got  # kept for the block's later steps
