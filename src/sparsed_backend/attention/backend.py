"""The "sparsed" attention function: dense, switch or sparse per call, driven by SparseDState."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention
from transformers.masking_utils import bidirectional_mask_function

from .. import _compat
from .._warn import warn_once
from . import policy
from .dense import dense_attention
from .flex_shapes import CompileGuard, pad_to_mask
from .prefix_selection import PrefixSparseState, prefix_sparse_attention
from .state import LayerSelection, SparseDState
from .switch_step import run_switch_step, select_layer

__all__ = ["sparsed_attention_forward", "sparsed_mask", "dense_attention", "sparse_attention"]

_compiled_flex = None
compile_guard = CompileGuard()  # the signatures this process compiled FlexAttention for


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    B, Hq, L, D = query.shape
    Bk, Hkv, S, Dk = key.shape
    if B == 0 or L == 0 or S == 0:
        raise ValueError(f"batch and lengths must be > 0, got query {tuple(query.shape)}, key {tuple(key.shape)}")
    if Bk != B or value.shape[0] != B:
        raise ValueError(f"query, key, value batch sizes differ: {B}, {Bk}, {value.shape[0]}")
    if value.shape[1] != Hkv or value.shape[2] != S:
        raise ValueError(f"key and value shapes differ: {tuple(key.shape)} vs {tuple(value.shape)}")
    if Dk != D:
        raise ValueError(f"query and key head_dim differ: {D} vs {Dk}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads must be a multiple of key/value heads (GQA), got Hq={Hq}, Hkv={Hkv}")


def _key_valid(attention_mask: object, batch: int, kv_len: int) -> torch.Tensor | None:
    """Normalise the padding mask to (B, S) bool (True = real key), or None for no padding."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool:
        got = type(attention_mask).__name__
        if isinstance(attention_mask, torch.Tensor):
            got = f"{attention_mask.dtype} tensor"
        raise TypeError(
            "attention_mask for 'sparsed' must be a bool padding mask of shape (batch, kv_len) or "
            f"(batch, 1, 1, kv_len) (what sparsed_mask builds), got {got}"
        )
    shape = tuple(attention_mask.shape)
    if attention_mask.dim() == 4 and shape[1] == 1 and shape[2] == 1:
        attention_mask = attention_mask[:, 0, 0]
    elif attention_mask.dim() != 2:
        raise NotImplementedError(
            "attention_mask for 'sparsed' must be a key padding mask of shape (batch, kv_len) or "
            f"(batch, 1, 1, kv_len); general 4D masks are not supported, got shape {shape}. "
            "Pass the 2D padding mask to the model instead."
        )
    if attention_mask.shape != (batch, kv_len):
        raise ValueError(
            f"attention_mask was built for another shape: expected (batch, kv_len) = ({batch}, {kv_len}), got {shape}"
        )
    return attention_mask


def _flex_call(query, key, value, block_mask, scale, enable_gqa, kernel_options):
    return flex_attention(
        query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, kernel_options=kernel_options
    )


def _flex():
    # Compile our own wrapper, not flex_attention itself: dynamo keeps its cache, recompile
    # count and automatic-dynamic state per code object, so compiling flex_attention directly
    # would share them with transformers' "flex_attention" backend (which compiles with
    # dynamic shapes and then broke our static CPU kernels: CppCompileError on torch 2.13).
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(_flex_call, dynamic=False, fullgraph=True)
    return _compiled_flex


