"""The shapes compiled FlexAttention sees: a bounded set per process, by design.

FlexAttention runs compiled, and a static compile specialises on every length: each new
(query length, key length) would compile a graph (2-8 s on an H200, 5-20 s on 2 CPU cores),
and an evaluation over prompts of many lengths would grow without bound. So every sparse call
runs on *bucket* lengths: queries and keys are zero-padded up to a geometric grid of whole
blocks (:func:`bucket_length`: at most 1/8 longer, 8 grid points per octave). The BlockMask is
built for the padded lengths (`masks.block_mask_from_table(pad_to=)`): padded keys are masked
out and padded query rows attend to nothing, and their output is dropped, so the result is the
unpadded one.

Measured on one H200 (benchmarks/results/bench_shapes.md, LLaDA-8B attention shape, bf16,
select 0.3): a static graph at 64k runs 46.3 ms, the same call compiled with dynamic shapes
64.9 ms (1.40x slower; 1.39x at 16k), so dynamic shapes lose; bucketing costs nothing on the
grid and 3.4% of the attention call at 65,792 tokens padded to 73,728 (the padded blocks are
never visited; the copies remain), +1.0% per sparse step of the whole 32-layer model
(bench_e2e_shapes_64k.md). Dynamic shapes also fail to compile on CPU (torch 2.13,
CppCompileError).

:class:`CompileGuard` records the signature of every compiled call, so the error that ends a
runaway (a bug: the grid cannot produce that many shapes) names what was compiled.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

__all__ = [
    "CompileGuard",
    "bucket_length",
    "exact_lengths",
    "front_padded_valid",
    "pad_length",
    "pad_to_mask",
    "padded_lengths",
]

_exact = False  # set by exact_lengths() for measurements only


def bucket_length(n: int, block_size: int) -> int:
    """The smallest length >= ``n`` on the bucket grid: whole blocks, 8 grid points per octave.

    A length of ``b`` blocks is kept for ``b <= 15``; above, ``b`` rounds up to a multiple of
    ``2 ** (floor(log2(b)) - 3)`` blocks, so the padding is less than 1/8 of the length.
    """
    if n <= 0 or block_size <= 0:
        raise ValueError(f"bucket_length needs n > 0 and block_size > 0, got n={n}, block_size={block_size}")
    blocks = -(-n // block_size)
    granule = 1 << max(blocks.bit_length() - 4, 0)  # 2 ** (floor(log2(blocks)) - 3), at least 1
    return -(-blocks // granule) * granule * block_size


def padded_lengths(q_len: int, kv_len: int, block_size: int) -> tuple[int, int]:
    """The (query, key) lengths the compiled call runs for real lengths (q_len, kv_len)."""
    if _exact:
        return q_len, kv_len
    return bucket_length(q_len, block_size), bucket_length(kv_len, block_size)


@contextlib.contextmanager
def exact_lengths():
    """Masks built inside run at the real lengths: one static graph per shape, the policy
    before bucketing. For benchmarks that measure what bucketing costs; not for users (an
    evaluation of many lengths would compile without bound)."""
    global _exact
    saved, _exact = _exact, True
    try:
        yield
    finally:
        _exact = saved


def pad_to_mask(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: BlockMask,
    q_front: int = 0,
    kv_front: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-pad (B, H, L, D) queries and (B, Hkv, S, D) keys/values to the mask's lengths.

    ``q_front`` and ``kv_front`` zero rows go before the first query and the first key (a moved
    block grid, `SparseDConfig.prompt_end_offset`), the rest after the last row. Inputs already
    that long are returned as they are (no copy).
    """
    q_pad, kv_pad = block_mask.seq_lengths
    L, S = query.shape[2], key.shape[2]
    if q_pad < L + q_front or kv_pad < S + kv_front:
        raise ValueError(
            f"the BlockMask was built for (q_len, kv_len) = {(q_pad, kv_pad)}, shorter than the inputs' "
            f"{(L, S)} after {(q_front, kv_front)} rows of front padding"
        )
    if q_pad != L:
        query = pad_length(query, q_pad, q_front)
    if kv_pad != S:
        key, value = pad_length(key, kv_pad, kv_front), pad_length(value, kv_pad, kv_front)
    return query, key, value


def pad_length(t: torch.Tensor, length: int, front: int = 0) -> torch.Tensor:
    """Zero-pad dim 2 of ``t`` to ``length`` (``front`` zeros first) in ``t``'s own memory layout.

    The models hand attention (B, L, H, D) tensors transposed to (B, H, L, D); a padded copy
    in that same layout keeps the compiled graph's stride guards of the unpadded inputs (a
    contiguous copy would compile a second graph for every bucket that a length also hits
    exactly).
    """
    order = sorted(range(t.dim()), key=lambda d: (t.stride(d), t.shape[d]), reverse=True)
    shape = list(t.shape)
    shape[2] = length
    out = t.new_zeros([shape[d] for d in order]).permute([order.index(d) for d in range(t.dim())])
    out[:, :, front : front + t.shape[2]] = t
    return out


def front_padded_valid(
    key_valid: torch.Tensor | None, batch: int, kv_len: int, front: int, device: torch.device
) -> torch.Tensor:
    """(B, front + kv_len) bool key mask of keys moved ``front`` rows onto a moved block grid:
    the front rows are padding, the rest ``key_valid`` (all real when None)."""
    valid = torch.ones(batch, kv_len, dtype=torch.bool, device=device) if key_valid is None else key_valid
    return F.pad(valid, (front, 0), value=False)


class CompileGuard:
    """Counts the distinct signatures the compiled call has seen, and names them on failure.

    A signature is everything a static compile specialises on: batch, heads, padded lengths,
    head_dim, dtype, device and the mask_mod (named for its block size).

    Why 128: one generation compiles one shape for its full forwards, plus one per bucketed
    window length with a K/V cache; an evaluation whose prompts spread over 1k-128k tokens at
    block 128 meets at most 64 bucket lengths (8 exact block counts + 8 per octave over 7
    octaves), and its last, smaller batch at most doubles that. Only a bug (a length that
    escapes the grid) goes past it.
    """

    limit = 128

    def __init__(self) -> None:
        self.seen: dict[tuple, None] = {}

    @staticmethod
    def signature(query: torch.Tensor, key: torch.Tensor, block_mask: BlockMask) -> tuple:
        B, Hq, L, D = query.shape
        return (B, Hq, key.shape[1], L, key.shape[2], D, str(query.dtype), query.device.type,
                getattr(block_mask.mask_mod, "__name__", "mask_mod"))  # fmt: skip

    def note(self, query: torch.Tensor, key: torch.Tensor, block_mask: BlockMask) -> None:
        self.seen.setdefault(self.signature(query, key, block_mask))

    def describe(self, last: int = 12) -> str:
        shapes = list(self.seen)[-last:]
        rows = "; ".join(
            f"B={b} H={h}/{hkv} L={q} S={s} D={d} {dtype} {dev} {kind}"
            for b, h, hkv, q, s, d, dtype, dev, kind in shapes
        )
        return f"{len(self.seen)} distinct signatures, the last {len(shapes)}: {rows}"
