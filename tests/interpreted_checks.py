"""Checks of the Triton decode kernels that run on the CPU under Triton's interpreter.

`test_kernels_interpreted.py` runs each function here in a subprocess with ``TRITON_INTERPRET=1``
(Triton reads it when a kernel is defined, so it must be set before the kernels' module is
imported). Inputs are fp32, so the kernels' sums differ from PyTorch's by rounding only.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import torch.nn.functional as F

ATOL = 1e-5


def _counted(name: str) -> list[int]:
    """The query rows of every call to ``kernels.sparse_decode.<name>`` from now on (the kernel
    still runs; each check runs in its own process)."""
    from sparsed_backend.attention.kernels import sparse_decode

    calls, real = [], getattr(sparse_decode, name)

    def counted(*args, **kwargs):
        calls.append(args[0].shape[2])
        return real(*args, **kwargs)

    setattr(sparse_decode, name, counted)
    return calls


def _inputs(b, hq, hkv, q_len, storage, d, pad_rows, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, q_len, d, generator=g)
    k = torch.randn(b, hkv, storage, d, generator=g) * 1.5
    v = torch.randn(b, hkv, storage, d, generator=g)
    valid = torch.ones(b, storage, dtype=torch.bool)
    valid[-1, :pad_rows] = False
    return g, q, k, v, valid


def _dense(q, k, v, valid, key_len):
    mask = valid[:, None, None, :key_len]
    return F.scaled_dot_product_attention(q, k[:, :, :key_len], v[:, :, :key_len], attn_mask=mask, enable_gqa=True,
                                          scale=q.shape[-1] ** -0.5)  # fmt: skip


def sparse_decode_equals_the_gather() -> None:
    """`sparse_decode_attention` (kept blocks read in place, split over programs) equals the
    gather + SDPA step, per query and per KV head, with a short first grid block, left padding,
    an empty prefix, and fewer and more splits than blocks."""
    from sparsed_backend.attention.kernels.sparse_decode import decode_offsets, sparse_decode_attention
    from sparsed_backend.attention.prefix_selection import (
        PrefixSelection,
        PrefixSparseConfig,
        gathered_attention,
        prefix_grid,
        select_prefix_blocks,
        sparse_gather,
    )

    hq, hkv, d, bs = 8, 2, 16, 16
    for per_kv in (True, False):
        for q_len, prefix, pad, splits in [(4, 300, 0, None), (4, 301, 100, 3), (7, 0, 0, None), (16, 129, 40, 1)]:
            s = prefix + q_len
            g, q, k, v, valid = _inputs(2, hq, hkv, q_len, s + 20, d, pad, seed=prefix + q_len)
            front, n = prefix_grid(prefix, bs)
            config = PrefixSparseConfig(select=0.3, block_size=bs, per_kv_head=per_kv)
            heads = hkv if per_kv else hq
            blocks = select_prefix_blocks(torch.rand(2, hq, n, generator=g), config, hkv) if n else torch.zeros(
                2, heads, 0, dtype=torch.long)  # fmt: skip
            sel = PrefixSelection(blocks, prefix, front, n, bs)
            _, index, mask = sparse_gather(sel, q_len, valid[:, :s], hq, hkv)
            want = gathered_attention(q, k[:, :, :s], v[:, :, :s], index, mask, d**-0.5)
            offsets = decode_offsets(prefix, front, s, q.device)
            got = sparse_decode_attention(q, k, v, blocks, offsets, bs, d**-0.5, valid if pad else None, splits)
            torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def block_mass_kernel_is_dense_attention_and_its_mass() -> None:
    """Listing every prefix block, `decode_attention_with_block_mass` gives dense attention and
    `prefix_block_mass`'s mass (summed over a KV head's query heads per KV head)."""
    from sparsed_backend.attention.kernels.sparse_decode import decode_attention_with_block_mass, decode_offsets
    from sparsed_backend.attention.prefix_selection import prefix_block_mass, prefix_grid

    hq, hkv, d, bs = 8, 2, 16, 16
    for per_kv in (True, False):
        for q_len, prefix, pad in [(4, 300, 0), (4, 257, 90), (7, 5, 0)]:
            s = prefix + q_len
            _, q, k, v, valid = _inputs(2, hq, hkv, q_len, s + 20, d, pad, seed=prefix)
            front, n = prefix_grid(prefix, bs)
            heads = hkv if per_kv else hq
            blocks = torch.arange(n).expand(2, heads, n).contiguous()
            offsets = decode_offsets(prefix, front, s, q.device)
            out, mass = decode_attention_with_block_mass(q, k, v, blocks, offsets, bs, d**-0.5, valid if pad else None)
            torch.testing.assert_close(out, _dense(q, k, v, valid, s), rtol=0, atol=ATOL)
            want, _ = prefix_block_mass(q, k[:, :, :s], d**-0.5, bs, valid[:, :s])
            if per_kv:
                want = want.view(2, hkv, hq // hkv, n).sum(2)
            torch.testing.assert_close(mass, want, rtol=1e-4, atol=ATOL)


def dense_decode_is_dense_attention() -> None:
    """`dense_decode_attention` (the key range shared out over splits, its end read from the
    device) equals SDPA over keys [0, key_len) of a longer storage: padded, more splits than key
    tiles, a key length shorter than one tile, GQA and not."""
    from sparsed_backend.attention.kernels.sparse_decode import decode_offsets, dense_decode_attention

    for hq, hkv, q_len, key_len, pad, splits in [(8, 2, 4, 300, 0, None), (8, 2, 4, 1000, 300, 7),
                                                 (4, 4, 7, 65, 0, 3), (8, 2, 32, 129, 40, None),
                                                 (8, 2, 4, 5, 0, None), (4, 2, 4, 4, 1, 50)]:  # fmt: skip
        _, q, k, v, valid = _inputs(2, hq, hkv, q_len, key_len + 100, 32, pad, seed=key_len)
        offsets = decode_offsets(0, 0, key_len, q.device)
        got = dense_decode_attention(q, k, v, offsets, 32**-0.5, valid if pad else None, splits)
        torch.testing.assert_close(got, _dense(q, k, v, valid, key_len), rtol=0, atol=ATOL)


def decode_kernels_property() -> None:
    """Hypothesis, over batch, GQA ratio, block length, prefix length (0-300), prefix grid
    block (16-64, so a short first block), left padding and splits: the sparse kernel listing
    every prefix block (keep = 100%) and the split-KV dense kernel both equal SDPA's dense
    attention, the fused kernel gives dense attention and `prefix_block_mass`'s mass, and the
    sparse kernel on a random selection of ``select`` equals the gather + SDPA step. Up to 32
    rows with 4 query heads per KV head, so the dense kernel runs both ways: a group's heads in
    one program, and one program per query head (past `policy.DECODE_KERNEL_ROWS` rows)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from sparsed_backend.attention.kernels.sparse_decode import (
        decode_attention_with_block_mass,
        decode_offsets,
        dense_decode_attention,
        sparse_decode_attention,
    )
    from sparsed_backend.attention.prefix_selection import (
        PrefixSelection,
        PrefixSparseConfig,
        gathered_attention,
        prefix_block_mass,
        prefix_grid,
        select_prefix_blocks,
        sparse_gather,
    )

    @settings(max_examples=25, deadline=None, derandomize=os.environ.get("HYPOTHESIS_PROFILE") == "ci")
    @given(
        b=st.integers(1, 2), hkv=st.sampled_from([1, 2, 4]), ratio=st.sampled_from([1, 2, 4]),
        q_len=st.integers(1, 32), prefix=st.integers(0, 300), bs=st.sampled_from([16, 32, 64]),
        pad_share=st.floats(0.0, 1.0), per_kv=st.booleans(), splits=st.one_of(st.none(), st.integers(1, 9)),
        select=st.floats(0.05, 1.0), seed=st.integers(0, 2**16),
    )  # fmt: skip
    def check(b, hkv, ratio, q_len, prefix, bs, pad_share, per_kv, splits, select, seed):
        hq, s = hkv * ratio, prefix + q_len
        _, q, k, v, valid = _inputs(b, hq, hkv, q_len, s + 7, 16, int(pad_share * prefix), seed)
        key_valid = valid if pad_share > 0 else None
        want = _dense(q, k, v, valid, s)
        front, n = prefix_grid(prefix, bs)
        heads = hkv if per_kv else hq
        every = torch.arange(n).expand(b, heads, n).contiguous()
        offsets = decode_offsets(prefix, front, s, q.device)
        got = sparse_decode_attention(q, k, v, every, offsets, bs, 16**-0.5, key_valid, splits)
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
        dense = dense_decode_attention(q, k, v, decode_offsets(0, 0, s, q.device), 16**-0.5, key_valid, splits)
        torch.testing.assert_close(dense, want, rtol=0, atol=ATOL)
        out, mass = decode_attention_with_block_mass(q, k, v, every, offsets, bs, 16**-0.5, key_valid)
        torch.testing.assert_close(out, want, rtol=0, atol=ATOL)
        want_mass, _ = prefix_block_mass(q, k[:, :, :s], 16**-0.5, bs, valid[:, :s])
        if per_kv:
            want_mass = want_mass.view(b, hkv, ratio, n).sum(2)
        torch.testing.assert_close(mass, want_mass, rtol=1e-4, atol=ATOL)
        if n:  # a random selection: the kernel reads what the gather copies
            config = PrefixSparseConfig(select=select, block_size=bs, per_kv_head=per_kv)
            g = torch.Generator().manual_seed(seed)
            blocks = select_prefix_blocks(torch.rand(b, hq, n, generator=g), config, hkv)
            _, index, gather_mask = sparse_gather(PrefixSelection(blocks, prefix, front, n, bs), q_len, valid[:, :s],
                                                  hq, hkv)  # fmt: skip
            gathered = gathered_attention(q, k[:, :, :s], v[:, :, :s], index, gather_mask, 16**-0.5)
            got = sparse_decode_attention(q, k, v, blocks, offsets, bs, 16**-0.5, key_valid, splits)
            torch.testing.assert_close(got, gathered, rtol=0, atol=ATOL)

    check()


