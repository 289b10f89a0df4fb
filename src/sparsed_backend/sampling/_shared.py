"""What both samplers share: the output type, input validation and layout, and the runner
that calls the model once per step (with the SparseD state and the K/V cache window)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import ArgumentTypeError, ArgumentValueError, check_int
from ..attention.config import SparseDConfig
from ..attention.state import SparseDState
from ..models.rope import position_limit, position_limit_note
from .kv_cache import BlockKVCache
from .tensor_parallel import RankSync, rank_sync

__all__ = ["DiffusionGenerationOutput", "check_cache_with_sparsed"]


@dataclass
class DiffusionGenerationOutput:
    """What a sampler returns with ``return_dict_in_generate=True``.

    Attributes:
        sequences: (B, P + G) the (padded) prompt followed by the generated tokens.
        sparsed_state: the SparseD schedule that ran (``.switch`` is the switch step,
            ``.density()`` the kept share of key blocks), or None without ``sparsed``.
        num_forwards: model forwards run (one per denoising step; CFG batches its two halves).
        history: with ``output_history=True``, the sequences after every step.
        kv_cache: with ``kv_cache``, the BlockKVCache that ran (``.refreshes`` full forwards,
            ``.memory_bytes()`` held at the end).
        block_steps: denoising steps each decoding block took (fixed schedules: ``steps /
            num_blocks`` each; ``threshold``: as many as the block needed).
    """

    sequences: torch.LongTensor
    sparsed_state: SparseDState | None
    num_forwards: int
    history: tuple[torch.LongTensor, ...] | None = None
    kv_cache: BlockKVCache | None = None
    block_steps: tuple[int, ...] = ()


# ----------------------------------------------------------------------------- validation


def check_model(model: nn.Module, sparsed: SparseDConfig | None) -> None:
    causal = [name for name, m in model.named_modules() if getattr(m, "is_causal", False) is True]
    if causal:
        raise ValueError(
            "model attention must be bidirectional (is_causal=False) for diffusion sampling, "
            f"got is_causal=True in {causal[0]!r}"
        )
    if sparsed is not None:
        if not isinstance(sparsed, SparseDConfig):
            raise ArgumentTypeError("sparsed", f"sparsed must be a SparseDConfig or None, got {type(sparsed).__name__}")
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if impl != "sparsed":
            raise ValueError(
                "sparsed is given but the model's attention implementation is "
                f"{impl!r}, expected 'sparsed' (load with attn_implementation='sparsed' or call "
                "model.set_attn_implementation('sparsed'))"
            )


def prepare_canvas(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    mask_id: int,
    gen_length: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Validate the prompt batch and lay out the canvas.

    Returns:
        x: (B, P + G) prompt then ``gen_length`` mask tokens.
        mask: (B, P + G) 2D attention mask, or None when no row is padded.
        position_ids: (B, P + G) cumsum(mask) - 1 clamped at 0, or None when no row is padded.
        prompt_index: (B, P + G) bool, True on real prompt tokens.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise ArgumentTypeError("input_ids", f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ArgumentValueError(
            "input_ids", f"input_ids must be 2D (batch, prompt_len), got shape {tuple(input_ids.shape)}"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ArgumentTypeError("input_ids", f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    batch, prompt_len = input_ids.shape
    if batch == 0 or prompt_len == 0:
        raise ArgumentValueError(
            "input_ids", f"input_ids must have batch >= 1 and prompt length >= 1, got shape {tuple(input_ids.shape)}"
        )
    device = getattr(model, "device", None)
    if device is not None and torch.device(device) != input_ids.device:
        raise ValueError(f"input_ids are on {input_ids.device} but the model is on {device}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            raise ArgumentValueError(
                "attention_mask",
                f"attention_mask must be a tensor of shape {tuple(input_ids.shape)} (like input_ids), got {got!r}",
            )
        real = attention_mask.to(device=input_ids.device).long()
        # Validation reads the mask back once, before the step loop.
        if not bool(((real == 0) | (real == 1)).all()):
            raise ArgumentValueError("attention_mask", "attention_mask must hold only 0 (padding) and 1 (real token)")
        if not bool((real[:, 1:] >= real[:, :-1]).all()) or not bool(real[:, -1].all()):
            raise ArgumentValueError(
                "attention_mask",
                "attention_mask must be LEFT padded (zeros, then ones, ending with a real token) for every row; "
                'set tokenizer.padding_side = "left", or pass padding_side="left" when tokenizing the batch',
            )
        if bool(real.all()):
            real = None  # no padding: run without a mask (no per-forward mask build or sync)
    else:
        real = None
    prompt_real = torch.ones_like(input_ids, dtype=torch.bool) if real is None else real.bool()
    if bool(((input_ids == mask_id) & prompt_real).any()):
        raise ValueError(f"the prompt must not contain the mask token (id {mask_id}); found it in input_ids")

    x = F.pad(input_ids.long(), (0, gen_length), value=mask_id)
    prompt_index = F.pad(prompt_real, (0, gen_length), value=False)
    if real is None:
        return x, None, None, prompt_index
    mask = F.pad(real, (0, gen_length), value=1)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return x, mask, position_ids, prompt_index


def check_length(model: nn.Module, prompt_len: int, gen_length: int, gen_name: str) -> None:
    """Refuse a canvas longer than the model's position limit (`models.rope.position_limit`:
    ``max_position_embeddings``, LLaDA's ``max_sequence_length``, or original x factor under a
    RoPE scaling): RoPE would run, but on positions the model never saw."""
    config = getattr(model, "config", None)
    limit = position_limit(config)
    if limit is not None and prompt_len + gen_length > limit:
        raise ValueError(
            f"prompt length {prompt_len:,} + {gen_name} {gen_length:,} = {prompt_len + gen_length:,} tokens, more "
            f"than the model's position limit of {limit:,} ({position_limit_note(config)}): shorten the prompt, "
            "generate fewer tokens or extend the positions with a RoPE scaling (docs/long_context.md)"
        )


def check_cache_with_sparsed(kv_cache: str | None, sparsed: SparseDConfig | None) -> None:
    """What a K/V cache cannot combine with: a selection at every step."""
    if kv_cache is None or sparsed is None:
        return
    if sparsed.reselect:
        raise ValueError("sparsed.reselect=True needs a full forward at every step; it cannot run with kv_cache")


def tensor_parallel_sync(model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> RankSync | None:
    """For a tensor-parallel model: check that every rank got the same prompt batch and return
    the RankSync through which the first rank's tokens are shared after each step."""
    sync = rank_sync(model)
    if sync is not None:
        sync.check_same("input_ids", x)
        sync.check_same("attention_mask", mask)
    return sync


