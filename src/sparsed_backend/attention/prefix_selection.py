"""Sparse prefix selection for block diffusion: per block, each head keeps its top prefix K/V blocks.

A block-diffusion model (SDAR on native Qwen3) denoises one block of a few tokens over several
steps against the committed prefix's K/V cache. At the block's first denoising step this module
runs exact attention and measures, per head, how much softmax probability mass the block's
queries put on each prefix block of ``block_size`` tokens; it keeps the heaviest ones (a
``select`` share of the prefix blocks, or a ``budget`` of prefix tokens). The block's later
denoising steps attend only to those prefix blocks plus the block itself. Prefill and commit
forwards stay exact, so the cache holds the dense model's K/V (unless ``sparse_commit``, where a
block's commit reads what its sparse steps read). (The idea follows MAGE,
arXiv 2602.14209, and LoSA, arXiv 2604.12056; this is the project's own implementation.)

The prefix grid ends where the prefix ends: the block being denoised starts a grid block of its
own, and the prefix's first grid block is the short one (``front`` absent keys in front of
position 0). Scoring reuses the switch step's block scorer (`switch_step.block_importance`: the
fused Triton kernel on CUDA, which reads the absent front keys without copying K; chunked
PyTorch elsewhere).

Sparse steps gather the kept positions' K/V (one gather per step) and call SDPA on them: for a
block of 4-64 queries that is a few thousand keys, with no compilation whatever the prefix
length. Keeping every block gathers exactly the dense key sequence in its order.

    state = PrefixSparseState(PrefixSparseConfig(select=0.1))
    blockdiff_generate(model, ids, ..., prefix_state=state)   # model loaded with "sparsed"
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from .._validate import ArgumentTypeError, ArgumentValueError, check_int, check_number
from .policy import decode_kernel_refusal, decode_kernels
from .scoring import key_block_counts
from .switch_step import block_importance, cudnn_lse_applies, dense_with_lse

__all__ = [
    "PrefixSparseConfig",
    "PrefixSparseState",
    "PrefixSelection",
    "fused_score",
    "prefix_block_mass",
    "prefix_grid",
    "gathered_attention",
    "prefix_sparse_attention",
    "select_prefix_blocks",
    "sparse_gather",
]

PrefixMode = Literal["dense", "score", "sparse"]
PREFIX_MODES = ("dense", "score", "sparse")
PREFIX_PATTERNS = ("topk", "local", "random")
PREFIX_SCORERS = ("separate", "fused")


@dataclass(frozen=True)
class PrefixSparseConfig:
    """How many prefix blocks each head keeps for a block's later denoising steps.

    Args:
        select: share of the prefix blocks kept per head, in (0, 1]; ``ceil(select * n)``, at
            least one. Give this or ``budget``.
        budget: prefix tokens kept per head (``ceil(budget / block_size)`` blocks).
        block_size: prefix tokens per selectable block.
        per_kv_head: one selection per key/value head (the mass of its query heads summed), so
            a GQA group shares its blocks; False: one per query head.
        pattern: "topk" (the heaviest blocks); the same-density baselines "local" (the blocks
            nearest the decoded block) and "random" (blocks drawn per head and block from a
            generator seeded with ``seed``).
        seed: the "random" pattern's seed.
        select_every: a block's first step selects afresh every ``select_every`` blocks (1:
            every block, as MAGE and LoSA do). The blocks in between skip the selecting step:
            all their steps are sparse and read the last selection's kept blocks plus every
            position committed since it (the tail) and the block itself. Not in MAGE or LoSA;
            its fidelity and speed are measured in benchmarks/results where named.
        scorer: how a block's first step gets its attention and the mass it ranks. "separate"
            (the default): the attention (FlashAttention-2 with log-sum-exp on CUDA), then the
            block scorer's sweep over the prefix (`prefix_block_mass`). "fused": the block-sparse
            decode kernel with every prefix block listed gives both in one sweep
            (`kernels.sparse_decode.decode_attention_with_block_mass`); CUDA with Triton only
            (elsewhere it raises).
        sparse_commit: the commit of a finished block (the forward that stores its K/V for
            every later block) attends like the block's sparse steps, to the kept prefix blocks
            and the block, instead of exactly. Every forward after the prefill is then sparse
            or selecting, but the stored K/V of the decoded blocks (the prompt's last partial
            block among them) are approximate from the second layer on. Not in MAGE or LoSA;
            False (the default) keeps every stored K/V exact.
    """

    select: float | None = 0.3
    budget: int | None = None
    block_size: int = 128
    per_kv_head: bool = False
    pattern: str = "topk"
    seed: int = 0
    select_every: int = 1
    scorer: str = "separate"
    sparse_commit: bool = False

    def __post_init__(self) -> None:
        if (self.select is None) == (self.budget is None):
            raise ArgumentValueError(
                "select", f"give exactly one of select and budget, got select={self.select!r}, budget={self.budget!r}"
            )
        if self.select is not None:
            check_number("select", self.select)
            if not 0.0 < float(self.select) <= 1.0:
                raise ArgumentValueError("select", f"select must be in (0, 1], got {self.select!r}")
        if self.budget is not None:
            check_int("budget", self.budget, 1)
        check_int("block_size", self.block_size, 1)
        if not isinstance(self.per_kv_head, bool):
            raise ArgumentTypeError("per_kv_head", f"per_kv_head must be a bool, got {self.per_kv_head!r}")
        if self.pattern not in PREFIX_PATTERNS:
            raise ArgumentValueError("pattern", f"pattern must be one of {PREFIX_PATTERNS}, got {self.pattern!r}")
        check_int("seed", self.seed, 0)
        check_int("select_every", self.select_every, 1)
        if self.scorer not in PREFIX_SCORERS:
            raise ArgumentValueError("scorer", f"scorer must be one of {PREFIX_SCORERS}, got {self.scorer!r}")
        if not isinstance(self.sparse_commit, bool):
            raise ArgumentTypeError("sparse_commit", f"sparse_commit must be a bool, got {self.sparse_commit!r}")

    def blocks_kept(self, n_blocks: int) -> int:
        """Prefix blocks each head keeps out of ``n_blocks`` (at least one, at most all)."""
        if n_blocks <= 0:
            return 0
        want = math.ceil(self.select * n_blocks) if self.select is not None else -(-self.budget // self.block_size)
        return max(1, min(n_blocks, want))


@dataclass
class PrefixSelection:
    """One layer's kept prefix blocks for the block being denoised.

    Attributes:
        blocks: (B, H, k) int64 kept grid blocks per head, ascending (H: query heads, or
            key/value heads with ``per_kv_head``).
        prefix_len: committed prefix positions the selection covers.
        front: absent positions before position 0 on the grid (the short first block).
        n_blocks: prefix grid blocks.
        block_size: prefix tokens per grid block.
        gather: what the block's sparse steps read, built by the first of them and reused by
            the rest (the kept blocks and the mask do not change between a block's steps):
            ((block length, key length), the (batch, head, position) index of the kept keys,
            each broadcasting to (B, H, K), and the (B, Hq, 1, K) bool mask of the attendable
            ones).
    """

    blocks: torch.Tensor
    prefix_len: int
    front: int
    n_blocks: int
    block_size: int
    gather: tuple[tuple[int, int], tuple[torch.Tensor, ...], torch.Tensor] | None = None

    @property
    def density(self) -> float:
        """Kept share of the prefix blocks."""
        return self.blocks.shape[-1] / self.n_blocks if self.n_blocks else 1.0


@dataclass
class PrefixSparseState:
    """What the block-diffusion sampler hands every forward (``prefix_state=``): the mode of the
    forward and each layer's selection for the current block.

    The sampler sets ``mode``: "dense" for the prefill and the commits (exact attention, so the
    cache holds the dense K/V), "score" for a block's first denoising step (exact attention plus
    selection; :meth:`begin_block` clears the old selections first, or with ``select_every`` > 1
    keeps them and makes the step "sparse" between selections), "sparse" for its other steps
    (and for its commit with ``sparse_commit``).

    ``padded`` says whether any key may be unattendable in a denoising step. The sampler sets it
    False when no row is left padded; the selecting step then runs cuDNN's attention without
    the mask, which also returns the rows' log-sum-exp, so the block scorer needs one sweep over
    the prefix instead of two. True (the default) always applies the mask.
    """

    config: PrefixSparseConfig
    mode: PrefixMode = "dense"
    padded: bool = True
    layers: dict[int, PrefixSelection] = field(default_factory=dict)
    selections: int = 0  # selections made so far
    blocks_begun: int = 0  # begin_block calls so far
    densities: list[float] = field(default_factory=list)  # each selection's kept share (layer mean)
    generator: torch.Generator | None = None  # the "random" pattern's, made on first use

    def __post_init__(self) -> None:
        if not isinstance(self.config, PrefixSparseConfig):
            raise ArgumentTypeError("config", f"config must be a PrefixSparseConfig, got {type(self.config).__name__}")

    def begin_block(self) -> None:
        """The next forward is a block's first denoising step: it selects afresh (mode "score")
        every ``config.select_every`` blocks; in between it is a sparse step on the last
        selection (mode "sparse")."""
        self.blocks_begun += 1
        if self.layers and (self.blocks_begun - 1) % self.config.select_every:
            self.mode = "sparse"
            return
        if self.layers:
            self.densities.append(sum(s.density for s in self.layers.values()) / len(self.layers))
        self.layers.clear()
        self.mode = "score"
        self.selections += 1

    def density(self) -> float | None:
        """Mean kept share of prefix blocks over all selections so far (None before any)."""
        shares = self.densities + (
            [sum(s.density for s in self.layers.values()) / len(self.layers)] if self.layers else []
        )
        return sum(shares) / len(shares) if shares else None


def prefix_grid(prefix_len: int, block_size: int) -> tuple[int, int]:
    """The prefix's grid of ``block_size`` blocks, ending where the prefix ends: (front, the
    absent positions before position 0 in its short first block; the number of blocks)."""
    front = (-prefix_len) % block_size
    return front, (prefix_len + front) // block_size


@torch.no_grad()
def prefix_block_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    block_size: int,
    key_valid: torch.Tensor,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Softmax probability mass the queries put on each prefix block, per query head.

    The softmax runs over every attendable key (prefix and the block itself); the prefix is the
    first ``S - L`` keys, on a grid of ``block_size`` that ends where the prefix ends.

    Args:
        query: (B, Hq, L, D), the block being denoised; key: (B, Hkv, S, D), prefix then block.
        key_valid: (B, S) bool, True for attendable keys.
        lse: (B, Hq, L) natural-log log-sum-exp of the rows over those keys (from the dense pass
            that just ran), or None: the scorer computes it (one more sweep over the keys).
    Returns:
        ((B, Hq, n_blocks) float32 mass summed over the queries, front).
    """
    B, _, L, _ = query.shape
    S = key.shape[2]
    front, n_blocks = prefix_grid(S - L, block_size)
    valid = F.pad(key_valid, (front, 0), value=False)  # (B, front + S): the front positions absent
    counts = key_block_counts(valid, S + front, block_size, B, query.device)  # (B, nKV)
    importance = block_importance(query, key, scaling, block_size, valid, lse, counts, 0, front)
    n_q = importance.shape[2]
    rows = (L - torch.arange(n_q, device=query.device) * block_size).clamp(max=block_size).float()
    mass = importance.nan_to_num(neginf=0.0) * counts[:, None, None, :].float() * rows.view(1, 1, n_q, 1)
    return mass.sum(2)[..., :n_blocks], front