def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: BlockMask,
    scaling: float,
    kernel_options: dict | None = None,
    q_front: int = 0,
    kv_front: int = 0,
) -> torch.Tensor:
    """Block-sparse attention over ``block_mask`` with compiled FlexAttention.

    The call runs at the mask's lengths: a mask built for bucket lengths (`flex_shapes`) gets
    zero-padded inputs, and the padded query rows are dropped from the output. ``q_front`` and
    ``kv_front`` zero rows go before the first query and key (a mask on a moved block grid,
    `LayerSelection.front`).

    Never falls back silently: passing the compile guard's bound raises instead of running the
    eager kernel, and a disabled torch.compile warns once and computes the same blocks through
    SDPA with the BlockMask's mask_mod expanded to tokens (correct, but every block is computed).

    Args:
        query: (B, Hq, L, D); key, value: (B, Hkv, S, D).
        block_mask: for (L, S) or longer (``block_mask.seq_lengths``).
        kernel_options: FlexAttention kernel options; None takes the measured policy's.
    Returns:
        (B, Hq, L, D).
    """
    L = query.shape[2]
    query, key, value = pad_to_mask(query, key, value, block_mask, q_front, kv_front)
    gqa = query.shape[1] != key.shape[1]
    options = policy.flex_kernel_options(query, block_mask) if kernel_options is None else kernel_options
    if torch.compiler.is_compiling():
        # Inside a user's torch.compile region: flex_attention is traced into their graph.
        out = flex_attention(
            query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=gqa, kernel_options=options
        )
        return out[:, :, q_front : q_front + L]
    if _compat.compile_disabled():
        warn_once(
            "dynamo-disabled",
            "torch.compile is disabled (TORCH_COMPILE_DISABLE / TORCHDYNAMO_DISABLE): sparsed computes "
            "the selected blocks through SDPA with the expanded token mask, which is correct but "
            "computes every block (slow, O(N^2) memory)",
        )
        # FlexAttention itself compiles (even its "eager" path raises "found no compiled frames"
        # with dynamo disabled), so expand the BlockMask's mask_mod, which reads the same table.
        mask = create_mask(block_mask.mask_mod, query.shape[0], query.shape[1], query.shape[2], key.shape[2],
                           device=query.device)  # fmt: skip
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        return out[:, :, q_front : q_front + L]
    compile_guard.note(query, key, block_mask)
    try:
        with _compat.fail_past_recompile_limit(compile_guard.limit):
            out = _flex()(
                query,
                key,
                value,
                block_mask=block_mask,
                scale=scaling,
                enable_gqa=gqa,
                kernel_options=options,
            )
    except _compat.RecompileLimitHit as err:
        raise RuntimeError(
            f"sparsed: compiled FlexAttention hit the recompile limit ({compile_guard.limit} graphs); "
            f"refusing to fall back to eager attention. The bucket grid cannot produce that many shapes, "
            f"so this is a bug; please report it with what was compiled: {compile_guard.describe()}"
        ) from err
    return out[:, :, q_front : q_front + L]