def resolve_mask_id(model: nn.Module, mask_id: int | None, name: str) -> int:
    if mask_id is None:
        mask_id = getattr(getattr(model, "config", None), "mask_token_id", None)
        if mask_id is None:
            raise ValueError(f"{name} is None and model.config.mask_token_id is not set")
    return check_int(name, mask_id, 0)


class Runner:
    """Calls the model once per step with the fixed inputs and advances the SparseD state.

    With a ``BlockKVCache`` a call either refreshes (``window=None``: the whole sequence, its
    K/V kept) or runs only the positions ``[start, stop)`` of ``window`` against the cache.
    """

    def __init__(self, model, mask, position_ids, state: SparseDState | None, cfg: bool = False, cache=None):
        self.model, self.state, self.cache = model, state, cache
        self.mask = mask if mask is None or not cfg else torch.cat([mask, mask])
        self.position_ids = position_ids if position_ids is None or not cfg else torch.cat([position_ids] * 2)
        self.kwargs = {} if state is None else {"sparsed_state": state}
        if cache is not None:
            self.kwargs["kv_cache"] = cache
        self.forwards = 0

    def __call__(self, x: torch.Tensor, keep: torch.Tensor, window: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B', L), keep (K,) sequence indices -> logits (B', K, V)."""
        position_ids = self.position_ids
        if self.cache is not None:
            if window is None:
                self.cache.refresh()
            else:
                start, stop = window
                self.cache.set_window(start, stop)
                x, keep = x[:, start:stop], keep - start
                position_ids = None if position_ids is None else position_ids[:, start:stop]
        logits = self.model(
            input_ids=x,
            attention_mask=self.mask,
            position_ids=position_ids,
            logits_to_keep=keep,
            **self.kwargs,
        ).logits
        if self.state is not None:
            self.state.advance()
        self.forwards += 1
        return logits


def cache_window(kv_cache: str, need: tuple[int, int], decoding_block: tuple[int, int], length: int):
    """Positions a cached step runs: the logits it needs and the decoding block whose tokens
    change; the rest of the sequence comes from the cache (``kv_cache="prefix"``: everything after
    the decoding block is run too).

    The window is the same with and without sparsed: a window that begins inside a tile of the
    selection's grid (SparseD's ``block_size``) gets zero query rows in front
    (`LayerSelection.window_mask`), so dense and sparse caching approximate the same way.
    """
    start = min(need[0], decoding_block[0])
    stop = length if kv_cache == "prefix" else max(need[1], decoding_block[1])
    return start, stop


def runs_full_forward(step_in_block: int, state: SparseDState | None) -> bool:
    """Whether a cached step runs the whole sequence: a block's first step, and the SparseD
    switch step (block selection needs every query row), which `cached_switch_step` puts on a
    block's first step whenever one is left."""
    return step_in_block == 0 or (state is not None and state.mode == "switch")


