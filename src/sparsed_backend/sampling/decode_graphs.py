"""CUDA-graph replay of a Qwen3-layout decoder's per-token work, with the attention left eager.

A block-diffusion denoising step runs the whole model on a block of 4-64 tokens. On the
SDAR-8B shape its GPU work at a 32k prefix is about 32 ms, but eager PyTorch takes about 58 ms
to launch it (hundreds of small kernels per forward; ``benchmarks/profile_blockdiff.py``), so
the sparse prefix selection's savings on the GPU never reach the wall clock.

`GraphedDecoder` captures, for one (batch, tokens) shape, the work between two attention calls
as one CUDA graph: a layer's work after its attention (output projection, residuals,
post-attention norm, MLP) with the next layer's work before it (input norm, Q/K/V projections,
Q/K norms, rotary embedding); the first graph holds the embedding with the rotary tables, the
last the final norm with the LM head. So a forward replays one graph per layer plus one (each
replay costs host time: 74 graphs per forward, one per piece, took 5.3 ms of a 32k forward's
22.8 ms to launch, `profile_blockdiff_32k_flash.txt`), and a commit, which needs no logits,
skips the last graph (the last layer's MLP feeds only the LM head). Between two graphs it runs,
eagerly and unchanged, what depends on the prefix length: the cache write and the model's attention
function (transformers' SDPA or eager attention, or "sparsed" with its prefix selection). So
the attention shapes may change at every block while the graphs are captured once. (vLLM
calls this piecewise capture; this is the project's own implementation.) A sparse denoising
step, whose attention reads a fixed number of kept blocks, is captured whole (`sparse_step`),
with the block-sparse decode kernel reading those blocks in place where it applies.

With ``whole=True`` (``blockdiff_generate(cuda_graphs="whole")``) every forward of a block is
captured whole: the exact ones (a dense run's steps, the commits) attend through the split-KV
decode kernel (`dense_step`, `kernels.sparse_decode.dense_decode_attention`), which reads the
key length from a device buffer, so one graph serves every block; a selecting step
(`score_step`) lists every prefix block to the same kernel, which gives the attention and each
block's probability mass in one sweep, and chooses the kept blocks inside the graph (captured
anew when the prefix grows by a block). A forward then costs one graph launch instead of one per
layer, and a batch of one block spreads its keys over the whole GPU, which SDPA's kernels (one
program per head and 128 query rows) do not.

The eager attention runs with FlashAttention-2 first in SDPA's order (`policy.decode_kernels`):
cuDNN's attention rebuilds its plan for every new key length, which block diffusion gives it
at every block.

The graph pieces call the model's own modules and its module's ``apply_rotary_pos_emb`` in the
order ``Qwen3DecoderLayer`` does, on buffers with the same layout, so a replay computes what the
model's forward computes (checked on the CPU by running the same pieces without capture).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import ArgumentValueError
from .._warn import warn_once
from ..attention.policy import decode_kernel_refusal, decode_kernels
from ..attention.prefix_selection import (
    PrefixSelection,
    PrefixSparseState,
    gathered_attention,
    prefix_block_mass,
    prefix_grid,
    select_prefix_blocks,
    sparse_gather,
)

__all__ = ["GraphedDecoder"]

_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "scaling")


def _decoder_parts(model: nn.Module):
    """(embedding, rotary, layers, final norm, LM head, apply_rotary_pos_emb) of a Qwen3-layout
    causal LM; ArgumentValueError naming ``cuda_graphs`` for any other model."""
    base = getattr(model, "model", None)
    parts = [getattr(base, name, None) for name in ("embed_tokens", "rotary_emb", "layers", "norm")]
    head = getattr(model, "lm_head", None)
    layers = parts[2]
    ok = all(p is not None for p in parts) and head is not None and len(layers) > 0
    ok = ok and all(hasattr(layer, name) for layer in layers for name in _LAYER_PARTS)
    ok = ok and all(hasattr(layer.self_attn, name) for layer in layers for name in _ATTENTION_PARTS)
    module = sys.modules.get(type(layers[0].self_attn).__module__) if ok else None
    rotate = getattr(module, "apply_rotary_pos_emb", None)
    if not ok or rotate is None:
        raise ArgumentValueError(
            "cuda_graphs",
            "cuda_graphs needs a Qwen3-layout causal LM (model.model.embed_tokens / rotary_emb / layers / norm, "
            "model.lm_head, and attention modules with q_proj, k_proj, v_proj, o_proj, q_norm, k_norm), "
            f"got {type(model).__name__}",
        )
    return (*parts, head, rotate)


def _captured(run, pool=None) -> torch.cuda.CUDAGraph:
    """``run`` once on a side stream (warm-up outside capture: cuBLAS handles, workspaces), then
    captured as a CUDA graph (in ``pool`` if given). Only errors of this thread break a capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        run()
    return graph


