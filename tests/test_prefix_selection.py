"""Sparse prefix selection for block diffusion (prefix_selection.py) against fp64 oracles."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import Qwen3Config, Qwen3ForCausalLM

import sparsed_backend  # noqa: F401  (registers the "sparsed" attention)
from sparsed_backend._validate import ArgumentTypeError, ArgumentValueError
from sparsed_backend.attention.prefix_selection import (
    PrefixSelection,
    PrefixSparseConfig,
    PrefixSparseState,
    prefix_block_mass,
    prefix_sparse_attention,
)
from sparsed_backend.attention.switch_step import dense_with_lse
from sparsed_backend.sampling.block_cache import BlockDiffusionKVCache
from sparsed_backend.sampling.block_diffusion import blockdiff_generate

REFERENCE_DIR = Path(__file__).parent / "fixtures" / "sdar_reference"


def sdar_model(implementation: str) -> Qwen3ForCausalLM:
    """The tiny SDAR weights of the parity fixture (2 layers, 4 query / 2 kv heads, head_dim 16)."""
    fields = json.loads((REFERENCE_DIR / "config.json").read_text())
    fields = {k: v for k, v in fields.items() if k not in ("architectures", "model_type")}
    model = Qwen3ForCausalLM(Qwen3Config(**fields, attn_implementation=implementation)).eval()
    model.load_state_dict(load_file(REFERENCE_DIR / "model.safetensors"), strict=True)
    return model


def inputs(seed: int, b: int, hq: int, hkv: int, prefix: int, length: int, d: int, pad: int):
    """q (B, Hq, L, D), k / v (B, Hkv, S, D), the block-causal mask of a denoising step (B, 1, L, S)
    whose last row has ``pad`` left-padded keys, all float32."""
    g = torch.Generator().manual_seed(seed)
    s = prefix + length
    q = torch.randn(b, hq, length, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g) * 1.5
    v = torch.randn(b, hkv, s, d, generator=g)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[-1, :pad] = False
    return q, k, v, valid[:, None, None, :].expand(b, 1, length, s).clone()


def oracle_mass(q, k, valid, block_size):
    """fp64: per query head, the softmax mass of all queries on each prefix block, on the grid that
    ends where the prefix ends."""
    hq, hkv = q.shape[1], k.shape[1]
    kk = k.double().repeat_interleave(hq // hkv, 1)
    scores = (q.double() @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1).sum(2)  # (B, Hq, S)
    prefix = k.shape[2] - q.shape[2]
    front = (-prefix) % block_size
    p = F.pad(p[..., :prefix], (front, 0)).unflatten(-1, (-1, block_size)).sum(-1)
    return p, front


SHAPES = st.tuples(
    st.integers(1, 2),  # batch
    st.sampled_from([(4, 4), (4, 2), (6, 1)]),  # query / kv heads
    st.integers(0, 70),  # prefix length
    st.sampled_from([1, 4, 8]),  # block length (queries)
    st.sampled_from([8, 16]),  # prefix block size
    st.integers(0, 9),  # left padding of the last row
)


@settings(max_examples=40, deadline=None)
@given(SHAPES, st.integers(0, 2**16))
def test_keeping_every_block_gathers_the_dense_keys_and_equals_dense(shape, seed):
    """select = 1.0: the sparse step gathers exactly positions 0 .. S-1 in order, so its output is
    bit-identical to SDPA over the same (repeated) K/V and mask."""
    b, (hq, hkv), prefix, length, block, pad = shape
    pad = min(pad, prefix)
    q, k, v, mask = inputs(seed, b, hq, hkv, prefix, length, 16, pad)
    state = PrefixSparseState(PrefixSparseConfig(select=1.0, block_size=block))
    state.begin_block()
    scored = prefix_sparse_attention(q, k, v, mask, 0.25, state, 0)
    state.mode = "sparse"
    sparse = prefix_sparse_attention(q, k, v, mask, 0.25, state, 0)
    rep = hq // hkv
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    dense = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask[:, :, -1:].expand(b, hq, 1, -1), scale=0.25)
    assert torch.equal(sparse, dense)
    torch.testing.assert_close(scored, dense, rtol=1e-5, atol=1e-6)
    assert state.layers[0].density == 1.0


@settings(max_examples=40, deadline=None)
@given(SHAPES, st.sampled_from([0.2, 0.5]), st.booleans(), st.integers(0, 2**16))
def test_selection_is_the_oracles_top_blocks_and_the_step_attends_only_to_them(shape, select, per_kv, seed):
    """The kept blocks are each head's top-k by the fp64 oracle's mass (summed over a GQA group
    with per_kv_head); the sparse step equals fp64 attention restricted to those blocks and the
    block itself."""
    b, (hq, hkv), prefix, length, block, pad = shape
    pad = min(pad, prefix)
    q, k, v, mask = inputs(seed, b, hq, hkv, prefix, length, 16, pad)
    cfg = PrefixSparseConfig(select=select, block_size=block, per_kv_head=per_kv)
    state = PrefixSparseState(cfg)
    state.begin_block()
    prefix_sparse_attention(q, k, v, mask, 16**-0.5, state, 3)
    sel = state.layers[3]
    mass, front = oracle_mass(q, k, mask[:, 0, -1], block)
    assert sel.front == front and sel.n_blocks == mass.shape[-1]
    if per_kv:
        mass = mass.view(b, hkv, hq // hkv, -1).sum(2)
    n = mass.shape[-1]
    kept = cfg.blocks_kept(n)
    assert sel.blocks.shape == (b, mass.shape[1], kept)
    if n:
        # Ties aside (random inputs), the kept set is the top-k of the oracle's mass.
        want = mass.topk(kept, -1).indices.sort(-1).values
        assert torch.equal(sel.blocks, want)
    state.mode = "sparse"
    got = prefix_sparse_attention(q, k, v, mask, 16**-0.5, state, 3)
    # Oracle: a token mask of the kept blocks (grid block j = positions j*block - front ...).
    s = prefix + length
    pos = torch.arange(s)
    grid_block = (pos + front) // block
    heads = sel.blocks.shape[1]
    keep = (grid_block[None, None, :, None] == sel.blocks[:, :, None, :]).any(-1) & (pos < prefix)
    keep = keep | (pos >= prefix)  # the block's own keys
    keep = keep.repeat_interleave(hq // heads, 1) & mask[:, :, -1]  # (B, Hq, S)
    kk, vv = (t.double().repeat_interleave(hq // hkv, 1) for t in (k, v))
    scores = (q.double() @ kk.transpose(-1, -2)) * 16**-0.5
    want = scores.masked_fill(~keep[:, :, None, :], float("-inf")).softmax(-1) @ vv
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(SHAPES, st.integers(1, 12), st.booleans(), st.integers(0, 2**16))
def test_a_reused_selection_reads_its_kept_blocks_and_every_position_since(shape, tail, per_kv, seed):
    """select_every > 1: a later block's sparse step on an earlier selection attends the kept
    blocks of the selection's prefix plus every position committed since (the tail) and the block
    itself, as fp64 attention restricted to those positions; at select 1.0 that is dense."""
    b, (hq, hkv), prefix, length, block, pad = shape
    pad = min(pad, prefix)
    q, k, v, mask = inputs(seed, b, hq, hkv, prefix + tail, length, 16, pad)
    for select in (0.3, 1.0):
        cfg = PrefixSparseConfig(select=select, block_size=block, per_kv_head=per_kv, select_every=2)
        state = PrefixSparseState(cfg)
        state.begin_block()  # the selection, on the first `prefix` positions
        short = (q, k[:, :, : prefix + length], v[:, :, : prefix + length], mask[..., : prefix + length])
        prefix_sparse_attention(*short, 16**-0.5, state, 0)
        state.begin_block()  # the next block reuses it, `tail` positions later
        assert state.mode == "sparse" and state.selections == 1
        got = prefix_sparse_attention(q, k, v, mask, 16**-0.5, state, 0)
        sel = state.layers[0]
        s = prefix + tail + length
        pos = torch.arange(s)
        grid_block = (pos + sel.front) // block
        keep = (grid_block[None, None, :, None] == sel.blocks[:, :, None, :]).any(-1) & (pos < prefix)
        keep = keep | (pos >= prefix)  # the tail and the block
        keep = keep.repeat_interleave(hq // sel.blocks.shape[1], 1) & mask[:, :, -1]
        kk, vv = (t.double().repeat_interleave(hq // hkv, 1) for t in (k, v))
        scores = (q.double() @ kk.transpose(-1, -2)) * 16**-0.5
        want = scores.masked_fill(~keep[:, :, None, :], float("-inf")).softmax(-1) @ vv
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        if select == 1.0:
            dense = scores.masked_fill(~mask[:, :, -1:].expand(b, hq, 1, -1), float("-inf")).softmax(-1) @ vv
            torch.testing.assert_close(got.double(), dense, rtol=1e-5, atol=1e-5)


def test_select_every_selects_at_every_nth_block_and_refuses_a_bad_value():
    state = PrefixSparseState(PrefixSparseConfig(select_every=3))
    modes = []
    for _ in range(7):
        state.begin_block()
        modes.append(state.mode)
        state.layers[0] = PrefixSelection(torch.zeros(1, 1, 1, dtype=torch.long), 0, 0, 2, 128)  # as a score step
    assert modes == ["score", "sparse", "sparse", "score", "sparse", "sparse", "score"]
    assert state.selections == 3 and state.blocks_begun == 7
    with pytest.raises(ArgumentValueError, match="select_every must be >= 1, got 0") as err:
        PrefixSparseConfig(select_every=0)
    assert err.value.argument == "select_every"


def test_later_sparse_steps_reuse_the_gather_and_read_the_blocks_new_keys():
    """A block's first sparse step builds the kept keys' index; its later steps reuse it (the
    kept blocks and the mask do not change) and still read the block's own K/V as they change."""
    q, k, v, mask = inputs(3, 2, 4, 2, 50, 4, 16, 3)
    state = PrefixSparseState(PrefixSparseConfig(select=0.5, block_size=8, per_kv_head=True))
    state.begin_block()
    prefix_sparse_attention(q, k, v, mask, 0.25, state, 0)
    state.mode = "sparse"
    prefix_sparse_attention(q, k, v, mask, 0.25, state, 0)
    sel = state.layers[0]
    gather = sel.gather
    assert gather is not None
    q2, k2, v2 = q * 0.5, k.clone(), v.clone()
    k2[:, :, -4:] += 1.0  # the block's own keys and values change between its steps
    v2[:, :, -4:] -= 1.0
    again = prefix_sparse_attention(q2, k2, v2, mask, 0.25, state, 0)
    assert state.layers[0].gather is gather
    fresh = PrefixSparseState(state.config, mode="sparse")
    fresh.layers[0] = PrefixSelection(sel.blocks, sel.prefix_len, sel.front, sel.n_blocks, sel.block_size)
    assert torch.equal(again, prefix_sparse_attention(q2, k2, v2, mask, 0.25, fresh, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlashAttention and cuDNN)")
def test_flash_gives_cudnns_log_sum_exp_for_grouped_heads():
    """dense_with_lse(kernel="flash") runs FlashAttention-2 on grouped K/V heads (no warning,
    so no fall back to cuDNN) and returns cuDNN's output and log-sum-exp (bf16, SDAR-8B heads)."""
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(2, 32, 4, 128, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(2, 8, 6004, 128, device="cuda", generator=g).bfloat16() for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = dense_with_lse(q, k, v, 128**-0.5, kernel="flash")
    want_out, want_lse = dense_with_lse(q, k, v, 128**-0.5, kernel="cudnn")
    assert lse is not None and lse.shape == (2, 32, 4)
    torch.testing.assert_close(lse, want_lse, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out, want_out, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuDNN's attention with log-sum-exp)")
@pytest.mark.parametrize("per_kv", [False, True])
def test_an_unpadded_selecting_step_scores_with_cudnns_log_sum_exp(per_kv):
    """padded=False (the sampler's rows share one length): the selecting step takes the rows'
    log-sum-exp from the fused attention (FlashAttention-2) and sweeps the prefix once; its
    output, block masses and kept blocks match the masked two-sweep step's (bf16, SDAR-8B
    heads)."""
    g = torch.Generator(device="cuda").manual_seed(4)
    q = torch.randn(2, 32, 4, 128, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(2, 8, 6004, 128, device="cuda", generator=g).bfloat16() for _ in range(2))
    mask = torch.ones(2, 1, 4, 6004, dtype=torch.bool, device="cuda")
    outs, kept = {}, {}
    for padded in (True, False):
        state = PrefixSparseState(PrefixSparseConfig(select=0.2, block_size=128, per_kv_head=per_kv), padded=padded)
        state.begin_block()
        outs[padded] = prefix_sparse_attention(q, k, v, mask, 128**-0.5, state, 0)
        kept[padded] = state.layers[0].blocks
    torch.testing.assert_close(outs[False], outs[True], rtol=2e-2, atol=2e-2)
    _, lse = dense_with_lse(q, k, v, 128**-0.5)
    assert lse is not None, "cuDNN gave no log-sum-exp on this machine"
    one, _ = prefix_block_mass(q, k, 128**-0.5, 128, mask[:, 0, -1], lse)
    two, _ = prefix_block_mass(q, k, 128**-0.5, 128, mask[:, 0, -1])
    torch.testing.assert_close(one, two, rtol=2e-2, atol=1e-5)
    same = (kept[False][..., :, None] == kept[True][..., None, :]).any(-1).float().mean().item()
    assert same > 0.95, f"only {same:.1%} of the kept blocks agree"


def test_mass_covers_every_attendable_key_once():
    """The prefix mass and the block's own share add up to the number of query rows."""
    q, k, _, mask = inputs(0, 2, 4, 2, 45, 4, 16, 7)
    mass, front = prefix_block_mass(q, k, 0.25, 16, mask[:, 0, -1])
    assert front == 3 and mass.shape == (2, 4, 3)
    kk = k.repeat_interleave(2, 1)
    p = ((q @ kk.transpose(-1, -2)) * 0.25).masked_fill(~mask[:, :, -1:], float("-inf")).softmax(-1)
    own = p[..., 45:].sum((-1, -2))
    torch.testing.assert_close(mass.sum(-1) + own, torch.full((2, 4), 4.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("every", "sparse_commit"), [(1, False), (3, False), (1, True), (3, True)])
@pytest.mark.parametrize("prompt_len", [3, 21])
def test_sampler_at_select_one_decodes_the_dense_tokens(prompt_len, every, sparse_commit):
    """blockdiff_generate with the "sparsed" attention and select 1.0 decodes what the dense
    sampler ("sdpa") decodes, greedy, for a prompt shorter than one block and one of several,
    selecting at every block or at every third (the blocks between read the positions since),
    with exact commits or sparse ones (which at select 1.0 read every key)."""
    g = torch.Generator().manual_seed(prompt_len)
    ids = torch.randint(2, 99, (2, prompt_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    common = {"gen_length": 12, "block_length": 4, "denoising_steps": 4, "mask_id": 99}
    dense = blockdiff_generate(sdar_model("sdpa"), ids, mask, **common)
    out = blockdiff_generate(
        sdar_model("sparsed"), ids, mask, return_dict_in_generate=True, **common,
        sparsed=PrefixSparseConfig(select=1.0, block_size=4, select_every=every, sparse_commit=sparse_commit),
    )  # fmt: skip
    assert torch.equal(out.sequences, dense)
    state = out.sparsed_state
    assert len(out.block_steps) == state.blocks_begun == 4 and state.density() == 1.0
    assert state.selections == (4 if every == 1 else 2)


def test_sampler_keeps_a_share_of_the_prefix_and_commits_exact_keys():
    """select 0.25 keeps a quarter of the prefix blocks per head at every block's selection; the
    commits run exact attention, so the cache after the run holds the dense model's K/V."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 99, (1, 40), generator=g)
    model = sdar_model("sparsed")
    common = {"gen_length": 8, "block_length": 4, "denoising_steps": 2, "mask_id": 99}
    modes = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: modes.append(kwargs["prefix_state"].mode), with_kwargs=True
    )
    out = blockdiff_generate(
        model, ids, sparsed=PrefixSparseConfig(select=0.25, block_size=8), return_dict_in_generate=True, **common
    )
    # prefill, then per block: score, sparse, commit.
    assert modes == ["dense", "score", "sparse", "dense", "score", "sparse", "dense"]
    assert 0.2 < out.sparsed_state.density() < 0.5  # ceil(0.25 * 5 or 6 blocks) of 5-6


def test_sparse_commits_store_the_keys_the_sparse_steps_read(monkeypatch):
    """sparse_commit=True: each block's commit runs in sparse mode (prefix blocks kept by the
    block's selection), so the cache then holds K/V that differ from the exact commits' from
    the second layer on (the first layer's K/V come from the embeddings alone)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 99, (1, 40), generator=g)
    common = {"gen_length": 8, "block_length": 4, "denoising_steps": 2, "mask_id": 99}
    caches, modes = [], []
    update = BlockDiffusionKVCache.update
    for sparse_commit in (False, True):
        model = sdar_model("sparsed")
        hook = model.model.layers[0].self_attn.register_forward_pre_hook(
            lambda mod, args, kwargs: modes.append(kwargs["prefix_state"].mode), with_kwargs=True
        )
        seen = []

        def spy(self, key, value, layer_idx, *args, seen=seen, **kwargs):
            seen.append(self)
            return update(self, key, value, layer_idx, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(BlockDiffusionKVCache, "update", spy)
            config = PrefixSparseConfig(select=0.25, block_size=8, sparse_commit=sparse_commit)
            blockdiff_generate(model, ids, sparsed=config, **common)
        hook.remove()
        caches.append(seen[-1])
    # prefill, then per block: score, sparse, commit (dense, then sparse).
    assert modes[:7] == ["dense", "score", "sparse", "dense", "score", "sparse", "dense"]
    assert modes[7:] == ["dense", "score", "sparse", "sparse", "score", "sparse", "sparse"]
    exact, sparse = caches
    first = slice(40, 44)  # the first decoded block: the same tokens in both runs (nothing differs before its commit)
    assert torch.equal(exact.keys[:, :, :, :40], sparse.keys[:, :, :, :40])  # the prefill is exact in both
    assert torch.equal(exact.keys[0, :, :, first], sparse.keys[0, :, :, first])  # layer 0: embeddings only
    assert not torch.allclose(exact.keys[1:, :, :, first], sparse.keys[1:, :, :, first])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the block-sparse decode kernel)")
@pytest.mark.parametrize("per_kv", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_the_fused_scorer_selects_what_the_separate_one_selects(per_kv, padded):
    """scorer="fused" (one sweep of the decode kernel over every prefix block) gives the
    separate scorer's output and, but for near ties in bf16, its kept blocks (SDAR-8B heads, a
    prefix with a short first block, with and without left padding)."""
    g = torch.Generator(device="cuda").manual_seed(6)
    q = torch.randn(2, 32, 4, 128, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(2, 8, 6004, 128, device="cuda", generator=g).bfloat16() for _ in range(2))
    mask = torch.ones(2, 1, 4, 6004, dtype=torch.bool, device="cuda")
    if padded:
        mask[1, ..., :900] = False
    outs, kept = {}, {}
    for scorer in ("separate", "fused"):
        config = PrefixSparseConfig(select=0.2, block_size=128, per_kv_head=per_kv, scorer=scorer)
        state = PrefixSparseState(config, padded=padded)
        state.begin_block()
        outs[scorer] = prefix_sparse_attention(q, k, v, mask, 128**-0.5, state, 0)
        kept[scorer] = state.layers[0].blocks
    torch.testing.assert_close(outs["fused"], outs["separate"], rtol=2e-2, atol=2e-2)
    assert kept["fused"].shape == kept["separate"].shape
    same = (kept["fused"][..., :, None] == kept["separate"][..., None, :]).any(-1).float().mean().item()
    assert same > 0.95, f"only {same:.1%} of the kept blocks agree"


def test_the_fused_scorer_refuses_what_the_decode_kernel_cannot_run():
    """No silent fallback: scorer="fused" off CUDA raises, naming the argument and the reason."""
    ids = torch.randint(2, 99, (1, 9))
    config = PrefixSparseConfig(scorer="fused")
    common = {"gen_length": 4, "block_length": 4, "denoising_steps": 4, "mask_id": 99}
    with pytest.raises(ArgumentValueError, match=r"scorer='fused' needs the block-sparse decode kernel, but it runs on "
                                                 r"CUDA, the query is on cpu") as err:  # fmt: skip
        blockdiff_generate(sdar_model("sparsed"), ids, sparsed=config, **common)
    assert err.value.argument == "scorer"
    with pytest.raises(ArgumentValueError, match=r"scorer must be one of \('separate', 'fused'\), got 'one'"):
        PrefixSparseConfig(scorer="one")


def test_the_decode_kernel_refusal_says_why():
    from types import SimpleNamespace

    from sparsed_backend.attention.policy import decode_kernel_refusal

    assert decode_kernel_refusal(torch.zeros(1, 1, 4, 16), 128) == "it runs on CUDA, the query is on cpu"
    try:
        import triton  # noqa: F401
    except ImportError:
        fake = SimpleNamespace(is_cuda=True, shape=(1, 1, 4, 16))
        assert decode_kernel_refusal(fake, 128) == "Triton is not installed"


def test_bad_configurations_name_the_argument():
    with pytest.raises(ArgumentValueError, match="give exactly one of select and budget") as err:
        PrefixSparseConfig(select=None)
    assert err.value.argument == "select"
    with pytest.raises(ArgumentValueError, match=r"select must be in \(0, 1\], got 1.5"):
        PrefixSparseConfig(select=1.5)
    assert PrefixSparseConfig(select=None, budget=300, block_size=128).blocks_kept(10) == 3
    with pytest.raises(ArgumentTypeError, match="per_kv_head must be a bool"):
        PrefixSparseConfig(per_kv_head=1)
    with pytest.raises(ArgumentTypeError, match="sparse_commit must be a bool, got 'yes'") as err:
        PrefixSparseConfig(sparse_commit="yes")
    assert err.value.argument == "sparse_commit"
    ids = torch.randint(2, 99, (1, 9))
    common = {"gen_length": 4, "block_length": 4, "denoising_steps": 4, "mask_id": 99}
    with pytest.raises(ArgumentValueError, match="needs the model loaded with attn_implementation='sparsed'"):
        blockdiff_generate(sdar_model("sdpa"), ids, sparsed=PrefixSparseConfig(), **common)
    with pytest.raises(ArgumentValueError, match=r"got sparsed=None with 'sparsed'"):
        blockdiff_generate(sdar_model("sparsed"), ids, **common)
    with pytest.raises(ArgumentTypeError, match="sparsed must be a PrefixSparseConfig"):
        blockdiff_generate(sdar_model("sparsed"), ids, sparsed={"select": 0.3}, **common)


def test_a_sparse_step_without_a_selection_is_refused():
    q, k, v, mask = inputs(0, 1, 4, 2, 20, 4, 16, 0)
    state = PrefixSparseState(PrefixSparseConfig(block_size=8), mode="sparse")
    with pytest.raises(ValueError, match="no selection for it: call begin_block"):
        prefix_sparse_attention(q, k, v, mask, 0.25, state, 0)
    with pytest.raises(TypeError, match="4D bool tensor"):
        prefix_sparse_attention(q, k, v, mask.float(), 0.25, state, 0)


@pytest.mark.parametrize("per_kv", [False, True])
def test_local_and_random_baselines_keep_the_same_number_of_blocks(per_kv):
    """The same-density baselines: "local" keeps the k blocks nearest the decoded block, "random" k
    distinct blocks per head drawn from the seeded generator (the same seed, the same blocks)."""
    q, k, v, mask = inputs(2, 2, 4, 2, 100, 4, 16, 3)
    kept = {}
    for pattern, seed in (("topk", 0), ("local", 0), ("random", 0), ("random", 0), ("random", 1)):
        cfg = PrefixSparseConfig(select=0.3, block_size=16, per_kv_head=per_kv, pattern=pattern, seed=seed)
        state = PrefixSparseState(cfg)
        state.begin_block()
        prefix_sparse_attention(q, k, v, mask, 0.25, state, 0)
        kept.setdefault((pattern, seed), []).append(state.layers[0].blocks)
    n = 7  # 100 prefix tokens on a 16-token grid ending at the prefix: 7 blocks, the first short
    shape = (2, 2 if per_kv else 4, 3)  # ceil(0.3 * 7) = 3 blocks per head
    assert all(b[0].shape == shape for b in kept.values())
    assert torch.equal(kept[("local", 0)][0], torch.tensor([4, 5, 6]).expand(shape))
    first, again = kept[("random", 0)]
    assert torch.equal(first, again) and not torch.equal(first, kept[("random", 1)][0])
    assert bool((first.diff(dim=-1) > 0).all()) and int(first.max()) < n  # distinct, ascending, in range
    with pytest.raises(ArgumentValueError, match="pattern must be one of"):
        PrefixSparseConfig(pattern="window")


@pytest.mark.parametrize("per_kv", [False, True])
def test_no_mask_means_every_key_is_attendable(per_kv):
    """attention_mask=None (a block's forward in a batch with no padding) computes what an
    all-True mask computes, in the dense, selecting and sparse modes, with the same selection."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 4, 16, generator=g)
    k, v = (torch.randn(2, 2, 45, 16, generator=g) for _ in range(2))
    full = torch.ones(2, 1, 4, 45, dtype=torch.bool)
    results = []
    for mask in (full, None):
        state = PrefixSparseState(PrefixSparseConfig(select=0.4, block_size=8, per_kv_head=per_kv), padded=False)
        outs = [prefix_sparse_attention(q, k, v, mask, 0.25, state, 0)]  # dense
        state.begin_block()
        outs.append(prefix_sparse_attention(q, k, v, mask, 0.25, state, 0))
        state.mode = "sparse"
        outs.append(prefix_sparse_attention(q, k, v, mask, 0.25, state, 0))
        results.append((outs, state.layers[0].blocks))
    (want, want_blocks), (got, got_blocks) = results
    assert torch.equal(want_blocks, got_blocks)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
