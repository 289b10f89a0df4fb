"""Diffusion samplers for LLaDA and Dream that drive a SparseD step state.

Both follow the official samplers' semantics (LLaDA's ``generate.py``: semi-autoregressive
blocks, a fixed number of tokens unmasked per step; Dream's ``_sample``: the timestep schedule
``linspace(1, eps, steps + 1)``), rewritten so that the step loop has fixed shapes and no host
syncs:

- the LM head runs only on the positions being decoded (``logits_to_keep``): the current block
  for LLaDA, the generation region for Dream;
- LLaDA's per-step token counts are fixed per block (as in the official sampler) and known on
  the host, so top-k gets a Python int; Dream's depend on how many tokens are still masked, so
  they stay on the device and a rank comparison replaces top-k (k may differ per row);
- sampling works on the whole decoded region and selects with ``torch.where`` instead of
  gathering the masked positions with a data-dependent boolean index;
- nothing in the loop reads a value back to the host (no ``.item()``, ``.tolist()``, ``int()``
  of a device tensor), except under ``threshold`` decoding, whose steps read back one small
  tensor (the masks left, `ThresholdClock`) to end each block.
- under tensor parallelism (a model loaded with a TP plan) the first rank of the TP group
  decides every step's tokens and broadcasts them, so all ranks keep the same sequence
  whatever their generators hold (see ``tensor_parallel.py``).

Batches are LEFT padded: ``attention_mask`` (B, P) marks real prompt tokens; positions are
``cumsum(mask) - 1`` so a padded row computes what it would alone; pad tokens are never
changed. One transformers-internal sync remains: with padding, transformers' sdpa/eager mask
builders call ``padding_mask.all()`` once per forward (to skip an all-ones mask). A batch
without padding is detected once before the loop and runs with no mask at all.

Each sampler's loop stays whole, to be read side by side with its official counterpart. What both
share lives in `_shared` (canvas, runner, output), `arguments` (the argument rules, callable
before a model loads) and `_threshold` (threshold decoding).
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention._ranking import top_count
from ..attention.config import SparseDConfig
from ._shared import (
    DiffusionGenerationOutput,
    build_output,
    cache_window,
    check_cache_with_sparsed,
    resolve_mask_id,
    runs_full_forward,
    start_generation,
)
from ._threshold import ThresholdClock, parallel_rule
from .arguments import DREAM_ALGS, LLADA_REMASKING, check_dream_arguments, check_llada_arguments

__all__ = [
    "DREAM_ALGS",
    "LLADA_REMASKING",
    "DiffusionGenerationOutput",
    "check_cache_with_sparsed",
    "dream_generate",
    "llada_generate",
]


# ----------------------------------------------------------------------------------- LLaDA


def llada_transfer_schedule(masked: int, steps: int) -> list[int]:
    """Tokens unmasked at each of ``steps`` steps of one block (LLaDA's get_num_transfer_tokens):
    ``masked // steps`` each, the first ``masked % steps`` steps one more."""
    base, remainder = divmod(masked, steps)
    return [base + (1 if i < remainder else 0) for i in range(steps)]


def _gumbel_argmax(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    """argmax of LLaDA's ``exp(logits) / (-log u) ** T`` with u ~ U(0, 1) in float64.

    Taken in log form, ``logits - T * log(-log u)``: the same argmax without exp overflowing.
    """
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return (logits - temperature * torch.log(-torch.log(u))).argmax(-1)


@torch.no_grad()
def llada_generate(
    model: nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    steps: int | None = None,
    gen_length: int,
    block_length: int | None = None,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int | None = None,
    generator: torch.Generator | None = None,
    sparsed: SparseDConfig | None = None,
    kv_cache: str | None = None,
    threshold: float | None = None,
    factor: float | None = None,
    output_history: bool = False,
    return_dict_in_generate: bool = False,
) -> torch.LongTensor | DiffusionGenerationOutput:
    """LLaDA's semi-autoregressive masked-diffusion sampler.

    The ``gen_length`` mask tokens after the prompt are decoded block by block
    (``block_length`` each); every block gets ``steps / num_blocks`` steps, and each step
    unmasks the most confident (``"low_confidence"``: highest softmax probability of the
    predicted token; ``"random"``: random scores) of the block's masked tokens, in numbers
    fixed by :func:`llada_transfer_schedule`.

    Args:
        model: a bidirectional LM whose forward takes ``logits_to_keep`` (e.g. LLaDAModelLM).
        input_ids: (B, P) prompt token ids, LEFT padded.
        attention_mask: (B, P) 1 for real tokens, 0 for left padding; None: no padding.
        steps: denoising steps (= model forwards) in total; a multiple of the block count.
            None with ``threshold`` or ``factor``.
        gen_length: tokens to generate; a multiple of ``block_length``.
        block_length: tokens per semi-autoregressive block; None: ``gen_length`` (one block).
        temperature: Gumbel-max noise scale (float64); 0 is greedy.
        cfg_scale: classifier-free guidance; > 0 also runs the prompt replaced by mask tokens
            (in the same batched forward) and uses ``uncond + (cfg_scale + 1) * (cond - uncond)``.
        remasking: "low_confidence" or "random".
        mask_id: the mask token; None: ``model.config.mask_token_id``.
        generator: draws the noise (on the model's device), for reproducible sampling.
        sparsed: SparseD knobs; the model must use ``attn_implementation="sparsed"``. One
            SparseDState spans the whole generation (gen_start = P).
        kv_cache: None (every step runs the whole sequence), "prefix" or "dual" (see
            ``kv_cache.py``): the first step of each block refreshes every layer's K/V; the
            block's other steps run only the block ("dual") or the block and what follows it
            ("prefix") against them. With ``sparsed`` the switch (which needs every row)
            moves to the first block start at or after the paper's switch step, a refresh the
            cache runs anyway; only when no block starts after it does it refresh once more.
            Not with ``cfg_scale > 0``.
        threshold: confidence-threshold parallel decoding (Fast-dLLM's rule) instead of a
            fixed schedule: every step unmasks each masked token of the block whose confidence
            (``"low_confidence"``'s probability) reaches ``threshold``, and at least the most
            confident one per row, until the block holds no mask (at most ``block_length``
            steps). Rows of a padded batch finish at different steps; a finished row stays as
            it is. Reads back one small tensor per step (to end the block). With ``sparsed``
            the switch follows `ThresholdClock`.
        factor: Fast-dLLM's factor rule instead of ``threshold`` (same steps, same bookkeeping):
            with the masked confidences sorted from the highest, each step unmasks the n most
            confident for the largest n whose n-th confidence c_n (and every one before it)
            has (n + 1)(1 - c_n) <= ``factor``, at least one per row (`_threshold.factor_transfer`).
        output_history / return_dict_in_generate: see :class:`DiffusionGenerationOutput`.

    Returns:
        (B, P + gen_length) token ids, or a DiffusionGenerationOutput.
    """
    a = check_llada_arguments(
        gen_length=gen_length, steps=steps, block_length=block_length, threshold=threshold,
        temperature=temperature, cfg_scale=cfg_scale, remasking=remasking, kv_cache=kv_cache, factor=factor,
    )  # fmt: skip
    steps, threshold, gen_length, block_length, num_blocks, temperature, cfg_scale, kv_cache = a[:8]
    rule = parallel_rule(threshold, a.factor)
    mask_id = resolve_mask_id(model, mask_id, "mask_id")
    x, prompt_index, sync, state, run = start_generation(
        model, input_ids, attention_mask, mask_id, gen_length, "gen_length",
        sparsed=sparsed, steps=steps, kv_cache=kv_cache, num_blocks=num_blocks, cfg=cfg_scale > 0,
    )  # fmt: skip
    prompt_len = input_ids.shape[1]
    # Every block starts fully masked (the prompt holds no mask token), so a fixed schedule is
    # the same for all rows and all blocks, and known here on the host.
    schedule = None if steps is None else llada_transfer_schedule(block_length, steps // num_blocks)
    clock = None if rule is None else ThresholdClock(state, mask_id, prompt_len, kv_cache is not None)
    history = [] if output_history else None
    block_steps = []

    for b in range(num_blocks):
        start = prompt_len + b * block_length
        keep = torch.arange(start, start + block_length, device=x.device)
        stop = start + block_length
        window = None if kv_cache is None else cache_window(kv_cache, (start, stop), (start, stop), x.shape[1])
        # A fixed schedule's token counts, or threshold decoding's budget of block_length steps.
        counts = schedule if clock is None else [None] * block_length
        for i, k in enumerate(counts):
            if clock is not None:
                clock.place_switch(i == 0, num_blocks - 1 - b)
            block = x[:, start : start + block_length]  # (B, BL)
            if cfg_scale > 0:
                uncond = x.masked_fill(prompt_index, mask_id)
                cond_logits, uncond_logits = run(torch.cat([x, uncond]), keep).chunk(2)
                logits = uncond_logits + (cfg_scale + 1) * (cond_logits - uncond_logits)
            else:
                logits = run(x, keep, None if runs_full_forward(i, state) else window)  # (B, BL, V)
            if k == 0:  # more steps than tokens: this step unmasks nothing
                if history is not None:
                    history.append(x.clone())
                continue
            x0 = _gumbel_argmax(logits, temperature, generator)  # (B, BL)
            if remasking == "low_confidence":
                probs = torch.softmax(logits.float(), dim=-1)
                score = torch.gather(probs, -1, x0[..., None]).squeeze(-1)
            else:
                score = torch.rand(x0.shape, device=x0.device, generator=generator)
            is_masked = block == mask_id
            if k is None:
                transfer = rule(score, is_masked)
            else:
                score = torch.where(is_masked, score, -torch.inf)
                chosen = torch.topk(score, k, dim=-1).indices  # k <= masked count: only masked picked
                transfer = torch.zeros_like(is_masked).scatter_(-1, chosen, True)
            block = torch.where(transfer, x0, block)
            # Tensor parallel: the first rank's draw decides (ranks' generators may differ).
            x[:, start : start + block_length] = block if sync is None else sync.share(block)
            if history is not None:
                history.append(x.clone())
            if clock is not None and clock.block_done(x, start, stop):
                break
        block_steps.append(i + 1)
    return build_output(x, state, run, history, return_dict_in_generate, block_steps)


# ----------------------------------------------------------------------------------- Dream


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (at least one)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # shift right: keep the token crossing top_p
    remove[..., 0] = False
    remove = torch.zeros_like(remove).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def _top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def _sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    generator: torch.Generator | None,
    confidence_kind: str = "prob",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's sample_tokens on (B, G, V) logits -> confidence (B, G) fp32, tokens (B, G).

    confidence_kind: "prob" (probability of the drawn token), "margin" (top-1 minus top-2
    probability) or "neg_entropy" (sum p log p).
    """
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _top_p_filter(logits, top_p)
    if top_k is not None:
        logits = _top_k_filter(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        flat = probs.reshape(-1, probs.shape[-1])
        x0 = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
        confidence = torch.gather(probs, -1, x0[..., None]).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if confidence_kind == "margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        confidence = top2[..., 0] - top2[..., 1]
    elif confidence_kind == "neg_entropy":
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


@torch.no_grad()
def dream_generate(
    model: nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    steps: int | None = None,
    max_new_tokens: int,
    alg: str = "origin",
    alg_temp: float | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    eps: float = 1e-3,
    mask_token_id: int | None = None,
    generator: torch.Generator | None = None,
    sparsed: SparseDConfig | None = None,
    block_length: int | None = None,
    kv_cache: str | None = None,
    threshold: float | None = None,
    factor: float | None = None,
    output_history: bool = False,
    return_dict_in_generate: bool = False,
) -> torch.LongTensor | DiffusionGenerationOutput:
    """Dream's masked-diffusion sampler (``DreamGenerationMixin._sample``).

    The ``max_new_tokens`` mask tokens after the prompt are decoded over ``steps`` steps on the
    timestep grid ``linspace(1, eps, steps + 1)``. Logits are shifted one position right
    (position i is predicted by the logits at i - 1). ``alg="origin"`` unmasks each masked token
    with probability ``1 - s / t``; the other algorithms unmask the ``int(n_masked * (1 - s / t))``
    most confident masked tokens (all of them at the last step), or sample that many positions
    from ``softmax(confidence / alg_temp)`` when ``alg_temp`` > 0.

    Args:
        model: a bidirectional LM whose forward takes ``logits_to_keep`` (e.g. DreamModel).
        input_ids: (B, P) prompt token ids, LEFT padded.
        attention_mask: (B, P) 1 for real tokens, 0 for left padding; None: no padding.
        steps: denoising steps (= model forwards). None with ``threshold`` or ``factor``.
        max_new_tokens: tokens to generate.
        alg: "origin", "maskgit_plus", "topk_margin" or "entropy".
        alg_temp: temperature of the position sampling (confidence algorithms); None/0: top-k.
        temperature, top_p, top_k: token sampling; temperature 0 is greedy.
        eps: last timestep, in (0, 1).
        mask_token_id: the mask token; None: ``model.config.mask_token_id``.
        generator: draws the noise (on the model's device), for reproducible sampling.
        sparsed: SparseD knobs; the model must use ``attn_implementation="sparsed"``. One
            SparseDState spans the whole generation (gen_start = P).
        block_length: None (Dream's sampler: the whole generation is one region) or tokens
            per semi-autoregressive block, as LLaDA decodes: block after block, each with
            ``steps / num_blocks`` steps on its own grid ``linspace(1, eps, steps_per_block + 1)``.
        kv_cache: None, "prefix" or "dual", as in :func:`llada_generate`; needs
            ``block_length`` (without blocks nothing is finished early enough to cache).
        threshold: confidence-threshold parallel decoding instead of the timestep grid, as in
            :func:`llada_generate`: each step unmasks every masked token of the block (the whole
            generation without ``block_length``) whose probability reaches ``threshold``, and at
            least the most confident one per row, until none is left. Needs
            ``alg="maskgit_plus"`` (the probability confidence) and no ``alg_temp``.
        factor: Fast-dLLM's factor rule instead of ``threshold``, as in :func:`llada_generate`
            (the same needs).
        output_history / return_dict_in_generate: see :class:`DiffusionGenerationOutput`.

    Returns:
        (B, P + max_new_tokens) token ids, or a DiffusionGenerationOutput.
    """
    a = check_dream_arguments(
        max_new_tokens=max_new_tokens, steps=steps, block_length=block_length, threshold=threshold, alg=alg,
        alg_temp=alg_temp, temperature=temperature, top_p=top_p, top_k=top_k, eps=eps, kv_cache=kv_cache,
        factor=factor,
    )  # fmt: skip
    steps, threshold, max_new_tokens, block_length, num_blocks = a[:5]
    alg_temp, temperature, top_p, top_k, eps, kv_cache = a[5:11]
    rule = parallel_rule(threshold, a.factor)
    mask_token_id = resolve_mask_id(model, mask_token_id, "mask_token_id")
    x, _, sync, state, run = start_generation(
        model, input_ids, attention_mask, mask_token_id, max_new_tokens, "max_new_tokens",
        sparsed=sparsed, steps=steps, kv_cache=kv_cache, num_blocks=num_blocks,
    )  # fmt: skip
    prompt_len = input_ids.shape[1]
    clock = None if rule is None else ThresholdClock(state, mask_token_id, prompt_len, kv_cache is not None)
    # Threshold decoding's budget is block_length steps per block; a fixed schedule's grid stays
    # on the host: each step's ratio is a Python float (exactly the float32 value the official
    # sampler computes on the device), so nothing is read back.
    steps_per_block = block_length if steps is None else steps // num_blocks
    timesteps = torch.linspace(1, eps, steps_per_block + 1, dtype=torch.float32)
    kind = {"topk_margin": "margin", "entropy": "neg_entropy"}.get(alg, "prob")
    history = [] if output_history else None
    block_steps = []

    for b in range(num_blocks):
        start = prompt_len + b * block_length
        stop = start + block_length
        # Shifted logits: the token at position j is predicted at j - 1, so the block [start,
        # stop) needs the LM head on [start - 1, stop - 1) (start >= 1: the prompt is never empty).
        need = (start - 1, stop - 1)
        keep = torch.arange(*need, device=x.device)
        window = None if kv_cache is None else cache_window(kv_cache, need, (start, stop), x.shape[1])
        for i in range(steps_per_block):
            if clock is not None:
                clock.place_switch(i == 0, num_blocks - 1 - b)
            region = x[:, start:stop]  # (B, BL)
            is_masked = region == mask_token_id
            logits = run(x, keep, None if runs_full_forward(i, state) else window)  # (B, BL, V), shifted by `keep`
            last = i == steps_per_block - 1
            ratio = float(1 - timesteps[i + 1] / timesteps[i]) if not last else 1.0
            if clock is not None:
                confidence, x0 = _sample_tokens(logits, temperature, top_p, top_k, generator, kind)
                region = torch.where(rule(confidence, is_masked), x0, region)
            elif alg == "origin":
                _, x0 = _sample_tokens(logits, temperature, top_p, top_k, generator)
                draw = torch.rand(is_masked.shape, device=x.device, generator=generator)
                region = torch.where(is_masked & (draw < ratio), x0, region)
            else:
                confidence, x0 = _sample_tokens(logits, temperature, top_p, top_k, generator, kind)
                # Tokens to unmask, per row, on the device: int(n_masked * (1 - s / t)) in float32,
                # all of them at the last step. (The official sampler averages n_masked over the
                # batch; rows only differ when the model predicts the mask token itself.)
                n_masked = is_masked.sum(-1, keepdim=True)  # (B, 1)
                count = (n_masked.float() * ratio).long() if not last else n_masked
                score = torch.where(is_masked, confidence, -torch.inf)
                if alg_temp > 0:
                    # Sampling positions without replacement from softmax(confidence / alg_temp)
                    # (the official torch.multinomial) is the top-k of log-weights plus Gumbel
                    # noise; float64 keeps confidence / alg_temp from underflowing.
                    u = torch.rand(score.shape, dtype=torch.float64, device=x.device, generator=generator)
                    score = score.double() / alg_temp - torch.log(-torch.log(u))
                region = torch.where(top_count(score, count) & is_masked, x0, region)
            # Tensor parallel: the first rank's draw decides (ranks' generators may differ).
            x[:, start:stop] = region if sync is None else sync.share(region)
            if history is not None:
                history.append(x.clone())
            if clock is not None and clock.block_done(x, start, stop):
                break
        block_steps.append(i + 1)
    return build_output(x, state, run, history, return_dict_in_generate, block_steps)
