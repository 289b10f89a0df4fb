"""Block importance and top-k selection against the slow oracle (no FlexAttention here)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsed_backend import SparseDConfig
from sparsed_backend.attention.reference import block_importance_reference, topk_table_reference
from sparsed_backend.attention.scoring import block_prob_sums
from sparsed_backend.attention.selection import (
    forced_block,
    generation_start_block,
    keep_within_count,
    select_blocks,
    select_local,
    select_topk,
)
from sparsed_backend.attention.switch_step import block_importance, max_row_blocks, select_layer

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
    whole = block_prob_sums(q, k, 0.25, 32)
    chunked = block_prob_sums(q, k, 0.25, 32, chunk_bytes=1)
    torch.testing.assert_close(whole, chunked)


def test_block_sums_normalised_by_a_given_log_sum_exp():
    """Given each row's exact log-sum-exp, the PyTorch block sums equal its own normalisation
    (padded keys, GQA, chunked); a row with log-sum-exp +inf (a moved grid's front row) adds
    nothing, as in the fused kernel; a shifted log-sum-exp scales its row's sums by exp(-shift)."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 4, 100, 16, generator=g), torch.randn(2, 2, 100, 16, generator=g)
    valid = torch.ones(2, 100, dtype=torch.bool)
    valid[1, :30] = False
    scores = torch.einsum("bhld,bhsd->bhls", q, k.repeat_interleave(2, 1)) * 0.25
    lse = torch.logsumexp(scores.masked_fill(~valid[:, None, None, :], -torch.inf), -1)
    own = block_prob_sums(q, k, 0.25, 32, valid)
    torch.testing.assert_close(block_prob_sums(q, k, 0.25, 32, valid, chunk_bytes=1, lse=lse), own)
    front = lse.clone()
    front[:, :, :32] = torch.inf  # the first query block's rows
    got = block_prob_sums(q, k, 0.25, 32, valid, lse=front)
    assert torch.equal(got[:, :, 0], torch.zeros_like(got[:, :, 0]))
    torch.testing.assert_close(got[:, :, 1:], own[:, :, 1:])
    shifted = block_prob_sums(q, k, 0.25, 32, valid, lse=lse + 1.0)
    torch.testing.assert_close(shifted, own * torch.exp(torch.tensor(-1.0)))


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


def gen_table(imp: torch.Tensor, gen: int | None, seed: int = 0) -> torch.Tensor | None:
    """A generation-region importance (its own softmax) with the same -inf marks, ties included."""
    if gen is None:
        return None
    g = torch.Generator().manual_seed(seed)
    tail = imp[..., gen:]
    vals = torch.tensor([0.0, 0.1, 0.5, 1.0])[torch.randint(0, 4, tail.shape, generator=g)]
    return vals.masked_fill(torch.isinf(tail), float("-inf"))


@given(importance_tables(), st.booleans())
def test_topk_is_exact_with_lower_index_tie_break(case, share):
    imp, select, gen = case
    cfg = SparseDConfig(select=select, generation_share=share)
    gen_imp = gen_table(imp, gen)
    got = select_topk(imp, cfg, gen, gen_imp)
    want = topk_table_reference(imp, select, gen, share, gen_imp)
    assert torch.equal(got, want)
    assert not (got & torch.isinf(imp)).any(), "selected a block with nothing to attend"


@given(importance_tables())
def test_select_one_keeps_every_attendable_block(case):
    imp, _, gen = case
    table = select_topk(imp, SparseDConfig(select=1.0), gen, gen_table(imp, gen))
    assert torch.equal(table, torch.isfinite(imp))


def test_generation_region_keeps_its_own_share():
    # Prompt blocks dominate every row; without the share the generation region gets nothing.
    imp = torch.tensor([[[[9.0, 8.0, 7.0, 6.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]]])
    cfg = SparseDConfig(select=0.2)
    assert select_topk(imp, cfg, None)[0, 0, 0].nonzero().flatten().tolist() == [0, 1]
    shared = select_topk(imp, cfg, 4, imp[..., 4:])[0, 0, 0].nonzero().flatten().tolist()
    assert shared == [0, 1, 8, 9]  # global top-2 (both prompt) + top-2 of the 6 generation blocks
    # The generation blocks are ranked by their own importance (a softmax over their keys only).
    own = torch.tensor([[[[0.9, 0.8, 0.0, 0.0, 0.0, 0.0]]]])
    assert select_topk(imp, cfg, 4, own)[0, 0, 0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    with pytest.raises(ValueError, match=r"gen_importance must have shape \(1, 1, 1, 6\) .*, got None"):
        select_topk(imp, cfg, 4)


@pytest.mark.parametrize(("gen_start", "n_kv", "want"), [(None, 4, None), (256, 4, 2), (300, 5, 3), (300, 3, 2)])
def test_generation_region_starts_at_the_first_block_after_the_prompt(gen_start, n_kv, want):
    # The reference: the first block starting at or after the prompt's end, else the last block.
    assert generation_start_block(gen_start, 128, n_kv) == want


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


@given(importance_tables())
def test_keep_diagonal_keeps_own_block_within_the_same_count(case):
    imp, select, gen = case
    plain = select_topk(imp, SparseDConfig(select=select), gen, gen_table(imp, gen))
    diag = select_topk(imp, SparseDConfig(select=select, keep_diagonal=True), gen, gen_table(imp, gen))
    n_q, n_kv = imp.shape[-2:]
    i = torch.arange(min(n_q, n_kv))
    own = torch.isfinite(imp[..., i, i])
    assert diag[..., i, i][own].all(), "an attendable own block was dropped"
    if gen is None or gen in (0, n_kv):
        # One top-k over all blocks: the diagonal takes one of the same k slots.
        assert torch.equal(diag.sum(-1), plain.sum(-1))
    assert not (diag & torch.isinf(imp)).any()


def test_random_pattern_has_topk_counts_and_is_reproducible():
    imp = torch.rand(2, 3, 6, 20)
    imp[0, :, :, -3:] = float("-inf")  # padded key blocks are never drawn
    cfg = SparseDConfig(select=0.3, pattern="random")
    torch.manual_seed(0)
    a = select_blocks(imp, cfg)
    torch.manual_seed(0)
    assert torch.equal(a, select_blocks(imp, cfg))
    topk = select_topk(imp, SparseDConfig(select=0.3))
    assert torch.equal(a.sum(-1), topk.sum(-1)) and not torch.equal(a, topk)
    assert not (a & torch.isinf(imp)).any()


@st.composite
def rule_cases(draw):
    imp, select, gen = draw(importance_tables())
    n_kv = imp.shape[-1]
    block = 16
    # A prompt length whose last token sits anywhere in the key blocks, residues 0 and 15 included.
    gen_start = draw(st.integers(1, n_kv * block))
    return imp, select, gen, gen_start, block


@given(rule_cases(), st.booleans())
def test_paper_rule_is_the_reference_selection(case, share):
    # rule="paper" named explicitly is the reference's rule exactly, whatever gen_start says.
    imp, select, gen, gen_start, block = case
    cfg = SparseDConfig(select=select, generation_share=share, block_size=block, rule="paper")
    gen_imp = gen_table(imp, gen)
    got = select_topk(imp, cfg, gen, gen_imp, gen_start)
    assert torch.equal(got, topk_table_reference(imp, select, gen, share, gen_imp))
    assert torch.equal(got, select_topk(imp, SparseDConfig(select=select, generation_share=share), gen, gen_imp))


@given(rule_cases(), st.sampled_from(["prompt_end", "prompt_end_gen", "sink"]), st.booleans())
def test_rule_keeps_its_block_within_the_paper_count(case, rule, share):
    imp, select, gen, gen_start, block = case
    gen_imp = gen_table(imp, gen)
    paper = select_topk(imp, SparseDConfig(select=select, generation_share=share, block_size=block), gen, gen_imp)
    cfg = SparseDConfig(select=select, generation_share=share, block_size=block, rule=rule)
    got = select_topk(imp, cfg, gen, gen_imp, gen_start)
    column = 0 if rule == "sink" else min((gen_start - 1) // block, imp.shape[-1] - 1)
    want = topk_table_reference(imp, select, gen, share, gen_imp, column, rule == "prompt_end_gen")
    assert torch.equal(got, want)
    valid = torch.isfinite(imp)
    assert got[..., column][valid[..., column]].all(), "a row dropped the block its rule keeps"
    assert torch.equal(got.sum(-1), paper.sum(-1)), "the rule changed a row's kept count"
    assert not (got & ~valid).any()
    # At most one block swapped per row, and only in rows that did not keep the column.
    swapped = (got & ~paper).sum(-1)
    assert (swapped <= 1).all() and not (swapped.bool() & paper[..., column]).any()


def test_prompt_end_takes_the_place_of_the_lowest_kept_prompt_block():
    # One row, 10 key blocks, select 0.3 -> k = 3; the generation region is block 9.
    imp = torch.tensor([[[[0.9, 0.8, 0.7, 0.6, 0.1, 0.2, 0.3, 0.05, 0.4, 0.5]]]])
    gen_imp = torch.tensor([[[[1.0]]]])
    paper = select_topk(imp, SparseDConfig(select=0.3, block_size=128), 9, gen_imp)
    assert paper[0, 0, 0].nonzero().flatten().tolist() == [0, 1, 2, 9]
    # The prompt ends on the edge of block 7 (gen_start = 8 * 128): block 7 replaces block 2.
    cfg = SparseDConfig(select=0.3, rule="prompt_end", block_size=128)
    got = select_topk(imp, cfg, 9, gen_imp, gen_start=8 * 128)
    assert got[0, 0, 0].nonzero().flatten().tolist() == [0, 1, 7, 9]
    assert select_topk(imp, SparseDConfig(select=0.3, rule="sink", block_size=128), 9, gen_imp, 1000).sum() == 4
    # prompt_end_gen: a query block before the generation region gives up the generation block.
    cfg = SparseDConfig(select=0.3, rule="prompt_end_gen", block_size=128)
    got = select_topk(imp, cfg, 9, gen_imp, gen_start=8 * 128)
    assert got[0, 0, 0].nonzero().flatten().tolist() == [0, 1, 2, 7]


@pytest.mark.parametrize(
    ("rule", "gen_start", "n_kv", "want"),
    [("paper", 1024, 9, None), ("sink", None, 9, 0), ("prompt_end", 1024, 9, 7), ("prompt_end", 1025, 9, 8),
     ("prompt_end", 1020, 9, 7), ("prompt_end", 1, 9, 0), ("prompt_end", 5000, 9, 8)],
)  # fmt: skip
def test_forced_block_is_the_block_of_the_prompts_last_token(rule, gen_start, n_kv, want):
    assert forced_block(rule, gen_start, 128, n_kv) == want


@pytest.mark.parametrize("gen_start", [None, 0])
def test_prompt_end_needs_the_prompt_length(gen_start):
    imp = torch.rand(1, 1, 2, 4)
    for rule in ("prompt_end", "prompt_end_gen"):
        with pytest.raises(ValueError, match=rf"rule='{rule}' .* needs gen_start >= 1 .*, got {gen_start}"):
            select_topk(imp, SparseDConfig(select=0.3, rule=rule), None, None, gen_start)
    with pytest.raises(ValueError, match=r"column must be in \[0, 4\), got 4"):
        keep_within_count(select_topk(imp, SparseDConfig()), imp, 4)


def test_select_layer_prompt_end_has_the_paper_density():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 4, 261, 16, generator=g), torch.randn(2, 2, 261, 16, generator=g)
    grid = {"select": 0.3, "block_size": 32, "prompt_end_offset": None}  # the reference's grid: block 7 ends it
    paper = select_layer(q, k, 0.25, SparseDConfig(**grid), gen_start=256)
    end = select_layer(q, k, 0.25, SparseDConfig(**grid, rule="prompt_end"), gen_start=256)
    assert end.table[..., 7].all() and not paper.table[..., 7].all()
    assert torch.equal(end.table.sum(-1), paper.table.sum(-1)) and torch.equal(end.density, paper.density)
    with pytest.raises(ValueError, match=r"needs gen_start >= 1 .*, got None"):
        select_layer(q, k, 0.25, SparseDConfig(block_size=32, rule="prompt_end"))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"select": 0.5}, {"keep_diagonal": True}, {"rule": "prompt_end"}, {"rule": "sink", "select": 0.2},
     {"pattern": "local"}, {"pattern": "random"}, {"generation_share": False}, {"prompt_end_offset": None}],
)  # fmt: skip
@pytest.mark.parametrize("gen_start", [None, 100, 250, 300])
def test_no_row_keeps_more_blocks_than_the_host_bound(overrides, gen_start):
    """`max_row_blocks` is the width of the CUDA index lists: a row keeping more would be read
    short, so the bound must hold for every pattern, rule and generation split."""
    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(2, 4, 300, 16, generator=g), torch.randn(2, 2, 300, 16, generator=g)
    valid = torch.ones(2, 300, dtype=torch.bool)
    valid[1, :40] = False
    cfg = SparseDConfig(**{"select": 0.3, "block_size": 32, **overrides})
    rule_needs_prompt = cfg.rule != "paper" and gen_start is None
    if rule_needs_prompt:
        return  # such a rule refuses to run without a prompt end (tested above)
    sel = select_layer(q, k, 0.25, cfg, gen_start=gen_start, key_valid=valid)
    n_kv = sel.table.shape[-1]
    gen_block = generation_start_block(None if gen_start is None else gen_start + sel.front, 32, n_kv)
    bound = max_row_blocks(cfg, n_kv, gen_block)
    assert sel.max_row_blocks == bound and int(sel.table.sum(-1).max()) <= bound < n_kv


def test_forced_block_refuses_an_unresolved_auto_block_size():
    with pytest.raises(ValueError, match=r"rule='prompt_end' needs the resolved block size .*, got 'auto'"):
        forced_block("prompt_end", 100, "auto", 9)


@pytest.mark.parametrize(("offset", "size"), [("middle", 16), (None, 128)])
def test_select_layer_sizes_auto_blocks_by_the_key_length(offset, size):
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 2, 1000, 16, generator=g) for _ in range(2))
    cfg = SparseDConfig(prompt_end_offset=offset)  # block_size="auto"
    sel = select_layer(q, k, 0.25, cfg, gen_start=995)
    front = cfg.for_length(1000).grid_front(995)
    assert cfg.for_length(1000).block_size == size
    assert sel.table.shape[-1] == -(-(1000 + front) // size)
