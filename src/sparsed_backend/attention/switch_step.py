"""The switch step: SparseD's one dense pass that also picks every head's key blocks.

At the switch step each layer runs dense attention once more and, from the same query and
key tensors, (1) scores every (query block, key block) pair by its mean softmax probability,
(2) keeps the top ``select`` share of key blocks per query block and head, and (3) builds the
FlexAttention BlockMask that every later step reuses. This module owns that whole pipeline:

    run_switch_step(q, k, v, scaling, config, ...)  -> (dense output, LayerSelection)
    select_layer(q, k, scaling, config, ...)        -> LayerSelection   (no dense output)

The dense pass asks cuDNN for each row's log-sum-exp, so the fused scorer needs one sweep over
K instead of two. Importance runs on the Triton kernel on CUDA and in chunked PyTorch
elsewhere. The key counts per block are computed once and shared by scoring, the density and
the mask.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import _compat
from .._warn import warn_once
from .config import SparseDConfig
from .dense import dense_attention
from .flex_shapes import front_padded_valid, pad_length, padded_lengths
from .masks import block_mask_from_table
from .scoring import block_prob_sums, importance_from_sums, key_block_counts, num_blocks
from .selection import generation_start_block, select_blocks
from .state import LayerSelection

__all__ = ["block_importance", "cudnn_lse_applies", "dense_with_lse", "run_switch_step", "select_layer"]


def cudnn_lse_applies(query: torch.Tensor, key_valid: torch.Tensor | None) -> bool:
    """A fused kernel (cuDNN's, or FlashAttention's) gives the log-sum-exp for unpadded
    fp16/bf16 CUDA inputs."""
    return query.is_cuda and key_valid is None and query.dtype in (torch.float16, torch.bfloat16)


LSE_KERNELS = ("cudnn", "flash")


def dense_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    kernel: str = "cudnn",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense attention plus each query row's log-sum-exp, where the fast kernel gives it.

    Without padding on CUDA in fp16/bf16 this calls a fused attention with log-sum-exp that
    reads grouped K/V heads in place (GQA: no repetition): ``kernel`` "cudnn" (the switch step:
    one key length per generation) or "flash" (FlashAttention-2: no per-shape plan, for callers
    whose key length changes at every call, as block diffusion's prefix does; cuDNN rebuilds its
    plan for each new length, ``benchmarks/results/bench_sdpa_growing_keys.md``). If "flash"
    refuses the inputs it says so once and uses cuDNN. Elsewhere the log-sum-exp is None and the
    scorer computes it itself. If cuDNN refuses the inputs, a warning says so once.

    Returns:
        ((B, Hq, L, D) output, (B, Hq, L) float32 natural-log log-sum-exp or None).
    """
    if kernel not in LSE_KERNELS:
        raise ValueError(f"kernel must be one of {LSE_KERNELS}, got {kernel!r}")
    B, Hq, L, _ = query.shape
    if cudnn_lse_applies(query, key_valid):
        if kernel == "flash":
            try:
                out, lse = _compat.flash_attention_with_lse(query, key, value, scaling)
                return out, lse[..., :L].float()
            except (RuntimeError, TypeError) as err:  # refused inputs, or a private API that moved
                warn_once(
                    "flash-lse",
                    f"sparsed: FlashAttention with log-sum-exp is unavailable ({str(err).splitlines()[0][:120]}); "
                    "cuDNN's attention runs instead (it rebuilds its plan for every new key length)",
                )
        try:
            out, lse = _compat.cudnn_attention_with_lse(query, key, value, scaling)
            return out, lse.reshape(B, Hq, L).float()
        except RuntimeError as err:
            warn_once(
                "cudnn-lse",
                f"sparsed: cuDNN attention with log-sum-exp is unavailable ({str(err).splitlines()[0][:120]}); "
                "the switch step scores blocks with one extra pass over the keys",
            )
    return dense_attention(query, key, value, scaling, key_valid), None


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _uses_triton(query: torch.Tensor) -> bool:
    D = query.shape[-1]
    return query.is_cuda and _triton_available() and D >= 16 and D & (D - 1) == 0


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


@torch.no_grad()
def block_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    block_size: int,
    key_valid: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    q_front: int = 0,
    k_front: int = 0,
) -> torch.Tensor:
    """Mean softmax probability of every (query block, key block) pair, per head.

    CUDA with Triton and a power-of-two head_dim: the fused kernel (one sweep when ``lse`` is
    given, two otherwise). Elsewhere the chunked PyTorch implementation (same math, bounded
    memory; rows normalised by ``lse`` when given, as the kernel does). Key blocks with no
    attendable key get -inf.

    ``q_front`` zero query rows and ``k_front`` absent keys count as standing before the inputs
    (a moved block grid): the kernel reads them as such, the PyTorch path pads copies.

    Args:
        query: (B, Hq, L - q_front, D); key: (B, Hkv, S - k_front, D), Hq % Hkv == 0.
        key_valid: (B, S) bool, True for real keys; None when all keys are real (with a
            ``k_front``, it must mark the front keys False).
        lse: (B, Hq, L) natural-log log-sum-exp of the rows, from the dense pass.
        counts: (B, nKV) attendable keys per key block, when the caller has them already.
    Returns:
        (B, Hq, nQ, nKV) float32.
    """
    B = query.shape[0]
    L, S = query.shape[2] + q_front, key.shape[2] + k_front
    if counts is None:
        counts = key_block_counts(key_valid, S, block_size, B, query.device)
    if _uses_triton(query):
        from .kernels.importance import tile_prob_sums

        tile = min(128, block_size & -block_size)  # the largest power-of-two divisor, <= 128
        sums = tile_prob_sums(query, key, scaling, tile, key_valid, lse, q_front, k_front)
        ratio = block_size // tile
        sums = _fold(_fold(sums, ratio, 2, num_blocks(L, block_size)), ratio, 3, num_blocks(S, block_size))
    else:
        if q_front:
            query = pad_length(query, L, q_front)
        if k_front:
            key = pad_length(key, S, k_front)
        sums = block_prob_sums(query, key, scaling, block_size, key_valid, lse=lse)
    return importance_from_sums(sums, L, counts, block_size)


