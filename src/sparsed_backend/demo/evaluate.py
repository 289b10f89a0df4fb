"""Answering retrieval prompts with the samplers (LLaDA's; block diffusion's for a block-diffusion
Qwen3), and the statistics reported about them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .._validate import check_int
from ..attention.config import SparseDConfig
from ..attention.prefix_selection import PrefixSparseConfig, PrefixSparseState
from ..attention.state import SparseDState
from .task import VALUE_LEN, RetrievalPrompts, exact_match

__all__ = ["Answers", "answer_blockdiff_prompts", "answer_prompts", "generation_length", "wilson_interval"]


def generation_length(answer_len: int, block_length: int) -> int:
    """Generated tokens for an answer of ``answer_len``: rounded up to whole decoding blocks (the
    tokens past the answer are decoded too, and not scored)."""
    check_int("answer_len", answer_len, 1)
    return -(-answer_len // check_int("block_length", block_length, 1)) * block_length


@dataclass
class Answers:
    """What `answer_prompts` and `answer_blockdiff_prompts` return.

    Attributes:
        generated: (B, A) generated answer tokens (A = the answers' length, ``n_keys * VALUE_LEN``).
        correct: (B,) bool, exact match.
        states: the SparseDState (block diffusion: PrefixSparseState) of every batch (empty for dense).
        forwards: model forwards over all batches (denoising steps, summed).
    """

    generated: torch.Tensor
    correct: torch.Tensor
    states: list[SparseDState | PrefixSparseState]
    forwards: int = 0

    @property
    def n_correct(self) -> int:
        return int(self.correct.sum())

    def density(self) -> float:
        """Mean kept share of attendable key blocks over the batches (1.0 for dense)."""
        # A batch that never reached its switch step (threshold decoding can finish first) ran dense.
        dens = [1.0 if d is None else d for d in (s.density() for s in self.states)]
        return sum(dens) / len(dens) if dens else 1.0


@torch.inference_mode()
def answer_prompts(
    model: nn.Module,
    prompts: RetrievalPrompts,
    *,
    sparsed: SparseDConfig | None = None,
    batch: int = 8,
    steps: int | None = None,
    block_length: int = VALUE_LEN,
    kv_cache: str | None = None,
    threshold: float | None = None,
    factor: float | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Answers:
    """Greedy low-confidence decoding of every prompt's answer.

    The answer (``prompts.answers.shape[1]`` tokens: VALUE_LEN per asked key) is generated in
    blocks of ``block_length``, ``generation_length`` tokens in all; exact match reads the
    first A of them. A single-key prompt with the defaults is one block of VALUE_LEN tokens.

    Args:
        model: a LLaDA model; with ``sparsed`` it must use ``attn_implementation="sparsed"``.
        prompts: from `sample_prompts`; moved to the model's device.
        sparsed: SparseD knobs, or None for dense attention.
        batch: prompts per sampler call.
        steps: denoising steps in all; None: one per generated token (VALUE_LEN for a
            single-key answer).
        block_length: tokens per decoding block (VALUE_LEN: one block per asked key).
        kv_cache: None, "prefix" or "dual" (see `llada_generate`).
        threshold: confidence-threshold decoding in place of ``steps`` (see `llada_generate`);
            ``Answers.forwards`` then counts the steps taken.
        factor: the factor rule in place of ``steps`` (see `llada_generate`), the same way.
        on_batch: called with the number of prompts done after each call (progress bars).
    """
    from ..sampling.generation import llada_generate

    gen_length = generation_length(prompts.answers.shape[1], block_length)
    steps = None if threshold is not None or factor is not None else gen_length if steps is None else steps

    def generate(ids: torch.Tensor):
        return llada_generate(
            model, ids, steps=steps, gen_length=gen_length, block_length=block_length, sparsed=sparsed,
            kv_cache=kv_cache, threshold=threshold, factor=factor, return_dict_in_generate=True,
        )  # fmt: skip

    return _answer_in_batches(model, prompts, batch, on_batch, generate)


@torch.inference_mode()
def answer_blockdiff_prompts(
    model: nn.Module,
    prompts: RetrievalPrompts,
    *,
    sparsed: PrefixSparseConfig | None = None,
    batch: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> Answers:
    """Greedy decoding of every prompt's answer with `blockdiff_generate`, one token per step, in
    decoding blocks of the model's ``config.block_size`` (its training block), masks from
    ``config.mask_token_id``.

    Args:
        model: a block-diffusion Qwen3 (``training/train_retrieval.py --arch qwen3-blockdiff``);
            with ``sparsed`` it must use ``attn_implementation="sparsed"``.
        prompts: from `sample_prompts`; moved to the model's device.
        sparsed: sparse prefix selection, or None for dense attention.
        batch: prompts per sampler call.
        on_batch: called with the number of prompts done after each call (progress bars).
    """
    from ..sampling.block_diffusion import blockdiff_generate

    block = check_int("model.config.block_size", getattr(model.config, "block_size", None), 1)

    def generate(ids: torch.Tensor):
        return blockdiff_generate(
            model, ids, gen_length=prompts.answers.shape[1], block_length=block, denoising_steps=block,
            mask_id=model.config.mask_token_id, sparsed=sparsed, return_dict_in_generate=True,
        )  # fmt: skip

    return _answer_in_batches(model, prompts, batch, on_batch, generate)


def _answer_in_batches(model: nn.Module, prompts: RetrievalPrompts, batch: int, on_batch, generate) -> Answers:
    """Run ``generate`` (ids -> DiffusionGenerationOutput) over ``batch`` prompts at a time and
    score the first answer-length generated tokens."""
    ids = prompts.input_ids.to(next(model.parameters()).device)
    answer_len = prompts.answers.shape[1]
    outs, states, forwards = [], [], 0
    for i in range(0, ids.shape[0], batch):
        out = generate(ids[i : i + batch])
        forwards += out.num_forwards
        outs.append(out.sequences[:, ids.shape[1] : ids.shape[1] + answer_len].cpu())
        if out.sparsed_state is not None:
            states.append(out.sparsed_state)
        if on_batch is not None:
            on_batch(outs[-1].shape[0])
    generated = torch.cat(outs)
    return Answers(generated, exact_match(generated, prompts.answers.cpu()), states, forwards)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n (95% for z = 1.96)."""
    if n <= 0:
        raise ValueError(f"n must be >= 1, got {n}")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)