def select_prefix_blocks(
    mass: torch.Tensor, config: PrefixSparseConfig, num_kv_heads: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, Hq, n) mass -> (B, H, k) kept blocks, ascending; H = Hq, or Hkv with ``per_kv_head``
    (a (B, Hkv, n) mass is taken as already summed per KV head).

    "topk" keeps the heaviest blocks; "local" the last k (nearest the block being decoded);
    "random" k drawn from ``generator`` (the mass is not read).
    """
    B, Hq, n = mass.shape
    if config.per_kv_head and Hq != num_kv_heads:
        mass = mass.view(B, num_kv_heads, Hq // num_kv_heads, n).sum(2)
    k = config.blocks_kept(n)
    if config.pattern == "local":
        return torch.arange(n - k, n, device=mass.device).expand(*mass.shape[:2], k)
    if config.pattern == "random":
        mass = torch.rand(mass.shape, device=mass.device, generator=generator)
    return mass.topk(k, dim=-1).indices.sort(-1).values


def _gather_positions(sel: PrefixSelection, block_len: int, key_valid: torch.Tensor):
    """Key positions a sparse step reads, per head, and which of them are attendable.

    Returns ((B, H, K) int64 positions, (B, H, K) bool valid): the kept prefix blocks' positions
    in order, then every position from the selection's prefix end to S (the positions committed
    since the selection, with ``select_every`` > 1, then the block's own ``block_len``); slots of
    the short first grid block that lie before position 0 are moved last and masked. Keeping
    every block gives exactly the positions 0 .. S - 1 in order.
    """
    bs = sel.block_size
    B, H, k = sel.blocks.shape
    device = sel.blocks.device
    grid = sel.blocks[..., None] * bs + torch.arange(bs, device=device)  # (B, H, k, bs)
    prefix_pos = grid.flatten(2) - sel.front  # (B, H, k * bs), ascending; < 0 before position 0
    S = key_valid.shape[1]
    own = torch.arange(sel.prefix_len, S, device=device).expand(B, H, S - sel.prefix_len)
    pos = torch.cat([prefix_pos, own], -1)
    absent = pos < 0
    if k == sel.n_blocks:  # every block kept: the absent slots are the first `front` of every head
        pos = pos[..., sel.front :]
    elif sel.front:
        pos = pos.gather(-1, absent.to(torch.uint8).sort(dim=-1, stable=True).indices)  # absent slots last
    valid = (pos >= 0) & key_valid.gather(1, pos.clamp(min=0).flatten(1)).view(pos.shape)
    return pos.clamp(min=0), valid


def prefix_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    state: PrefixSparseState,
    layer_idx: int,
) -> torch.Tensor:
    """One layer's attention in a block-diffusion forward, by ``state.mode``.

    Args:
        query: (B, Hq, L, D); key, value: (B, Hkv, S, D) (the cache's views: prefix, then the L
            new positions).
        attention_mask: (B, 1, L, S) bool, True where a query attends (the sampler's block-causal
            mask); None: every query attends every key (a forward of one block in a batch with
            no padding), so the dense and selecting steps run FlashAttention-2 without a mask
            (`policy.decode_kernels`).
    Returns:
        (B, Hq, L, D).
    """
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool or attention_mask.dim() != 4
    ):
        raise TypeError(
            "prefix_state needs the block-causal mask as a 4D bool tensor (B, 1, L, S) (what blockdiff_generate "
            f"passes) or None, got {getattr(attention_mask, 'dtype', type(attention_mask).__name__)}"
        )
    B, Hq, L, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    gqa = Hq != Hkv
    mode = state.mode
    if mode not in PREFIX_MODES:
        raise ValueError(f"prefix_state.mode must be one of {PREFIX_MODES}, got {mode!r}")
    if mode == "sparse" and layer_idx not in state.layers:
        raise ValueError(
            f"a sparse denoising step for layer {layer_idx}, but no selection for it: call begin_block() "
            "before a block's first denoising step"
        )
    lse = None
    unmasked = attention_mask is None or not state.padded  # the sampler says every key is attendable
    if mode == "score" and state.config.scorer == "fused":
        key_valid = None if unmasked else attention_mask[:, 0, -1]
        out, mass, front = fused_score(query, key, value, scaling, state.config, key_valid)
        _keep_selection(state, layer_idx, mass, Hkv, S - L, front)
        return out
    if mode == "score" and unmasked and cudnn_lse_applies(query, None):
        out, lse = dense_with_lse(query, key, value, scaling, kernel="flash")
    elif mode in ("dense", "score"):
        with decode_kernels(query):
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=gqa
            )
    if mode == "dense":
        return out
    if attention_mask is None:
        key_valid = torch.ones(B, S, dtype=torch.bool, device=query.device)
    else:
        key_valid = attention_mask[:, 0, -1]  # the block's queries all see the same keys
    if mode == "score":
        mass, front = prefix_block_mass(query, key, scaling, state.config.block_size, key_valid, lse)
        _keep_selection(state, layer_idx, mass, Hkv, S - L, front)
        return out

    sel = state.layers[layer_idx]
    reused = state.config.select_every > 1 and sel.prefix_len < S - L  # the positions since are read whole
    if sel.prefix_len != S - L and not reused:
        raise ValueError(
            f"layer {layer_idx}: the selection covers a prefix of {sel.prefix_len} positions, this step has "
            f"{S - L}; call begin_block() when a new block starts"
        )
    _, index, mask = sparse_gather(sel, L, key_valid, Hq, Hkv)
    return gathered_attention(query, key, value, index, mask, scaling)


def _keep_selection(
    state: PrefixSparseState, layer_idx: int, mass: torch.Tensor, num_kv_heads: int, prefix_len: int, front: int
) -> None:
    """Select from ``mass`` ((B, Hq, n), or (B, Hkv, n) per KV head) and store the layer's
    selection in ``state``."""
    if state.config.pattern == "random" and state.generator is None:
        state.generator = torch.Generator(device=mass.device).manual_seed(state.config.seed)
    blocks = select_prefix_blocks(mass, state.config, num_kv_heads, state.generator)
    state.layers[layer_idx] = PrefixSelection(blocks, prefix_len, front, mass.shape[-1], state.config.block_size)


def fused_score(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    config: PrefixSparseConfig,
    key_valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A block's first step with ``scorer="fused"``: exact attention and the mass per prefix
    block in one sweep of the block-sparse decode kernel listing every prefix block.

    Args:
        query: (B, Hq, L, D); key, value: (B, Hkv, S, D), the prefix then the block's L keys.
        key_valid: (B, S) bool, or None when every key is attendable.
    Returns:
        ((B, Hq, L, D) output, (B, H, n) float32 mass (H = Hkv with ``per_kv_head``, else Hq),
        front).
    """
    refusal = decode_kernel_refusal(query, config.block_size)
    if refusal is not None:
        raise ArgumentValueError("scorer", f"scorer='fused' needs the block-sparse decode kernel, but {refusal}")
    from .kernels.sparse_decode import decode_attention_with_block_mass, decode_offsets

    B, Hq, L, _ = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    bs = config.block_size
    front, n_blocks = prefix_grid(S - L, bs)
    heads = Hkv if config.per_kv_head else Hq
    blocks = torch.arange(n_blocks, device=query.device).expand(B, heads, n_blocks)
    offsets = decode_offsets(S - L, front, S, query.device)
    out, mass = decode_attention_with_block_mass(query, key, value, blocks, offsets, bs, scaling, key_valid)
    return out, mass, front


