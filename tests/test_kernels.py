"""The fused Triton block-importance kernel against the fp64 oracle (CUDA only)."""

import pytest
import torch

from sparsed_backend.attention.reference import block_importance_reference
from sparsed_backend.attention.switch_step import block_importance, dense_with_lse

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Triton")


@cuda
@pytest.mark.parametrize(
    ("b", "hq", "hkv", "q_len", "kv_len", "d", "block", "dtype", "pad"),
    [
        (1, 4, 4, 256, 256, 64, 128, torch.bfloat16, False),
        (2, 28, 4, 1000, 1000, 128, 128, torch.bfloat16, True),
        (1, 4, 1, 129, 300, 64, 16, torch.float16, False),
        (2, 4, 2, 513, 513, 128, 64, torch.bfloat16, True),
        (1, 2, 2, 700, 700, 32, 256, torch.float32, True),
        (1, 2, 1, 65, 65, 16, 48, torch.bfloat16, False),
    ],
)
def test_triton_importance_matches_oracle(b, hq, hkv, q_len, kv_len, d, block, dtype, pad):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, q_len, d, device="cuda", generator=g).to(dtype)
    k = (torch.randn(b, hkv, kv_len, d, device="cuda", generator=g) * 1.5).to(dtype)
    valid = None
    if pad:
        valid = torch.ones(b, kv_len, dtype=torch.bool, device="cuda")
        valid[-1, : kv_len // 3] = False
    got = block_importance(q, k, d**-0.5, block, valid)
    want = block_importance_reference(q, k, d**-0.5, block, valid).to(got.device)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    # Products of bf16 inputs accumulate in fp32 inside the kernel (tf32 for fp32 inputs).
    rel = ((got[fin].double() - want[fin]).abs() / want[fin].abs().clamp(min=1e-6)).max().item()
    assert rel < (2e-2 if dtype == torch.float32 else 1e-2), rel


@cuda
@pytest.mark.parametrize("layout", ["model", "strided_last_dim"])
def test_triton_importance_reads_strided_inputs(layout, monkeypatch):
    """The kernels read the models' (B, L, H, D) projections through a transposed view without a
    copy; a strided last dim is copied first. Either way the scores equal a contiguous run."""
    from sparsed_backend.attention.kernels import importance

    g = torch.Generator(device="cuda").manual_seed(3)
    q_bl = torch.randn(2, 300, 4, 64, device="cuda", generator=g).bfloat16()
    k_bl = torch.randn(2, 300, 2, 64, device="cuda", generator=g).bfloat16()
    if layout == "model":
        q, k = q_bl.transpose(1, 2), k_bl.transpose(1, 2)
    else:  # every other element of a wider last dim
        q = torch.randn(2, 4, 300, 128, device="cuda", generator=g).bfloat16()[..., ::2]
        k = torch.randn(2, 2, 300, 128, device="cuda", generator=g).bfloat16()[..., ::2]
    copies = []
    real = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda t, *a, **kw: copies.append(t.shape) or real(t, *a, **kw))
    got = importance.tile_prob_sums(q, k, 0.125, 64)
    monkeypatch.undo()
    assert len(copies) == (0 if layout == "model" else 2)
    want = importance.tile_prob_sums(q.contiguous(), k.contiguous(), 0.125, 64)
    assert torch.equal(got, want)