def start_generation(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    mask_id: int,
    gen_length: int,
    length_name: str,
    *,
    sparsed: SparseDConfig | None,
    steps: int | None,
    kv_cache: str | None,
    num_blocks: int,
    cfg: bool = False,
):
    """What both samplers do before their step loop: check the model, lay out the canvas, check
    the length (``length_name`` is the sampler's argument), agree across tensor-parallel ranks,
    and build the SparseD state, the K/V cache and the runner.

    Returns:
        (canvas x (B, P + gen_length), prompt_index (B, P + gen_length) bool, the RankSync or
        None, the SparseDState or None, the Runner).
    """
    check_model(model, sparsed)
    x, mask, position_ids, prompt_index = prepare_canvas(model, input_ids, attention_mask, mask_id, gen_length)
    check_length(model, input_ids.shape[1], gen_length, length_name)
    sync = tensor_parallel_sync(model, x, mask)
    check_cache_with_sparsed(kv_cache, sparsed)
    state = sparsed_state(sparsed, steps, input_ids.shape[1], kv_cache, num_blocks)
    cache = None if kv_cache is None else BlockKVCache(kv_cache)
    return x, prompt_index, sync, state, Runner(model, mask, position_ids, state, cfg=cfg, cache=cache)


def sparsed_state(
    sparsed: SparseDConfig | None, steps: int | None, gen_start: int, kv_cache: str | None, num_blocks: int
) -> SparseDState | None:
    """The generation's SparseDState (None without ``sparsed``). A cached fixed schedule switches
    at `cached_switch_step`; without a cache, or with threshold decoding (``steps`` None), the
    switch is the paper's step or `ThresholdClock`'s."""
    if sparsed is None:
        return None
    switch_at = None
    if kv_cache is not None and steps is not None:
        switch_at = cached_switch_step(sparsed.switch_step(steps), steps // num_blocks, num_blocks)
    return SparseDState(config=sparsed, steps=steps, gen_start=gen_start, switch_at=switch_at)


def cached_switch_step(paper_switch: int, steps_per_block: int, num_blocks: int) -> int:
    """The switch step of a cached fixed schedule: the first decoding block's first step at or
    after the paper's ``paper_switch`` (a refresh the cache runs anyway, so selecting costs no
    extra full forward, and at least ``skip`` of the steps stay dense); ``paper_switch`` itself
    when no block starts after it (then it refreshes once more)."""
    start = -(-paper_switch // steps_per_block) * steps_per_block
    return start if start < steps_per_block * num_blocks else paper_switch


def build_output(x, state, runner, history, return_dict_in_generate, block_steps):
    if not return_dict_in_generate:
        return x
    return DiffusionGenerationOutput(
        sequences=x,
        sparsed_state=state,
        num_forwards=runner.forwards,
        history=None if history is None else tuple(history),
        kv_cache=runner.cache,
        block_steps=tuple(block_steps),
    )