def sparse_gather(
    sel: PrefixSelection, block_len: int, key_valid: torch.Tensor, num_heads: int, num_kv_heads: int
) -> tuple[tuple[int, int], tuple[torch.Tensor, ...], torch.Tensor]:
    """What a block's sparse steps read (``sel.gather``), built by the first of them.

    Args:
        key_valid: (B, S) bool, the keys the block's queries may attend.
    Returns:
        ((block_len, S), the (batch, head, position) index of the kept keys, each broadcasting to
        (B, H, K), the (B, Hq, 1, K) bool mask of the attendable ones).
    """
    if sel.gather is None or sel.gather[0] != (block_len, key_valid.shape[1]):  # a block's first sparse step
        B, heads = sel.blocks.shape[:2]  # heads: query heads, or key/value heads with per_kv_head
        device = sel.blocks.device
        pos, valid = _gather_positions(sel, block_len, key_valid)  # (B, H, K)
        kv_head = torch.arange(heads, device=device) // (heads // num_kv_heads)  # the kv head each head reads
        index = (torch.arange(B, device=device).view(B, 1, 1), kv_head.view(1, heads, 1), pos)
        mask = valid[:, :, None, :]  # (B, H, 1, K)
        if heads != num_heads:  # per-kv-head selection: each group's query heads read their kv head's keys
            mask = mask.repeat_interleave(num_heads // heads, 1)
        sel.gather = ((block_len, key_valid.shape[1]), index, mask)
    return sel.gather


def gathered_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    index: tuple[torch.Tensor, ...],
    mask: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """A sparse step's attention: gather the kept keys of ``key``/``value`` (B, Hkv, >= S, D) by
    ``index`` (`sparse_gather`) and attend to them under ``mask``. Returns (B, Hq, L, D)."""
    k_sel, v_sel = key[index], value[index]  # (B, H, K, D): one gather each per step
    gqa = k_sel.shape[1] != query.shape[1]
    return F.scaled_dot_product_attention(query, k_sel, v_sel, attn_mask=mask, scale=scaling, enable_gqa=gqa)