class GraphedDecoder:
    """One (batch, tokens) forward shape of a Qwen3-layout model: graphs around eager attention.

    Args:
        model: a Qwen3-layout causal LM (``Qwen3ForCausalLM``), in eval mode.
        batch, tokens: the shape of every forward this decoder runs.
        capture: capture the CUDA graphs (the model must be on a CUDA device); False runs the
            same pieces eagerly (what the CPU tests compare with the model's forward).
        whole: every forward of a block one graph (`dense_step`, `score_step`, `sparse_step`);
            with ``kernels`` its exact forwards attend through the split-KV decode kernel (an
            ArgumentValueError naming ``cuda_graphs`` where it cannot run); refused for models
            with sliding-window layers.
        kernels: attend through the Triton decode kernels where the captured graphs do
            (sparse steps, and with ``whole`` every whole forward); None: when capturing.
            ``capture=False, kernels=True`` runs the captured computation eagerly (on the CPU
            under Triton's interpreter, ``TRITON_INTERPRET=1``); False: SDPA and the gather.

    Calling it runs one forward (`__call__`). Its outputs live in buffers the next call
    overwrites, so the logits are returned as a copy.
    """

    def __init__(
        self, model: nn.Module, batch: int, tokens: int, *, capture: bool = True, whole: bool = False,
        kernels: bool | None = None,
    ) -> None:  # fmt: skip
        self.embed, self.rotary, self.layers, self.norm, self.head, self.rotate = _decoder_parts(model)
        self.model = model
        param = next(model.parameters())
        if capture and param.device.type != "cuda":
            raise ArgumentValueError(
                "cuda_graphs", f"cuda_graphs needs the model on a CUDA device, got it on {param.device.type}"
            )
        config = model.config
        attn = self.layers[0].self_attn
        head_dim = attn.head_dim
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        device, dtype = param.device, param.dtype
        self.batch, self.tokens = batch, tokens

        def heads_buffer(n: int) -> torch.Tensor:  # (B, n, L, D) with the layout of a transposed projection
            return torch.zeros(batch, tokens, n, head_dim, dtype=dtype, device=device).transpose(1, 2)

        self.ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, tokens, dtype=torch.long, device=device)
        self.hidden = torch.zeros(batch, tokens, config.hidden_size, dtype=dtype, device=device)
        cos, sin = self.rotary(self.hidden, self.positions)
        self.cos, self.sin = torch.zeros_like(cos), torch.zeros_like(sin)
        self.q, self.k, self.v = heads_buffer(heads), heads_buffer(kv_heads), heads_buffer(kv_heads)
        self.attn_out = torch.zeros(batch, tokens, heads * head_dim, dtype=dtype, device=device)
        self.logits = torch.zeros(batch, tokens, config.vocab_size, dtype=dtype, device=device)

        self.whole = whole
        self.kernels = capture if kernels is None else kernels
        windowed = [i for i, layer in enumerate(self.layers) if getattr(layer.self_attn, "sliding_window", None)]
        if whole and windowed:
            raise ArgumentValueError(
                "cuda_graphs",
                f"cuda_graphs='whole' attends to every cached key, but layers {windowed} use a sliding window "
                "(use cuda_graphs=True)",
            )
        if whole and self.kernels:
            refusal = decode_kernel_refusal(self.q, 64)
            if refusal is not None:
                raise ArgumentValueError(
                    "cuda_graphs", f"cuda_graphs='whole' attends through the block-sparse decode kernel, but {refusal}"
                )
        self.n_pieces = len(self.layers) + 1  # the stretches between attention calls
        self.capture = capture
        # The pieces' graphs, captured on the first forward that runs them (with ``whole`` only
        # a selecting step that cannot be whole does).
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        # The whole-forward graphs (`sparse_step`, `dense_step`, `score_step`), by what they run.
        self.write_positions = torch.zeros(tokens, dtype=torch.long, device=device)
        self._whole_graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._sparse_key: tuple | None = None
        self._sparse_block = -1  # the state's block (its count of blocks begun) the buffers hold
        self._gather: tuple[tuple[torch.Tensor, torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None
        # With the block-sparse decode kernel: each layer's kept blocks, (prefix_len, front), and
        # the attendable keys over the whole storage (None when no row is padded).
        self._kept: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None, int] | None = None
        self._cache = None
        # Dense whole forwards and selecting steps (`dense_step`, `score_step`): (prefix_len,
        # front, key_len) for the kernel, the attendable keys over the whole storage (padded
        # batches), the key length on the host (uncaptured runs), the scored blocks and each
        # layer's selection, and the selecting graph's (prefix blocks, front).
        self._offsets = torch.zeros(3, dtype=torch.int32, device=device)
        self._valid: torch.Tensor | None = None
        self._splits: int | None = None
        self._key_len = 0
        self._listed: torch.Tensor | None = None
        self._selected: list[torch.Tensor] = []
        self._score_grid: tuple[int, int] | None = None
        self._score_state: PrefixSparseState | None = None

    def _set_inputs(self, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """Copy one forward's (B, tokens) ids and positions into the buffers the graphs read."""
        if tuple(ids.shape) != (self.batch, self.tokens):
            raise ValueError(f"this decoder runs ({self.batch}, {self.tokens}) tokens, got {tuple(ids.shape)}")
        self.ids.copy_(ids)
        self.positions.copy_(positions)

    def _piece(self, index: int) -> None:
        """Runs piece ``index`` eagerly: what comes before layer ``index``'s attention (after
        the embedding or layer ``index - 1``'s attention); the last piece ends with the logits.
        (Dispatched by index: a list of bound methods on the decoder would make a reference
        cycle, freed by the garbage collector at any time, even while a later decoder captures,
        which a capture does not allow.)"""
        if index == 0:
            self._embed()
        else:
            self._after_attention(index - 1)
        if index < len(self.layers):
            self._before_attention(index)
        else:
            self._logits()

    # The pieces: each reads and writes only this decoder's buffers (fixed addresses).
    def _embed(self) -> None:
        self.hidden.copy_(self.embed(self.ids))
        cos, sin = self.rotary(self.hidden, self.positions)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def _before_attention(self, i: int) -> None:
        layer = self.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(self.hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q = attn.q_norm(attn.q_proj(x).view(shape)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = self.rotate(q, k, self.cos, self.sin)
        self.q.copy_(q)
        self.k.copy_(k)
        self.v.copy_(v)

    def _after_attention(self, i: int) -> None:
        layer = self.layers[i]
        hidden = self.hidden + layer.self_attn.o_proj(self.attn_out)
        self.hidden.copy_(hidden + layer.mlp(layer.post_attention_layernorm(hidden)))

    def _logits(self) -> None:
        self.logits.copy_(self.head(self.norm(self.hidden)))

    def _capture(self) -> list[torch.cuda.CUDAGraph]:
        pool = torch.cuda.graph_pool_handle()  # one pool: the graphs replay in capture order
        return [_captured(lambda index=index: self._piece(index), pool) for index in range(self.n_pieces)]

    def _whole_forward(self, attend, logits: bool) -> None:
        """A whole forward on the buffers: every layer writes its K/V at ``write_positions`` and
        ``attend(i, q, keys, values, scaling)`` attends over the cache's whole storage; without
        ``logits`` (a commit) the last layer's MLP and the LM head, which feed only the logits,
        are skipped."""
        cache = self._cache
        last = len(self.layers) - 1
        self._embed()
        for i, layer in enumerate(self.layers):
            self._before_attention(i)
            keys, values = cache.keys[i], cache.values[i]  # (B, Hkv, T, D), the whole storage
            keys.index_copy_(2, self.write_positions, self.k)
            values.index_copy_(2, self.write_positions, self.v)
            out = attend(i, self.q, keys, values, layer.self_attn.scaling)
            self.attn_out.copy_(out.transpose(1, 2).reshape(self.attn_out.shape))
            if i < last or logits:
                self._after_attention(i)
        if logits:
            self._logits()

    def _sparse_attend(self, i, q, keys, values, scaling) -> torch.Tensor:
        """Layer ``i``'s attention to its kept keys (what `prefix_sparse_attention`'s sparse mode
        computes from the cache's views): read in place by the block-sparse decode kernel when
        ``self._kept`` is set, else gathered."""
        if self._kept is not None:
            from ..attention.kernels.sparse_decode import sparse_decode_attention

            blocks, offsets, valid, block_size = self._kept
            return sparse_decode_attention(q, keys, values, blocks[i], offsets, block_size, scaling, valid)
        (batch_index, head_index), positions, masks = self._gather
        return gathered_attention(q, keys, values, (batch_index, head_index, positions[i]), masks[i], scaling)

    def _dense_attend(self, i, q, keys, values, scaling) -> torch.Tensor:
        """Layer ``i``'s exact attention over keys ``[0, key_len)``: the split-KV decode kernel
        (the key length read from ``self._offsets``) with ``kernels``, else SDPA."""
        if self.kernels:
            from ..attention.kernels.sparse_decode import dense_decode_attention

            return dense_decode_attention(q, keys, values, self._offsets, scaling, self._valid, self._splits)
        n = self._key_len
        mask = None if self._valid is None else self._valid[:, None, None, :n]
        gqa = q.shape[1] != keys.shape[1]
        return F.scaled_dot_product_attention(
            q, keys[:, :, :n], values[:, :, :n], attn_mask=mask, scale=scaling, enable_gqa=gqa
        )

    def _score_attend(self, i, q, keys, values, scaling) -> torch.Tensor:
        """A selecting step's layer ``i``: exact attention and each prefix block's mass (the
        fused decode kernel listing every block with ``kernels``; else SDPA and
        `prefix_block_mass`), the kept blocks written into ``self._selected[i]``."""
        config = self._score_state.config
        if self.kernels:
            from ..attention.kernels.sparse_decode import decode_attention_with_block_mass

            out, mass = decode_attention_with_block_mass(
                q, keys, values, self._listed, self._offsets, config.block_size, scaling, self._valid
            )
        else:
            n = self._key_len
            out = self._dense_attend(i, q, keys, values, scaling)
            valid = self._valid[:, :n] if self._valid is not None else keys.new_ones(keys.shape[0], n, dtype=torch.bool)
            mass, _ = prefix_block_mass(q, keys[:, :, :n], scaling, config.block_size, valid)
        self._selected[i].copy_(select_prefix_blocks(mass, config, keys.shape[1]))
        return out

    def _load_gathers(self, key_valid: torch.Tensor, state: PrefixSparseState, fresh_cache: bool) -> bool:
        """Each layer's gather index and mask into the graph's buffers; True when their shape is
        new (the graph must be captured anew)."""
        heads, kv_heads = self.q.shape[1], self.k.shape[1]
        gathers = [
            sparse_gather(state.layers[i], self.tokens, key_valid, heads, kv_heads) for i in range(len(self.layers))
        ]
        index, mask = gathers[0][1], gathers[0][2]
        key = ("gather", tuple(index[2].shape), tuple(mask.shape))
        fresh = key != self._sparse_key or fresh_cache
        if fresh:
            self._sparse_key, self._kept = key, None
            self._gather = (index[:2], [g[1][2].clone() for g in gathers], [g[2].clone() for g in gathers])
        elif state.blocks_begun != self._sparse_block:  # a new block: its kept positions
            for i, g in enumerate(gathers):
                self._gather[1][i].copy_(g[1][2])
                self._gather[2][i].copy_(g[2])
        return fresh

    def _load_kept(self, key_valid: torch.Tensor, cache, state: PrefixSparseState, fresh_cache: bool) -> bool:
        """Each layer's kept blocks, the (prefix_len, front, key_len) offsets and the attendable
        keys into the decode kernel's buffers; True when their shape is new (capture anew)."""
        sels = [state.layers[i] for i in range(len(self.layers))]
        first = sels[0]
        padded = state.padded
        key = ("kernel", tuple(first.blocks.shape), first.block_size, padded)
        fresh = key != self._sparse_key or fresh_cache
        if fresh:
            self._sparse_key, self._gather = key, None
            storage = cache.keys[0].shape[2]
            valid = torch.zeros(self.batch, storage, dtype=torch.bool, device=self.q.device) if padded else None
            offsets = torch.zeros(3, dtype=torch.int32, device=self.q.device)
            self._kept = ([s.blocks.clone() for s in sels], offsets, valid, first.block_size)
        blocks, offsets, valid, _ = self._kept
        if fresh or state.blocks_begun != self._sparse_block:  # a new block
            if not fresh:  # its kept blocks (a fresh buffer holds them already)
                for buffer, sel in zip(blocks, sels, strict=True):
                    buffer.copy_(sel.blocks)
            offsets[0].fill_(first.prefix_len)
            offsets[1].fill_(first.front)
            offsets[2].fill_(key_valid.shape[1])
            if valid is not None:
                valid.zero_()
                valid[:, : key_valid.shape[1]].copy_(key_valid)
        return fresh

    def _use_cache(self, cache) -> bool:
        """Point the whole-forward graphs at ``cache``; a new cache (its storage is what the
        graphs read and write) drops every whole-forward graph and buffer. True when new."""
        if cache is self._cache:
            return False
        self._cache = cache
        self._whole_graphs.clear()
        self._sparse_key = self._score_grid = self._valid = None
        if self.kernels and self.whole:  # the dense kernel's key splits, for the longest key range
            from ..attention.kernels.sparse_decode import dense_decode_splits

            self._splits = dense_decode_splits(self.batch * self.k.shape[1], cache.keys[0].shape[2], self.q.device)
        return True

    def _replay(self, key: tuple, forward) -> None:
        """Run ``forward`` (a whole forward on the buffers): eagerly when uncaptured, else by
        replaying the graph captured for ``key`` (captured on its first use: the warm-up run is
        this step's own computation, and the replay redoes it)."""
        if not self.capture:
            forward()
            return
        graph = self._whole_graphs.get(key)
        if graph is None:
            graph = self._whole_graphs[key] = _captured(forward)
        graph.replay()

    def _forget(self, kind: str) -> None:
        """Drop the whole-forward graphs of one kind ("sparse", "dense", "score")."""
        for key in [k for k in self._whole_graphs if k[0] == kind]:
            del self._whole_graphs[key]

    def _load_whole(self, cache, key_valid: torch.Tensor, padded: bool, prefix_len: int, front: int) -> None:
        """What a dense or selecting whole forward reads: the (prefix_len, front, key_len)
        offsets, the key length, the attendable keys (padded batches) and the write positions."""
        key_len = key_valid.shape[1]
        if padded != (self._valid is not None):  # the graphs captured with the other setting read the old one
            self._forget("dense")
            self._forget("score")
            storage = cache.keys[0].shape[2]
            self._valid = torch.zeros(self.batch, storage, dtype=torch.bool, device=self.q.device) if padded else None
        if padded:
            self._valid[:, :key_len].copy_(key_valid)
        self._offsets[0].fill_(prefix_len)
        self._offsets[1].fill_(front)
        self._offsets[2].fill_(key_len)
        self._key_len = key_len
        self._write_at(cache)

    def _write_at(self, cache) -> None:
        """The positions the next forward's K/V go to: the block after the committed prefix."""
        self.write_positions.copy_(torch.arange(cache.length, cache.length + self.tokens, device=self.q.device))

    def dense_step(
        self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor, cache, *, padded: bool,
        logits: bool = True,
    ) -> torch.Tensor | None:  # fmt: skip
        """One exact forward of a block against the cache (a dense run's denoising step, or a
        commit) as one captured graph, with ``whole=True``: every layer's cache write and its
        attention over keys ``[0, key_len)``, through the split-KV decode kernel
        (`kernels.sparse_decode.dense_decode_attention`), which reads the key length from a
        device buffer, so one graph per kind of forward serves the whole generation.

        Args:
            key_valid: (B, S) bool, the keys the block's queries may attend (S = key_len).
            cache: the prepared `BlockDiffusionKVCache`.
            padded: some key before S is not attendable (left padding); False: none is.
            logits: False for a commit (the last layer's MLP and the LM head are skipped).
        Returns:
            (B, tokens, V) logits, or None with ``logits=False``.
        """
        self._set_inputs(ids, positions)
        self._use_cache(cache)
        self._load_whole(cache, key_valid, padded, 0, 0)
        self._replay(("dense", logits), lambda: self._whole_forward(self._dense_attend, logits))
        cache.written()
        return self.logits.clone() if logits else None

    def score_step(
        self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor, cache, state: PrefixSparseState,
        *, padded: bool,
    ) -> torch.Tensor:  # fmt: skip
        """A block's selecting step (``state.mode == "score"``) as one captured graph, with
        ``whole=True``: every layer's exact attention and the probability mass its rows put on
        each prefix block, from one sweep of the decode kernel listing every block
        (``scorer="fused"``'s computation; uncaptured, SDPA and `prefix_block_mass`), and each
        head's kept blocks chosen in the graph (patterns "topk" and "local"). The selections
        land in ``state.layers`` as with the model's forward. A new number of prefix blocks
        captures anew (once per ``block_size`` committed positions).

        Returns:
            (B, tokens, V) logits.
        """
        config = state.config
        if config.pattern == "random":
            raise ValueError("score_step chooses blocks inside a graph: pattern 'random' draws on the host")
        self._set_inputs(ids, positions)
        self._use_cache(cache)
        prefix_len = key_valid.shape[1] - self.tokens
        front, n_blocks = prefix_grid(prefix_len, config.block_size)
        self._load_whole(cache, key_valid, padded, prefix_len, front)
        if self._score_grid != n_blocks:  # the listed blocks and the kept count change
            heads = self.k.shape[1] if config.per_kv_head else self.q.shape[1]
            device = self.q.device
            self._listed = torch.arange(n_blocks, device=device).expand(self.batch, heads, n_blocks).contiguous()
            shape = (self.batch, heads, config.blocks_kept(n_blocks))
            self._selected = [torch.zeros(shape, dtype=torch.long, device=device) for _ in self.layers]
            self._forget("score")
            self._score_grid = n_blocks
        self._score_state = state
        self._replay(("score",), lambda: self._whole_forward(self._score_attend, True))
        for i, blocks in enumerate(self._selected):
            state.layers[i] = PrefixSelection(blocks, prefix_len, front, n_blocks, config.block_size)
        cache.written()
        return self.logits.clone()

    def sparse_step(
        self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor, cache, state: PrefixSparseState,
        *, logits: bool = True,
    ) -> torch.Tensor | None:  # fmt: skip
        """A block's later denoising step (``state.mode == "sparse"``), or its commit with
        ``sparse_commit`` (the cache prepared for a commit then advances; ``logits=False``
        skips the last layer's MLP and the LM head), as one captured graph.

        Every layer's cache write and attention to its kept keys run inside the graph, so the
        step launches nothing eagerly. On CUDA with Triton the attention is the block-sparse
        decode kernel (`kernels.sparse_decode`), which reads the kept blocks in place and the
        prefix length from a device buffer; where it cannot run (the reason is said once) the
        graph gathers the kept keys and calls SDPA. What the graph reads is fixed in shape while
        the number of kept blocks is: the kept blocks (or gathered positions and masks) are
        copied into its buffers once per block, and a new count captures anew (a few times per
        generation, as the prefix grows).

        Args:
            key_valid: (B, S) bool, the keys the block's queries may attend.
            cache: the prepared `BlockDiffusionKVCache` (``prepare("denoise", tokens)``, or
                ``"commit"``).
        Returns:
            (B, tokens, V) logits, or None with ``logits=False``.
        """
        self._set_inputs(ids, positions)
        fresh_cache = self._use_cache(cache)  # the graphs hold the cache's storage
        kernel = False  # without kernels (the CPU tests), the steps gather as prefix_sparse_attention does
        if self.kernels:
            refusal = decode_kernel_refusal(self.q, state.config.block_size)
            kernel = refusal is None
            if not kernel:
                warn_once(
                    "sparse-decode-kernel",
                    f"sparsed: the block-sparse decode kernel cannot run these sparse steps ({refusal}); "
                    "they gather the kept keys and call SDPA instead (slower)",
                )
        if kernel:
            fresh = self._load_kept(key_valid, cache, state, fresh_cache)
        else:
            fresh = self._load_gathers(key_valid, state, fresh_cache)
        if fresh:
            self._forget("sparse")
        self._sparse_block = state.blocks_begun
        self._write_at(cache)
        self._replay(("sparse", logits), lambda: self._whole_forward(self._sparse_attend, logits))
        cache.written()
        return self.logits.clone() if logits else None

    def _run(self, index: int) -> None:
        if not self.capture:
            self._piece(index)
            return
        if self.graphs is None:
            self.graphs = self._capture()
        self.graphs[index].replay()

    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor,
        cache,
        *,
        logits: bool = True,
        **attention_kwargs,
    ) -> torch.Tensor | None:
        """One forward: ids, positions (B, tokens); ``attention_mask`` as the model's attention
        function takes it, or None when every query attends every key (the attention then runs
        unmasked, which lets SDPA take FlashAttention-2: `policy.decode_kernels`); ``cache``
        with ``update(k, v, layer_idx)`` (a prepared `BlockDiffusionKVCache`).
        ``attention_kwargs`` reach the attention function (e.g. ``prefix_state``). Returns the
        (B, tokens, V) logits, or None with ``logits=False``."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        implementation = self.model.config._attn_implementation
        eager = sys.modules[type(self.layers[0].self_attn).__module__].eager_attention_forward
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)  # as the model's attention asks
        # No mask: every query attends every key; transformers' SDPA would otherwise go causal.
        unmasked = {"is_causal": False} if attention_mask is None else {}
        self._set_inputs(ids, positions)
        last = len(self.layers) - 1
        self._run(0)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            key, value = cache.update(self.k, self.v, attn.layer_idx)
            with decode_kernels(self.q):
                out, _ = attention(
                    attn,
                    self.q,
                    key,
                    value,
                    attention_mask,
                    dropout=0.0,
                    scaling=attn.scaling,
                    sliding_window=getattr(attn, "sliding_window", None),
                    **unmasked,
                    **attention_kwargs,
                )
            self.attn_out.copy_(out.reshape(self.attn_out.shape))
            if i < last or logits:  # the last piece feeds only the logits
                self._run(i + 1)
        return self.logits.clone() if logits else None