@torch.no_grad()
def select_layer(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    config: SparseDConfig,
    *,
    gen_start: int | None = None,
    key_valid: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> LayerSelection:
    """Score, select and build one layer's BlockMask (everything but the dense output).

    Args:
        query: (B, Hq, L, D) with RoPE applied; key: (B, Hkv, S, D).
        scaling: the attention's softmax scale.
        config: the SparseD knobs (``select``, ``block_size``, ``pattern``, ...); a
            ``block_size="auto"`` is resolved for the key length here.
        gen_start: index of the first generated token; the key blocks from
            ``generation_start_block`` on get their own top-k (``config.generation_share``).
        key_valid: (B, S) bool padding mask or None.
        lse: (B, Hq, L) log-sum-exp rows of a dense pass over the same inputs, if at hand.
    Returns:
        The layer's LayerSelection (BlockMask, block table, shapes, density).
    """
    B, H, L, _ = query.shape
    S = key.shape[2]
    config = config.for_length(S)  # block_size="auto": this sequence's size
    bs = config.block_size
    real = (L, S)
    front = config.grid_front(gen_start)
    if front:
        # A moved block grid: select as if `front` zero rows stood before position 0 (the
        # scorer reads them as such, Q and K are not copied). The front keys are masked; the
        # front query rows get log-sum-exp +inf, so a scorer given the log-sum-exp adds nothing
        # for them (without it, the PyTorch scorer spreads them evenly over the keys).
        if L != S:
            raise ValueError(
                f"prompt_end_offset moves the block grid of query rows and keys together, so the "
                f"switch step needs q_len == kv_len, got {L} and {S}"
            )
        key_valid = front_padded_valid(key_valid, B, S, front, query.device)
        lse = None if lse is None else F.pad(lse, (front, 0), value=float("inf"))
        gen_start += front
        L, S = L + front, S + front
    counts = key_block_counts(key_valid, S, bs, B, query.device)  # (B, nKV), shared below
    importance = block_importance(query, key, scaling, bs, key_valid, lse, counts, front, front)
    n_kv = importance.shape[-1]
    gen_block = generation_start_block(gen_start, bs, n_kv)
    gen_importance = None
    if gen_block and config.generation_share and config.pattern == "topk":  # gen_block < n_kv
        # The reference ranks the generation key blocks under a softmax over those keys alone.
        # They start at g0 >= block_size > front on the moved grid: real keys from g0 - front.
        g0 = gen_block * bs
        gen_valid = None if key_valid is None else key_valid[:, g0:]
        gen_importance = block_importance(
            query, key[:, :, g0 - front :], scaling, bs, gen_valid, None, counts[:, gen_block:], front, 0
        )
    table = select_blocks(importance, config, gen_block, gen_importance, gen_start)
    attendable = (counts > 0).view(B, 1, 1, -1)
    density = (table & attendable).sum() / (attendable.sum() * H * table.shape[2])
    width = max_row_blocks(config, n_kv, gen_block)
    block_mask = block_mask_from_table(
        table, L, S, bs, key_valid, full_blocks=query.device.type == "cuda", key_counts=counts,
        pad_to=padded_lengths(L, S, bs), max_row_blocks=width,
    )  # fmt: skip
    return LayerSelection(block_mask, table, B, H, *real, density, front=front, max_row_blocks=width)


def max_row_blocks(config: SparseDConfig, n_kv: int, gen_block: int | None) -> int:
    """The most key blocks one query block can keep, known on the host: the top-k share of all
    ``n_kv`` blocks, plus the generation region's own share when it is split off
    (`selection.select_topk`; the rules and ``keep_diagonal`` stay within those counts, and the
    baselines keep no more)."""
    width = config.blocks_kept(n_kv)
    if gen_block and config.generation_share and config.pattern != "local" and gen_block < n_kv:
        width += config.blocks_kept(n_kv - gen_block)
    return min(width, n_kv)


def run_switch_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    config: SparseDConfig,
    *,
    gen_start: int | None = None,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LayerSelection]:
    """The switch step of one layer: the dense output and the selection later steps reuse.

    Shapes as in :func:`select_layer`; value: (B, Hkv, S, D). Returns ((B, Hq, L, D), selection).
    """
    out, lse = dense_with_lse(query, key, value, scaling, key_valid)
    return out, select_layer(query, key, scaling, config, gen_start=gen_start, key_valid=key_valid, lse=lse)
