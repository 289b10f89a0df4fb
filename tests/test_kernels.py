"""The fused Triton block-importance kernel against the fp64 oracle (CUDA only)."""

import pytest
import torch

from sparsed_backend.reference import block_importance_reference
from sparsed_backend.switch_step import block_importance, dense_with_lse

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
@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (28, 4)])
def test_dense_pass_log_sum_exp_and_one_pass_scoring(hq, hkv):
    """The switch step's dense pass (cuDNN) returns the rows' log-sum-exp; scoring with it in
    one pass equals the two-pass kernel and the oracle."""
    from sparsed_backend.reference import attention_reference

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
