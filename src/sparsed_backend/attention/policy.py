"""Measured per-device choices of the fast path: dense kernel order, flex kernel options, when to stay dense.

Every rule here is a measurement on a named device, recorded with its command under
benchmarks/results/; where nothing was measured the rule is the neutral one and says so.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask

from .._compat import SDPA_HAS_PRIORITY
from .config import SparseDConfig

__all__ = ["decode_kernels", "dense_kernels", "flex_kernel_options", "min_sparse_len"]

# Fastest first. On an H100 at 64k tokens (LLaDA shape, bf16) cuDNN took 123.1 ms and
# FlashAttention-2 199.9 ms (benchmarks/results/bench_attention.md).
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
    if query.is_cuda and SDPA_HAS_PRIORITY:
        return sdpa_kernel(_CUDA_ORDER, set_priority=True)
    return contextlib.nullcontext()


# A few query rows against a key length that changes at every block (block diffusion). On an
# H200 (benchmarks/results/bench_sdpa_growing_keys.md: 4 queries, 32/8 heads, 32k keys, bf16):
# FlashAttention-2 without a mask 0.12-0.13 ms per call; cuDNN 0.378 ms at a fixed length and
# 8.2 ms per call when the length grows every 5 calls (its plan is rebuilt per length).
_DECODE_ORDER = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def decode_kernels(query: torch.Tensor):
    """Context that steers SDPA for block diffusion's denoising steps and commits: on CUDA
    FlashAttention-2 first (it takes no mask; a masked call goes on to cuDNN), then cuDNN,
    memory-efficient and math. On CPU SDPA's own choice is used."""
    if query.is_cuda and SDPA_HAS_PRIORITY:
        return sdpa_kernel(_DECODE_ORDER, set_priority=True)
    return contextlib.nullcontext()


def decode_kernel_refusal(query: torch.Tensor, block_size: int) -> str | None:
    """Why the block-sparse decode kernel (`kernels.sparse_decode`) cannot attend ``query`` over
    prefix blocks of ``block_size`` tokens; None when it can (CUDA with Triton, or any device
    under Triton's interpreter, ``TRITON_INTERPRET=1``; a power-of-two head_dim >= 16, blocks
    of 16 or 32 tokens or a multiple of 64)."""
    if not query.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return f"it runs on CUDA, the query is on {query.device.type}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    d = query.shape[-1]
    if d < 16 or d & (d - 1):
        return f"head_dim {d} is not a power of two >= 16"
    return decode_block_size_refusal(block_size)


# Query rows per program of the decode kernels (`kernels.sparse_decode`, 4 warps), the GQA
# group's heads counted. Not measured; a bound from the register file: at head_dim 128 the fp32
# accumulator of 64 rows takes 64 of a thread's 255 registers, and 128 rows would take 128 beside
# the query tile and the scores, which spills. Cache windows with more rows use FlexAttention /
# SDPA; the dense kernel gives each query head its own program when a group's rows pass it.
DECODE_KERNEL_ROWS = 64


def decode_block_size_refusal(block_size: int) -> str | None:
    """Why the decode kernel cannot tile prefix blocks of ``block_size`` tokens (its key tile is
    min(block_size, 64), a power of two >= 16 dividing the block); None when it can."""
    tile = min(block_size, 64)
    if tile < 16 or tile & (tile - 1) or block_size % tile:
        return f"block_size {block_size} is neither a multiple of 64 nor 16 or 32"
    return None


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
        # The largest power-of-two divisor of each block size, at most 64.
        return {"BLOCK_M": min(64, q_block & -q_block), "BLOCK_N": min(64, kv_block & -kv_block), "num_stages": 2}
    fast = query.shape[-1] == 128 and query.dtype in (torch.float16, torch.bfloat16)
    if fast and torch.cuda.get_device_capability(query.device) == (9, 0):
        return dict(_SM90_D128)
    return None


# LLaDA-8B shape, 32 layers, select 0.3, H100: a sparse step is 1.05x faster than a cuDNN dense
# step at 4096 tokens (benchmarks/results/bench_e2e.md). An earlier run of the same script
# measured 1.02x at 2048; its table is no longer in benchmarks/results, so 2048 rests on that
# run alone. Shorter lengths were not measured, so they stay dense rather than risk a slowdown.
_CUDA_MIN_SPARSE_LEN = 2048


def min_sparse_len(config: SparseDConfig, device: torch.device) -> int:
    """Shortest kv length at which sparse steps are used; shorter sequences stay dense.

    ``config.min_sparse_len`` wins when set. Otherwise CUDA uses the measured 2048; other
    devices have no measured rule and always go sparse (CPU runs are for correctness).
    """
    if config.min_sparse_len is not None:
        return config.min_sparse_len
    return _CUDA_MIN_SPARSE_LEN if device.type == "cuda" else 0
