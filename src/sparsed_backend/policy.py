"""Per-device choices of the fast path: dense kernel, flex kernel options, when to stay dense.

Every rule here is a measurement on a named device, recorded with its command under
benchmarks/results/; where nothing was measured the rule is the neutral one and says so.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask

from . import selection
from ._warn import warn_once
from .config import SparseDConfig

__all__ = ["dense_kernels", "flex_kernel_options", "min_sparse_len", "block_importance"]

_HAS_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters
# Fastest first. cuDNN beat FlashAttention-2 by 1.67x on an H100 (DESIGN.md section 6).
_CUDA_ORDER = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def dense_kernels(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None):
    """Context that steers SDPA to the fastest dense kernel for these inputs.

    On CUDA the priority is cuDNN, then FlashAttention-2, then memory-efficient, then math:
    SDPA takes the first that supports the inputs. On CPU SDPA's own choice is used.
    """
    if query.is_cuda and _HAS_PRIORITY:
        return sdpa_kernel(_CUDA_ORDER, set_priority=True)
    return contextlib.nullcontext()


def dense_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None,
    dense_fn,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense attention plus each query row's log-sum-exp, when the fast kernel can give it.

    The switch step needs the softmax normaliser of every row to score blocks. cuDNN's SDPA
    kernel returns it for free with the output, which saves the scoring kernel a whole pass.
    Without padding on CUDA in fp16/bf16 we call that kernel (K/V repeated for GQA, once per
    generation); otherwise the log-sum-exp is None and the scoring kernel computes it.

    Returns:
        ((B, Hq, L, D) output, (B, Hq, L) float32 natural-log log-sum-exp or None).
    """
    B, Hq, L, _ = query.shape
    if query.is_cuda and key_valid is None and query.dtype in (torch.float16, torch.bfloat16):
        if key.shape[1] != Hq:
            rep = Hq // key.shape[1]
            key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        try:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                query, key, value, None, True, 0.0, False, False, scale=scaling
            )[:2]
            return out, lse.reshape(B, Hq, L).float()
        except RuntimeError as err:
            warn_once(
                "cudnn-lse",
                f"sparsed: cuDNN attention with log-sum-exp is unavailable ({str(err).splitlines()[0][:120]}); "
                "the switch step scores blocks with one extra pass",
            )
    return dense_fn(query, key, value, scaling, key_valid), None


# Measured on an H100 (benchmarks/results/tune_64k.md, LLaDA shape, N = 65536, select 0.3):
# defaults 51.4 ms; these 45.0 ms; the same with 3 stages runs out of shared memory.
_SM90_D128 = {
    "BLOCK_M": 128,
    "BLOCK_N": 128,
    "num_warps": 8,
    "num_stages": 2,
    "USE_TMA": True,
    # Every query row keeps >= 1 block holding >= 1 attendable key (selection guarantees it).
    "ROWS_GUARANTEED_SAFE": True,
}


def _pow2_divisor(block: int, cap: int) -> int:
    tile = cap
    while block % tile:
        tile //= 2
    return tile


def flex_kernel_options(query: torch.Tensor, block_mask: BlockMask) -> dict | None:
    """FlexAttention kernel options for this shape (None: FlexAttention's defaults).

    FlexAttention's CUDA tiles must divide the BlockMask's block size; its defaults are up to
    128 wide, so blocks that are not multiples of 128 get tiles that divide them (seen on the
    H100: block_size 32 failed to compile with the defaults).
    """
    if not query.is_cuda:
        return None
    q_block, kv_block = block_mask.BLOCK_SIZE
    if q_block % 128 or kv_block % 128:
        return {"BLOCK_M": _pow2_divisor(q_block, 64), "BLOCK_N": _pow2_divisor(kv_block, 64), "num_stages": 2}
    fast = query.shape[-1] == 128 and query.dtype in (torch.float16, torch.bfloat16)
    if fast and torch.cuda.get_device_capability(query.device) == (9, 0):
        return dict(_SM90_D128)
    return None


# LLaDA-8B shape, 32 layers, select 0.3, H100 (benchmarks/results/bench_e2e.md): a sparse
# step is 1.02x faster than a cuDNN dense step at 2048 tokens and 1.05x at 4096. Shorter
# lengths were not measured, so they stay dense rather than risk a slowdown.
_CUDA_MIN_SPARSE_LEN = 2048


def min_sparse_len(config: SparseDConfig, device: torch.device) -> int:
    """Shortest kv length at which sparse steps are used; shorter sequences stay dense.

    ``config.min_sparse_len`` wins when set. Otherwise CUDA uses the measured 2048; other
    devices have no measured rule and always go sparse (CPU runs are for correctness).
    """
    if config.min_sparse_len is not None:
        return config.min_sparse_len
    return _CUDA_MIN_SPARSE_LEN if device.type == "cuda" else 0


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _tile(block_size: int) -> int:
    """Largest power-of-two tile <= 128 that divides the block size (block_size % 16 == 0)."""
    return _pow2_divisor(block_size, 128)


def _fold(sums: torch.Tensor, ratio: int, dim: int, n_blocks: int) -> torch.Tensor:
    """Sum groups of ``ratio`` tiles along ``dim`` into ``n_blocks`` blocks (zero-padding the tail)."""
    if ratio == 1:
        return sums
    pad = n_blocks * ratio - sums.shape[dim]
    widths = [0, 0] * (sums.dim() - 1 - dim % sums.dim()) + [0, pad]
    sums = F.pad(sums, widths)
    shape = list(sums.shape)
    shape[dim : dim + 1] = [n_blocks, ratio]
    return sums.view(shape).sum(dim + 1)


def block_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    block_size: int,
    key_valid: torch.Tensor | None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block importance on the fastest implementation for the device. (B, Hq, nQ, nKV) fp32.

    CUDA with Triton and a power-of-two head_dim: the fused kernel (one pass when ``lse``,
    the rows' natural-log log-sum-exp, is given; two otherwise). Elsewhere the chunked
    PyTorch implementation (same math, bounded memory; ``lse`` unused).
    """
    D = query.shape[-1]
    if query.is_cuda and _triton_available() and D >= 16 and D & (D - 1) == 0:
        from .kernels.importance import block_prob_sums

        L, S = query.shape[2], key.shape[2]
        tile = _tile(block_size)
        sums = block_prob_sums(query, key, scaling, tile, key_valid, lse)
        n_q, n_kv = -(-L // block_size), -(-S // block_size)
        sums = _fold(_fold(sums, block_size // tile, 2, n_q), block_size // tile, 3, n_kv)
        counts = selection.key_block_counts(key_valid, S, block_size, query.shape[0], query.device)
        return selection.importance_from_sums(sums, L, counts, block_size)
    return selection.block_importance(query, key, scaling, block_size, key_valid)