def whole_forwards_with_the_kernels_decode_the_models_tokens() -> None:
    """blockdiff_generate(cuda_graphs="whole") run uncaptured with the kernels (what its graphs
    capture: the split-KV dense kernel for exact forwards, the fused kernel and in-graph top-k
    for selecting steps, the sparse kernel for the rest) decodes the model's own tokens and
    selections (the separate scorer's), padded and not, with select_every and sparse_commit."""
    from sparsed_backend.attention.prefix_selection import PrefixSparseConfig
    from sparsed_backend.sampling import block_diffusion
    from sparsed_backend.sampling.block_diffusion import blockdiff_generate
    from sparsed_backend.sampling.decode_graphs import GraphedDecoder
    from test_decode_graphs import MASK_ID, sdar_model

    class KernelsUncaptured(GraphedDecoder):
        def __init__(self, *a, **k):
            super().__init__(*a, **k, capture=False, kernels=True)

    configs = [
        None,
        PrefixSparseConfig(select=0.3, block_size=16, per_kv_head=True, scorer="fused"),
        PrefixSparseConfig(select=0.3, block_size=16, scorer="fused", select_every=3, sparse_commit=True),
    ]
    for sparsed in configs:
        for padded in (False, True):
            model = sdar_model("sdpa" if sparsed is None else "sparsed")
            ids = torch.randint(2, MASK_ID, (2, 70), generator=torch.Generator().manual_seed(8))
            mask = torch.ones_like(ids)
            if padded:
                mask[1, :23] = 0
            args = {"gen_length": 24, "block_length": 4, "denoising_steps": 2, "mask_id": MASK_ID,
                    "return_dict_in_generate": True}  # fmt: skip
            reference = None if sparsed is None else dataclasses.replace(sparsed, scorer="separate")
            want = blockdiff_generate(model, ids, mask, sparsed=reference, **args)
            block_diffusion.GraphedDecoder = KernelsUncaptured
            try:
                got = blockdiff_generate(model, ids, mask, sparsed=sparsed, cuda_graphs="whole", **args)
            finally:
                block_diffusion.GraphedDecoder = GraphedDecoder
            assert torch.equal(got.sequences, want.sequences), (sparsed, padded)
            if sparsed is not None:
                assert got.sparsed_state.density() == want.sparsed_state.density(), (sparsed, padded)