def sparsed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sparsed_state: SparseDState | None = None,
    query_start: int | None = None,
    prefix_state: PrefixSparseState | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers AttentionInterface entry point registered as "sparsed".

    Without ``sparsed_state`` it is plain bidirectional dense attention. With one, the state's
    step decides: dense before the switch step; at the switch step dense attention plus block
    selection (the layer's BlockMask is cached in the state); sparse FlexAttention after it.

    With ``prefix_state`` (block diffusion, `block_diffusion.blockdiff_generate`) the forward
    is one of a block-diffusion model (block-causal, so a causal module is fine) and
    `prefix_selection.prefix_sparse_attention` runs it under the sampler's 4D bool mask.

    Args:
        module: the attention module; needs ``layer_idx`` for sparse steps and must not be causal.
        query: (B, Hq, L, D) with RoPE applied; key, value: (B, Hkv, S, D), not repeated.
        attention_mask: None or a bool key padding mask (B, S) / (B, 1, 1, S).
        scaling: softmax scale; default head_dim ** -0.5.
        query_start: set by a cached step (sampling/kv_cache.py), whose L query rows are the window
            ``[query_start, query_start + L)`` of the S positions: sparse steps use the
            selection's rows of that window, and the switch step refuses it (selection needs
            every row). None: the queries are the selection's own rows.
    Returns:
        (attn_output (B, L, Hq, D) contiguous, None).
    """
    _check_inputs(query, key, value)
    if prefix_state is not None:
        if not isinstance(prefix_state, PrefixSparseState):
            raise TypeError(f"prefix_state must be a PrefixSparseState or None, got {type(prefix_state).__name__}")
        if sparsed_state is not None:
            raise ValueError("a forward takes sparsed_state (SparseD) or prefix_state (block diffusion), not both")
        layer_idx = getattr(module, "layer_idx", None)
        if not isinstance(layer_idx, int):
            raise ValueError(f"prefix_state needs module.layer_idx (an int), got {layer_idx!r}")
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        out = prefix_sparse_attention(query, key, value, attention_mask, scale, prefix_state, layer_idx)
        return out.transpose(1, 2).contiguous(), None
    if getattr(module, "is_causal", False):
        raise NotImplementedError(
            f"'sparsed' attention is bidirectional only (diffusion LMs); {type(module).__name__} has is_causal=True"
        )
    if sparsed_state is not None and not isinstance(sparsed_state, SparseDState):
        raise TypeError(f"sparsed_state must be a SparseDState or None, got {type(sparsed_state).__name__}")
    B, Hq, L, D = query.shape
    S = key.shape[2]
    scale = D**-0.5 if scaling is None else float(scaling)
    # Padded keys get probability 0 on every path; K and V are used in place (no copy, no new
    # layout). Their values must be finite (0 * NaN is NaN): the models zero padded embeddings
    # once per forward (models/_common.zero_padding), which keeps every layer's K/V finite.
    key_valid = _key_valid(attention_mask, B, S)
    if dropout and module.training:
        raise NotImplementedError(f"'sparsed' attention is inference-only; got dropout={dropout} in training mode")

    if sparsed_state is None:
        return _dense(query, key, value, scale, key_valid, query_start).transpose(1, 2).contiguous(), None

    mode = sparsed_state.mode
    cfg = sparsed_state.config_for(S)
    min_len = policy.min_sparse_len(cfg, query.device)
    if mode == "dense" or min_len > S:
        if mode != "dense":
            warn_once(
                f"short-{min_len}",
                f"sparsed: kv length {S} < min_sparse_len {min_len}; SparseD stays dense here "
                "(sparse attention cannot pay at this length). Set SparseDConfig(min_sparse_len=0) "
                "to force sparse steps.",
            )
            sparsed_state.dense_reason = f"kv length {S} < min_sparse_len {min_len}"
        return _dense(query, key, value, scale, key_valid, query_start).transpose(1, 2).contiguous(), None

    layer_idx = getattr(module, "layer_idx", None)
    if not isinstance(layer_idx, int):
        raise ValueError(
            f"'sparsed' needs module.layer_idx (an int) to cache one mask per layer; "
            f"{type(module).__name__} has layer_idx={layer_idx!r}"
        )
    where = {"gen_start": sparsed_state.gen_start, "key_valid": key_valid}
    windowed = query_start is not None
    if windowed and (mode == "switch" or cfg.reselect):
        raise ValueError(
            f"layer {layer_idx}: block selection needs every query row, but this forward runs rows "
            f"[{query_start}, {query_start + L}) of {S} (a cached step); select at a full forward"
        )
    if mode == "switch":
        out, sparsed_state.layers[layer_idx] = run_switch_step(query, key, value, scale, cfg, **where)
        return out.transpose(1, 2).contiguous(), None
    if cfg.reselect:  # fidelity baseline: a fresh selection at every sparse step
        sparsed_state.layers[layer_idx] = select_layer(query, key, scale, cfg, **where)

    sel = sparsed_state.layers.get(layer_idx)
    if sel is None:
        raise ValueError(
            f"sparse step {sparsed_state.step} for layer {layer_idx} but the state holds no "
            f"selection for it (switch step {sparsed_state.switch} did not run this layer)"
        )
    if (sel.batch, sel.num_heads, sel.kv_len) != (B, Hq, S) or (not windowed and sel.q_len != L):
        raise ValueError(
            f"layer {layer_idx}: the mask was built for (batch, heads, q_len, kv_len) = "
            f"{(sel.batch, sel.num_heads, sel.q_len, sel.kv_len)}, got {(B, Hq, L, S)}"
        )
    if windowed:
        out = window_decode_attention(query, key, value, sel, query_start, cfg.block_size, scale, key_valid)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
        block_mask, q_front = sel.window_mask(query_start, L, cfg.block_size, key_valid)
    else:
        block_mask, q_front = sel.block_mask, sel.front
    out = sparse_attention(query, key, value, block_mask, scale, q_front=q_front, kv_front=sel.front)
    return out.transpose(1, 2).contiguous(), None


def _dense(query, key, value, scale, key_valid, query_start) -> torch.Tensor:
    """Dense attention, (B, Hq, L, D): a cached step's window of at most
    `policy.DECODE_KERNEL_ROWS` rows through the split-KV dense decode kernel where it runs
    (`policy.decode_kernel_refusal`), every other call through SDPA (`dense.dense_attention`)."""
    rows = query.shape[2]
    if (
        query_start is not None
        and rows <= policy.DECODE_KERNEL_ROWS
        and policy.decode_kernel_refusal(query, 64) is None
    ):
        from .kernels.sparse_decode import dense_decode_attention

        return dense_decode_attention(query, key, value, _window_offsets(0, 0, key.shape[2], query.device), scale,
                                      key_valid)  # fmt: skip
    return dense_attention(query, key, value, scale, key_valid)


def window_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sel: LayerSelection,
    start: int,
    block_size: int,
    scale: float,
    key_valid: torch.Tensor | None,
) -> torch.Tensor | None:
    """A cached step's window through the block-sparse decode kernel, or None where it does not
    apply (then FlexAttention runs the window's BlockMask).

    It applies on CUDA with Triton (`policy.decode_kernel_refusal`: a power-of-two head_dim,
    blocks of 16 or 32 tokens or a multiple of 64) when the window's rows lie in one query block
    of the selection's grid (a dual cache's decoding block on the default grid, which ends a
    block at the prompt's end). The kernel reads each head's kept key blocks where the cache
    holds them, split over programs, with the grid's front as an offset; FlexAttention instead
    pads the window to whole 128-row query tiles and, off its bucket grid or with a moved grid,
    copies every layer's whole K/V to the mask's length (`flex_shapes.pad_to_mask`).

    Returns:
        (B, Hq, L, D) or None.
    """
    if query.shape[2] > policy.DECODE_KERNEL_ROWS or policy.decode_kernel_refusal(query, block_size) is not None:
        return None
    blocks = sel.window_blocks(start, query.shape[2], block_size)
    if blocks is None:
        return None
    from .kernels.sparse_decode import sparse_decode_attention

    offsets = _window_offsets(key.shape[2], sel.front, key.shape[2], query.device)  # no keys read whole
    return sparse_decode_attention(query, key, value, blocks, offsets, block_size, scale, key_valid)


@functools.lru_cache(maxsize=16)
def _window_offsets(prefix_len: int, front: int, key_len: int, device: torch.device) -> torch.Tensor:
    """The decode kernels' (prefix_len, front, key_len) offsets (`kernels.sparse_decode.decode_offsets`)
    as one device tensor per value, not a host-to-device copy per call."""
    from .kernels.sparse_decode import decode_offsets

    return decode_offsets(prefix_len, front, key_len, device)


def sparsed_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=bidirectional_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """AttentionMaskInterface entry: a (B, 1, 1, S) bool key padding mask, or None.

    The N x N mask is never materialised. Only plain bidirectional masks are accepted: a
    causal (or otherwise modified) mask function raises rather than being silently ignored.
    """
    if mask_function is not bidirectional_mask_function:
        raise NotImplementedError(
            "'sparsed' supports only bidirectional attention masks (diffusion LMs); got mask "
            f"function {getattr(mask_function, '__name__', mask_function)!r}"
        )
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"expected a 2D padding mask (batch, kv_len), got shape {tuple(attention_mask.shape)}")
    mask = attention_mask[:, kv_offset : kv_offset + kv_length]
    if mask.shape != (batch_size, kv_length):
        raise ValueError(
            f"padding mask of shape {tuple(attention_mask.shape)} does not cover (batch, kv_len) = "
            f"({batch_size}, {kv_length})"
        )
    return mask.bool()[:, None, None, :]