@cuda
@pytest.mark.parametrize(("q_front", "k_front", "with_lse"), [(37, 37, False), (37, 37, True), (64, 0, False)])
def test_triton_importance_front_rows_equal_padded_copies(q_front, k_front, with_lse):
    """Scoring with ``q_front`` / ``k_front`` (the moved block grid, no copies) equals scoring
    zero-padded copies of Q and K whose front keys are masked."""
    from sparsed_backend.attention.flex_shapes import pad_length
    from sparsed_backend.attention.kernels import importance

    g = torch.Generator(device="cuda").manual_seed(4)
    q = torch.randn(2, 300, 4, 64, device="cuda", generator=g).bfloat16().transpose(1, 2)
    k = torch.randn(2, 300, 2, 64, device="cuda", generator=g).bfloat16().transpose(1, 2)
    L, S = 300 + q_front, 300 + k_front
    valid = torch.ones(2, S, dtype=torch.bool, device="cuda")
    valid[:, :k_front] = False
    valid[1, k_front : k_front + 50] = False  # left padding of the second row as well
    lse = None
    if with_lse:
        lse = torch.randn(2, 4, L, device="cuda", generator=g) + 6.0
        lse[:, :, :q_front] = float("inf")
    got = importance.tile_prob_sums(q, k, 0.125, 64, valid, lse, q_front, k_front)
    want = importance.tile_prob_sums(pad_length(q, L, q_front), pad_length(k, S, k_front), 0.125, 64, valid, lse)
    assert got.shape == want.shape == (2, 4, -(-L // 64), -(-S // 64))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@cuda
@pytest.mark.parametrize(("q_len", "splits"), [(4, None), (4, 1), (4, 7), (20, 3), (300, None)])
@pytest.mark.parametrize("with_lse", [False, True])
def test_triton_importance_splits_the_key_tiles_without_changing_the_sums(q_len, splits, with_lse):
    """A few query rows against many keys (a block-diffusion block) run the key tiles in splits
    (partial log-sum-exps combined; block sums need no combining): the sums equal one sweep per
    row, with fronts, padding and GQA. splits=None picks them from the SM count."""
    from sparsed_backend.attention.kernels import importance

    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(2, 8, q_len, 64, device="cuda", generator=g).bfloat16()
    k = torch.randn(2, 2, 5000, 64, device="cuda", generator=g).bfloat16()
    q_front, k_front = 3, 40
    L, S = q_len + q_front, 5000 + k_front
    valid = torch.ones(2, S, dtype=torch.bool, device="cuda")
    valid[:, :k_front] = False
    valid[1, k_front : k_front + 700] = False
    lse = None
    if with_lse:
        lse = torch.randn(2, 8, L, device="cuda", generator=g) + 9.0
        lse[:, :, :q_front] = float("inf")
    got = importance.tile_prob_sums(q, k, 0.125, 64, valid, lse, q_front, k_front, splits=splits)
    want = importance.tile_prob_sums(q, k, 0.125, 64, valid, lse, q_front, k_front, splits=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    if splits is None and q_len == 4:  # 1 query tile x 16 (batch, head) programs: split
        assert importance.key_splits(16, -(-S // 64), q.device) > 1
    if not with_lse:  # every row's probabilities sum to 1 (the zero front rows' too: uniform)
        torch.testing.assert_close(got.sum((2, 3)), torch.full((2, 8), float(L), device="cuda"))


def _compiled_variants(kernel) -> int:
    """How many variants of a Triton kernel are compiled, over all devices (Triton 3.x keeps one
    (kernel cache, ...) entry per device in ``device_caches``)."""
    caches = getattr(kernel, "device_caches", None)
    if not caches or not all(isinstance(entry[0], dict) for entry in caches.values()):
        pytest.skip("this Triton keeps its compiled kernels elsewhere than device_caches[device][0]")
    return sum(len(entry[0]) for entry in caches.values())


@cuda
def test_the_scorer_stops_compiling_while_a_block_diffusion_prefix_grows():
    """Block by block a block-diffusion prefix grows by 4 keys, which moves the grid's front, the key
    length and the number of key tiles. The scorer's kernels compile for the first blocks and
    then no more: those integers are not specialised on (one compilation per combination of
    their divisibility classes would keep compiling through a long generation)."""
    from sparsed_backend.attention.kernels import importance
    from sparsed_backend.attention.prefix_selection import prefix_block_mass

    g = torch.Generator(device="cuda").manual_seed(0)
    keys = torch.randn(1, 2, 2400, 64, device="cuda", generator=g).bfloat16()
    q = torch.randn(1, 8, 4, 64, device="cuda", generator=g).bfloat16()
    seen = []
    for prefix in range(1000, 1000 + 4 * 64, 4):  # 64 blocks: every front 0..124, 2 more key tiles
        valid = torch.ones(1, prefix + 4, dtype=torch.bool, device="cuda")
        k = keys[:, :, : prefix + 4]
        lse = torch.logsumexp((q.float() @ k.float().repeat_interleave(4, 1).transpose(-1, -2)) * 0.125, -1)
        prefix_block_mass(q, k, 0.125, 128, valid)  # two sweeps: the lse kernel and the block sums
        prefix_block_mass(q, k, 0.125, 128, valid, lse)  # one sweep with a given log-sum-exp
        seen.append((_compiled_variants(importance._lse_kernel), _compiled_variants(importance._block_sum_kernel)))
    assert seen[-1] == seen[1], seen


@cuda
@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (28, 4)])
def test_dense_pass_log_sum_exp_and_one_pass_scoring(hq, hkv):
    """The switch step's dense pass (cuDNN) returns the rows' log-sum-exp; scoring with it in
    one pass equals the two-pass kernel and the oracle."""
    from sparsed_backend.attention.reference import attention_reference

    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, h, 1000, 128, device="cuda", generator=g).bfloat16() for h in (hq, hkv, hkv))
    out, lse = dense_with_lse(q, k, v, 128**-0.5, None)
    assert lse is not None, "cuDNN gave no log-sum-exp on this machine"
    ref = attention_reference(q, k, v, 128**-0.5)
    assert (out.double() - ref).abs().max().item() < 2e-2
    kk = k.double().repeat_interleave(hq // hkv, 1)
    want_lse = torch.logsumexp(q.double() @ kk.transpose(-1, -2) * 128**-0.5, dim=-1)
    assert (lse.double() - want_lse).abs().max().item() < 1e-2
    one = block_importance(q, k, 128**-0.5, 128, None, lse)
    two = block_importance(q, k, 128**-0.5, 128, None)
    torch.testing.assert_close(one, two, rtol=2e-2, atol=1e-6)


@cuda
@pytest.mark.gpu
def test_scoring_past_two_to_the_31_elements():
    """batch * heads * length * head_dim > 2**31: 32-bit offsets would wrap and read out of bounds.

    17 x 1024 heads x 1024 x 128 = 2.28e9 elements per tensor (4.6 GB in bf16), short rows so the
    compute stays small; the last batch entry, whose offsets are past 2**31, is checked against
    fp64 oracle.
    """
    b, h, n, d = 17, 1024, 1024, 128
    assert b * h * n * d > 2**31
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    got = block_importance(q, k, d**-0.5, 128, None)
    want = block_importance_reference(q[-1:, -8:], k[-1:, -8:], d**-0.5, 128, None).float().to(got.device)
    torch.testing.assert_close(got[-1:, -8:], want, rtol=2e-2, atol=1e-6)
    del q, k
    torch.cuda.empty_cache()


def _decode_inputs(q_len: int, prefix: int, pad: bool):
    """A block of ``q_len`` bf16 queries over a ``prefix`` on SDAR-8B heads (32 / 8, head_dim 128),
    K/V storage 100 positions longer than prefix + block, row 1 left padded by a third of the
    prefix when ``pad``; the prefix grid of 128 has a short first block."""
    g = torch.Generator(device="cuda").manual_seed(q_len + prefix)
    b, hq, hkv, d, bs = 2, 32, 8, 128, 128
    s = prefix + q_len
    q = torch.randn(b, hq, q_len, d, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(b, hkv, s + 100, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    valid = torch.ones(b, s, dtype=torch.bool, device="cuda")
    if pad:
        valid[1, : prefix // 3] = False
    front = (-prefix) % bs
    return g, q, k, v, valid, front, (prefix + front) // bs


@cuda
@pytest.mark.parametrize("per_kv", [True, False])
@pytest.mark.parametrize(("q_len", "prefix", "pad", "splits"), [(4, 8187, False, None), (32, 5000, True, None),
                                                                 (4, 300, True, 1), (7, 0, False, None)])  # fmt: skip
def test_sparse_decode_kernel_equals_the_gather(per_kv, q_len, prefix, pad, splits):
    """The block-sparse decode kernel (kept blocks read in place, split over programs) gives
    the gather + SDPA step's output (bf16, SDAR-8B heads, prefix grids with a short first
    block, left padding, the whole cache storage passed as K/V)."""
    from sparsed_backend.attention.kernels.sparse_decode import decode_offsets, sparse_decode_attention
    from sparsed_backend.attention.prefix_selection import (
        PrefixSelection,
        PrefixSparseConfig,
        gathered_attention,
        select_prefix_blocks,
        sparse_gather,
    )  # fmt: skip

    g, q, k, v, valid, front, n = _decode_inputs(q_len, prefix, pad)
    b, hq, hkv, d, bs, s = 2, 32, 8, 128, 128, prefix + q_len
    cfg = PrefixSparseConfig(select=0.3, block_size=bs, per_kv_head=per_kv)
    mass = torch.rand(b, hq, n, device="cuda", generator=g)
    blocks = select_prefix_blocks(mass, cfg, hkv) if n else torch.zeros(b, hkv if per_kv else hq, 0, device="cuda",
                                                                          dtype=torch.long)  # fmt: skip
    sel = PrefixSelection(blocks, prefix, front, n, bs)
    _, index, mask = sparse_gather(sel, q_len, valid, hq, hkv)
    want = gathered_attention(q, k[:, :, :s], v[:, :, :s], index, mask, d**-0.5)
    offsets = decode_offsets(prefix, front, s, q.device)
    got = sparse_decode_attention(q, k, v, blocks, offsets, bs, d**-0.5, valid if pad else None, splits)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@cuda
@pytest.mark.parametrize("per_kv", [True, False])
@pytest.mark.parametrize(("q_len", "prefix", "pad"), [(4, 8187, False), (32, 5000, True), (7, 300, False)])
def test_decode_kernel_with_every_block_is_dense_attention_and_its_block_mass(per_kv, q_len, prefix, pad):
    """Listing every prefix block, the decode kernel with one program per block gives dense
    attention and the probability mass a selecting step ranks (`prefix_block_mass`, summed over
    a KV head's query heads with per_kv), in one sweep (bf16 inputs, SDAR-8B heads)."""
    from sparsed_backend.attention.kernels.sparse_decode import decode_attention_with_block_mass, decode_offsets
    from sparsed_backend.attention.prefix_selection import prefix_block_mass

    g, q, k, v, valid, front, n = _decode_inputs(q_len, prefix, pad)
    b, hq, hkv, d, bs, s = 2, 32, 8, 128, 128, prefix + q_len
    heads = hkv if per_kv else hq
    blocks = torch.arange(n, device="cuda").expand(b, heads, n).contiguous()
    offsets = decode_offsets(prefix, front, s, q.device)
    out, mass = decode_attention_with_block_mass(q, k, v, blocks, offsets, bs, d**-0.5, valid if pad else None)
    qf, kf, vf = q.float(), k[:, :, :s].float(), v[:, :, :s].float()
    want = torch.nn.functional.scaled_dot_product_attention(
        qf, kf, vf, attn_mask=valid[:, None, None, :], scale=d**-0.5, enable_gqa=True
    )
    want_mass, _ = prefix_block_mass(qf, kf.repeat_interleave(hq // hkv, 1), d**-0.5, bs, valid)
    if per_kv:
        want_mass = want_mass.view(b, hkv, hq // hkv, n).sum(2)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(mass, want_mass, rtol=1e-2, atol=1e-3)


@cuda
@pytest.mark.parametrize(("q_len", "key_len", "pad", "splits"), [(4, 8191, False, None), (4, 131, True, None),
                                                                  (32, 5000, True, 7), (4, 3, False, 40)])  # fmt: skip
def test_dense_decode_kernel_is_dense_attention(q_len, key_len, pad, splits):
    """The split-KV dense decode kernel (the key range shared out over programs, its length read
    from the device) gives SDPA's attention over keys [0, key_len) of a longer storage (bf16,
    SDAR-8B heads, left padding, more splits than key tiles)."""
    from sparsed_backend.attention.kernels.sparse_decode import decode_offsets, dense_decode_attention

    g = torch.Generator(device="cuda").manual_seed(5)
    b, hq, hkv, d = 2, 32, 8, 128
    q = torch.randn(b, hq, q_len, d, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(b, hkv, key_len + 300, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    valid = torch.ones(b, key_len + 300, dtype=torch.bool, device="cuda")
    if pad:
        valid[1, : key_len // 3] = False
    offsets = decode_offsets(0, 0, key_len, q.device)
    got = dense_decode_attention(q, k, v, offsets, d**-0.5, valid if pad else None, splits)
    s = key_len
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k[:, :, :s].float(), v[:, :, :s].float(), attn_mask=valid[:, None, None, :s], scale=d**-0.5,
        enable_gqa=True,
    )  # fmt: skip
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