def cached_windows_through_the_kernel_equal_flex() -> None:
    """LLaDA and Dream with a dual / prefix K/V cache and SparseD: a dual window (8 rows, in one
    16-row query block of the selection's grid) runs through the block-sparse decode kernel
    (`backend.window_decode_attention`, taken here because the interpreter stands in for CUDA)
    and decodes the tokens the FlexAttention windows decode (forced by refusing the kernel),
    padded batch, moved grid (the default) and the reference grid; a prefix window spanning
    several query blocks stays on FlexAttention."""
    from sparsed_backend.attention import policy
    from sparsed_backend.attention.config import SparseDConfig
    from sparsed_backend.attention.state import LayerSelection
    from sparsed_backend.sampling.generation import dream_generate, llada_generate
    from tiny_models import padded_pair, tiny_model

    taken = _counted("sparse_decode_attention")
    flexed = []
    window_mask = LayerSelection.window_mask

    def flex_window(sel, start, q_len, *rest):
        flexed.append(q_len)
        return window_mask(sel, start, q_len, *rest)

    LayerSelection.window_mask = flex_window
    refusal = policy.decode_kernel_refusal
    for kind, generate in (("llada", llada_generate), ("dream", dream_generate)):
        model = tiny_model(kind)
        model.set_attn_implementation("sparsed")
        ids, mask = padded_pair(0, 16, 6)
        for mode in ("dual", "prefix"):
            for grid in ("middle", None):
                cfg = SparseDConfig(skip=0.25, select=0.5, block_size=16, min_sparse_len=0, prompt_end_offset=grid)
                gen = {"gen_length": 32} if kind == "llada" else {"max_new_tokens": 32, "alg": "entropy"}
                run = functools.partial(generate, model, ids, mask, steps=8, block_length=8, kv_cache=mode,
                                        sparsed=cfg, **gen)  # fmt: skip
                taken.clear()
                flexed.clear()
                got = run()
                windows, flex_windows = list(taken), list(flexed)
                policy.decode_kernel_refusal = lambda q, bs: "forced off"
                try:
                    want = run()
                finally:
                    policy.decode_kernel_refusal = refusal
                assert torch.equal(got, want), (kind, mode, grid)
                if mode == "dual":  # through the kernel (Dream's windows, a row longer for its shifted
                    # logits, cross a query block now and then: those go to FlexAttention)
                    assert windows and max(windows) <= 9, (kind, mode, grid, windows)
                else:  # the long windows span several query blocks: FlexAttention
                    assert flex_windows and max(flex_windows) > 16, (kind, mode, grid, flex_windows)


def dense_cache_windows_through_the_kernel_decode_sdpas_tokens() -> None:
    """LLaDA and Dream loaded with "sparsed" but no SparseD config (dense attention): a cache
    window of at most `policy.DECODE_KERNEL_ROWS` rows runs through the split-KV dense decode
    kernel (counted) and the generation decodes the tokens of the same model on SDPA, dual and
    prefix cache, a padded batch."""
    from sparsed_backend.sampling.generation import dream_generate, llada_generate
    from tiny_models import padded_pair, tiny_model

    taken = _counted("dense_decode_attention")
    ids, mask = padded_pair(0, 16, 6)
    for kind, generate in (("llada", llada_generate), ("dream", dream_generate)):
        gen = {"gen_length": 32} if kind == "llada" else {"max_new_tokens": 32, "alg": "entropy"}
        model = tiny_model(kind)
        for mode in ("dual", "prefix"):
            outs = []
            for attn in ("sdpa", "sparsed"):
                model.set_attn_implementation(attn)
                taken.clear()
                outs.append(generate(model, ids, mask, steps=8, block_length=8, kv_cache=mode, **gen))
            assert torch.equal(outs[0], outs[1]), (kind, mode)
            assert taken and max(taken) <= 33, (kind, mode, taken)  # the windows (Dream's a row longer)
        model.set_attn_implementation("sdpa")


def a_kernel_window_gives_the_refreshs_rows() -> None:
    """A refresh on a sparse step, then a cached sparse step on a window with the tokens
    unchanged: the window's logits are the refresh's rows (fp32, 1e-5), for windows that the
    decode kernel runs (in one query block of the selection's grid: counted) on the reference
    grid and on a moved one (front 8), LLaDA and Dream, a padded batch."""
    from sparsed_backend.attention.config import SparseDConfig
    from sparsed_backend.attention.state import SparseDState
    from sparsed_backend.sampling.kv_cache import BlockKVCache
    from tiny_models import MASK_ID, padded_pair, tiny_model

    taken = _counted("sparse_decode_attention")
    p, g = 16, 32
    ids, mask = padded_pair(2, p, 6)
    x = torch.cat([ids, torch.randint(2, MASK_ID, (2, g), generator=torch.Generator().manual_seed(2))], 1)
    x[:, p + 20 :] = MASK_ID
    full_mask = torch.cat([mask, torch.ones(2, g, dtype=torch.long)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp_min(0)
    for kind in ("llada", "dream"):
        model = tiny_model(kind)
        model.set_attn_implementation("sparsed")
        for offset, (start, stop) in ((None, (16, 32)), (None, (20, 28)), (8, (16, 24)), (8, (26, 32))):
            cfg = SparseDConfig(skip=0.0, select=0.5, block_size=16, min_sparse_len=0, prompt_end_offset=offset)
            state = SparseDState(cfg, steps=3, gen_start=p)
            cache = BlockKVCache("dual")
            with torch.no_grad():
                model(x, attention_mask=full_mask, position_ids=pos, sparsed_state=state)  # the switch step
                state.advance()
                cache.refresh()
                full = model(x, attention_mask=full_mask, position_ids=pos, sparsed_state=state, kv_cache=cache)
                state.advance()
                cache.set_window(start, stop)
                taken.clear()
                rows = {"position_ids": pos[:, start:stop], "sparsed_state": state, "kv_cache": cache}
                part = model(x[:, start:stop], attention_mask=full_mask, **rows).logits
            assert taken == [stop - start] * model.config.num_hidden_layers, (kind, offset, start, taken)
            assert state.layers[0].density < 1
            torch.testing.assert_close(part, full.logits[:, start:stop], rtol=1e-5, atol=1e-5)
    model.set_attn_implementation("sdpa")


if __name__ == "__main__":  # one check, by name (what the test runs)
    import sys

    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    globals()[sys.argv[1]]()
    print("ok", sys.argv[1])
