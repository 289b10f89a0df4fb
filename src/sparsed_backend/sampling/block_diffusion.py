"""Block-diffusion sampling (SDAR) for native Qwen3-layout models, with a preallocated K/V cache.

SDAR checkpoints (JetAstra/SDAR) load into transformers' ``Qwen3ForCausalLM`` as they are. They
are trained block-causally: inside a block of ``block_length`` tokens attention is
bidirectional, and a block sees every block before it. Sampling follows SDAR's ``generate.py``
(``block_diffusion_generate``):

1. The prompt's whole blocks are *prefilled* (block-causal mask, in chunks of whole blocks) and
   their K/V committed. Blocks are counted from the first prompt token, so the prompt's last
   ``P % block_length`` tokens open the first decoded block and stay fixed in it.
2. Each decoded block starts as mask tokens and is *denoised*: every step runs the model on the
   block alone against the committed K/V, samples a token and its probability (the
   confidence) at every position, and unmasks some masked positions (``remasking``). The
   number per step follows LLaDA's schedule for ``block_length`` tokens over
   ``denoising_steps`` steps (`llada_transfer_schedule`).
3. A block with no mask left is *committed*: one more forward on its final tokens stores its
   K/V. With ``eos_token_id`` a row stops after the block in which it first generated one; the
   positions after that block stay mask tokens (as SDAR leaves them).

What differs from SDAR's sampler, on purpose:

- batches: SDAR's sampler takes one prompt. Here rows are LEFT padded; each row's blocks are
  counted from its own first token (its full prompt blocks are right-aligned under the longest
  row's, so all rows denoise the same canvas block at a time), positions restart at 0 for every
  row, padding is never attended, and a row computes what it would alone. With one generator per
  row (``generator=[...]``) even sampled rows equal their runs alone.
- a step never unmasks more positions than are masked. SDAR takes ``topk`` over confidences
  that are -inf off the mask, so a step asked to unmask more tokens than are left (steps
  < block_length with a partly prefilled first block, or after ``low_confidence_dynamic``
  unmasked extra tokens) also rewrites already decoded (or prompt) tokens. Our reference cases
  are checked not to reach that path.
- ``temperature=0`` is greedy (argmax; the confidence is the softmax probability). SDAR divides
  by the temperature, so it has no greedy mode (its default is 1.0).
- sampling runs in float32 whatever the model's dtype (SDAR softmaxes in the logits' dtype).
- if the model itself writes the mask token (the official samplers write it like any other), a
  block can still hold masks after ``denoising_steps`` steps, where SDAR indexes past its
  schedule and fails. Here one more step decodes every position still masked, with the mask
  token ruled out.
- SDAR's ``entropy_bounded`` strategy is not offered: at the commit it was read from
  (see tests/fixtures/sdar_reference) it sums the entropy over the block and uses a tensor
  before defining it.

The model is called with a 4D mask built here: bool for "sdpa", additive float for "eager"
(transformers' eager attention adds the mask to the scores, so a bool mask there would be
silently wrong) and "sparsed". With ``sparsed=PrefixSparseConfig(...)`` (the "sparsed"
attention) a `prefix_selection.PrefixSparseState` travels to every forward: each block's first
denoising step keeps every head's heaviest prefix blocks and the later steps read only those.

About 400 lines: SDAR's sampling rules (token draw, remasking) stay beside the one loop that
uses them, to be read against SDAR's ``generate.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import ArgumentTypeError, ArgumentValueError, check_float, check_int
from .._warn import warn_once
from ..attention import policy
from ..attention._ranking import top_count
from ..attention.prefix_selection import PrefixSparseConfig, PrefixSparseState
from ._shared import DiffusionGenerationOutput, check_length, prepare_canvas, resolve_mask_id
from .block_cache import BlockDiffusionKVCache, cache_keyword
from .decode_graphs import GraphedDecoder
from .generation import llada_transfer_schedule

__all__ = ["BLOCKDIFF_REMASKING", "CUDA_GRAPH_MODES", "blockdiff_generate", "block_causal_mask"]

BLOCKDIFF_REMASKING = ("low_confidence_static", "low_confidence_dynamic", "sequential")
CUDA_GRAPH_MODES = ("piecewise", "whole")  # True is "piecewise"
MASK_IMPLEMENTATIONS = ("sdpa", "eager", "sparsed")


def block_causal_mask(valid: torch.Tensor, start: int, stop: int, block_length: int) -> torch.Tensor:
    """Which keys each query of positions ``[start, stop)`` attends, against keys ``[0, stop)``.

    Args:
        valid: (B, S) bool, False on left padding, S >= stop.
    Returns:
        (B, 1, stop - start, stop) bool: key j is kept for query i when j's block is not after
        i's block and j is not padding; a padding query keeps itself (an empty row would give
        NaN in SDPA, which its K/V would then carry into real rows' sums).
    """
    device = valid.device
    q = torch.arange(start, stop, device=device)[:, None]
    k = torch.arange(stop, device=device)[None, :]
    causal = (k // block_length) <= (q // block_length)  # (Lq, S)
    keep = causal[None, None] & valid[:, None, None, :stop]
    return keep | (k == q)[None, None]


def whole_scoring_refusal(config: PrefixSparseConfig) -> str | None:
    """Why ``cuda_graphs="whole"`` cannot capture a selecting step with ``config`` (its blocks
    are scored by the fused kernel and chosen inside the graph); None when it can."""
    if config.scorer != "fused":
        return f"they score with scorer='fused' only, got scorer={config.scorer!r}"
    if config.pattern == "random":
        return "pattern='random' draws its blocks on the host"
    return None


def _implementation_mask(keep: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    if implementation == "eager":
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    return keep


class _BlockRunner:
    """Calls the model on one stretch of the canvas, with the cache announced for it; forwards
    of one block's length go through ``graphs`` (a `GraphedDecoder`) when given.

    Every forward runs SDPA in the order of `policy.decode_kernels` (on CUDA FlashAttention-2
    first, then cuDNN), whatever the attention implementation: "sparsed" attends in that order
    in its dense and selecting steps, so dense and sparse runs share the prefill's and the
    commits' kernels (transformers' SDPA on its own order took a kernel that asked for 48 GiB
    at a 32k prefix, batch 8, where the sparse run's prefill fit: blockdiff_session12.md)."""

    def __init__(
        self,
        model: nn.Module,
        cache: BlockDiffusionKVCache,
        dtype: torch.dtype,
        state: PrefixSparseState | None,
        graphs: GraphedDecoder | None = None,
        padded: bool = True,
    ) -> None:
        self.model, self.cache, self.dtype, self.graphs, self.state = model, cache, dtype, graphs, state
        self.padded = padded  # any row left padded: some keys are never attended
        self.implementation = model.config._attn_implementation
        # What the attention gets besides Q/K/V and the mask: the sparse prefix selection's state.
        self.attention_kwargs = {} if state is None else {"prefix_state": state}

    def __call__(self, forward, ids, positions, keep, logits: bool, prefill: bool = False) -> torch.Tensor | None:
        """ids, positions (B, n); keep (B, 1, n, S) bool -> logits (B, n, V), or None when
        ``logits`` is False (a commit: only its K/V are wanted). ``prefill``: a chunk of the
        prompt, which always runs the model's forward (a chunk of one block may hold a row's
        padding as queries, which the graphs' one key mask per block does not describe)."""
        self.cache.prepare(forward, ids.shape[1])
        mask = _implementation_mask(keep, self.implementation, self.dtype)
        if self.graphs is not None and not prefill and ids.shape[1] == self.graphs.tokens:
            graphs, state, key_valid = self.graphs, self.state, keep[:, 0, -1]  # a block's queries share keys
            if state is not None and state.mode == "sparse":  # a sparse step or commit
                return graphs.sparse_step(ids, positions, key_valid, self.cache, state, logits=logits)
            if graphs.whole and (state is None or state.mode == "dense"):  # a dense step or commit
                return graphs.dense_step(ids, positions, key_valid, self.cache, padded=self.padded, logits=logits)
            if graphs.whole and whole_scoring_refusal(state.config) is None:  # a selecting step
                return graphs.score_step(ids, positions, key_valid, self.cache, state, padded=self.padded)
            # One block with no padding in the batch attends every key: no mask.
            mask = mask if self.padded else None
            return self.graphs(ids, positions, mask, self.cache, logits=logits, **self.attention_kwargs)
        with policy.decode_kernels(ids):  # steers SDPA by the device of its argument
            out = self.model(
                input_ids=ids,
                position_ids=positions,
                attention_mask=mask,
                logits_to_keep=0 if logits else 1,
                use_cache=True,
                **{cache_keyword(self.model): self.cache},
                **self.attention_kwargs,
            )
        return out.logits if logits else None


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generators: list[torch.Generator | None],
    rows: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """A token and its probability at every position, as SDAR samples them.

    Logits are divided by ``temperature`` (not at 0 or 1), cut to the ``top_k`` largest (0: all)
    and to the smallest set whose probability passes ``top_p`` (the first token always kept),
    then softmaxed. ``temperature > 0`` draws one token per position (``torch.multinomial`` on
    each row's (L, V) probabilities with that row's generator, rows in order, only ``rows``);
    ``temperature == 0`` takes the argmax.

    Args:
        logits: (B, L, V).
    Returns:
        tokens (B, L) long and their probabilities (B, L) float32; rows not in ``rows`` hold
        argmax tokens when sampling (never used).
    """
    logits = logits.float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        past = torch.softmax(ordered, dim=-1).cumsum(-1) > top_p
        past = F.pad(past[..., :-1], (1, 0), value=False)  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(past).scatter(-1, order, past), -torch.inf)
    probs = torch.softmax(logits, dim=-1)  # (B, L, V)
    tokens = probs.argmax(-1)
    if temperature > 0:
        for r in rows:
            tokens[r] = torch.multinomial(probs[r], 1, generator=generators[r]).squeeze(-1)
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)


def choose_transfer(
    remasking: str, confidence: torch.Tensor, masked: torch.Tensor, count: int, threshold: float | None
) -> torch.Tensor:
    """(B, L) bool: the masked positions a step unmasks.

    ``"low_confidence_static"``: the ``count`` most confident; ``"low_confidence_dynamic"``: every
    one whose confidence exceeds ``threshold`` if there are at least ``count`` of them, else the
    ``count`` most confident; ``"sequential"``: the first ``count``. Never more than are masked.

    Args:
        confidence: (B, L) the sampled tokens' probabilities.
        masked: (B, L) bool, the positions still masked.
    """
    if remasking == "sequential":
        order = -torch.arange(masked.shape[-1], device=masked.device, dtype=torch.float32)
        score = torch.where(masked, order, -torch.inf)
    else:
        score = torch.where(masked, confidence, -torch.inf)
    chosen = top_count(score, count) & masked
    if remasking == "low_confidence_dynamic":
        high = masked & (confidence > threshold)
        chosen = torch.where(high.sum(-1, keepdim=True) >= count, high, chosen)
    return chosen


def planned_steps(masked: list[int], schedule: list[int]) -> int:
    """Denoising steps a block takes when every step unmasks its scheduled count: until the row
    with the most masked positions (``masked``, one count per row) has none left. A row whose
    model writes the mask token itself takes more; fewer are not possible (a step never unmasks
    more than its count), so the sampler may run this many steps without reading back."""
    most, done, total = max(masked), 0, 0
    for count in schedule:
        if total >= most:
            break
        total, done = total + count, done + 1
    return done


def _check_arguments(remasking, threshold, temperature, top_k, top_p, eos_token_id, mask_id, generator, batch):
    if remasking not in BLOCKDIFF_REMASKING:
        raise ArgumentValueError("remasking", f"remasking must be one of {BLOCKDIFF_REMASKING}, got {remasking!r}")
    if remasking == "low_confidence_dynamic":
        if threshold is None:
            raise ArgumentValueError(
                "threshold", "remasking='low_confidence_dynamic' needs a threshold in [0, 1] (SDAR uses 0.85)"
            )
        threshold = check_float("threshold", threshold, 0.0, 1.0)
    elif threshold is not None:
        raise ArgumentValueError(
            "threshold", f"threshold is only used by remasking='low_confidence_dynamic', got remasking={remasking!r}"
        )
    check_float("temperature", temperature)
    check_int("top_k", top_k, 0)
    if check_float("top_p", top_p, 0.0, 1.0) == 0.0:
        raise ArgumentValueError("top_p", "top_p must be in (0, 1], got 0.0")
    if eos_token_id is None:
        eos = []
    elif isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool):
        eos = [eos_token_id]
    elif isinstance(eos_token_id, Sequence) and not isinstance(eos_token_id, str):
        eos = list(eos_token_id)
    else:
        raise ArgumentTypeError(
            "eos_token_id",
            f"eos_token_id must be None, an int or a sequence of ints, got {type(eos_token_id).__name__}",
        )
    for token in eos:
        check_int("eos_token_id", token, 0)
        if token == mask_id:
            raise ArgumentValueError("eos_token_id", f"eos_token_id must not be the mask token {mask_id}")
    if generator is None or isinstance(generator, torch.Generator):
        generators = [generator] * batch
    elif isinstance(generator, Sequence) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != batch:
            raise ArgumentValueError(
                "generator", f"generator: one per row expected, got {len(generator)} for a batch of {batch}"
            )
        generators = list(generator)
    else:
        raise ArgumentTypeError(
            "generator",
            f"generator must be None, a torch.Generator or a sequence of them (one per row), got {generator!r}",
        )
    return threshold, eos, generators


@torch.no_grad()
def blockdiff_generate(
    model: nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    gen_length: int,
    block_length: int,
    denoising_steps: int,
    remasking: str = "low_confidence_static",
    threshold: float | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    mask_id: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    sparsed: PrefixSparseConfig | None = None,
    prefill_chunk: int = 4096,
    cuda_graphs: bool | str = False,
    return_dict_in_generate: bool = False,
) -> torch.LongTensor | DiffusionGenerationOutput:
    """SDAR's block-diffusion sampler on a Qwen3-layout model (see the module docstring).

    Args:
        model: a causal-LM-shaped model taking ``position_ids``, a 4D ``attention_mask``,
            ``logits_to_keep`` and a cache (``Qwen3ForCausalLM`` with SDAR weights), loaded
            with ``attn_implementation`` "sdpa" or "eager".
        input_ids: (B, P) prompt token ids, LEFT padded.
        attention_mask: (B, P) 1 for real tokens, 0 for left padding; None: no padding.
        gen_length: tokens to generate after each prompt (the last block is decoded whole and
            cut).
        block_length: tokens per block (the model's training ``block_size``; SDAR uses 4).
        denoising_steps: steps per block (SDAR: 4); unmasks ``block_length / denoising_steps``
            tokens per step (the first ``block_length % denoising_steps`` steps one more).
        remasking: "low_confidence_static", "low_confidence_dynamic" or "sequential"
            (`choose_transfer`).
        threshold: the confidence above which ``"low_confidence_dynamic"`` unmasks every token
            at once; required by it and refused otherwise.
        temperature, top_k, top_p: sampling (`sample_tokens`); temperature 0 is greedy.
        mask_id: the mask token; None: ``model.config.mask_token_id``.
        eos_token_id: stop token(s): a row stops after the block holding its first one.
        generator: draws the samples; one generator for the batch, or one per row (rows then
            sample as they would alone); None: torch's global generator (as SDAR).
        sparsed: sparse prefix selection (`prefix_selection`): at each block's first denoising
            step every head keeps its heaviest prefix blocks, and the block's later steps attend
            to those and the block; the prefill stays exact, and the commits too unless
            ``sparsed.sparse_commit``. Needs the model loaded with
            ``attn_implementation="sparsed"``. None: exact attention throughout.
        prefill_chunk: prompt tokens per prefill forward (rounded down to whole blocks, at
            least one block); a long prompt is prefilled in several commits, each with a
            (B, 1, chunk, keys) mask instead of one (B, 1, P, P) mask.
        cuda_graphs: True or "piecewise": run the denoising and commit forwards through CUDA
            graphs around the eager attention (`decode_graphs.GraphedDecoder`, captured once
            per call), and with ``sparsed`` each block's sparse steps as one whole-forward
            graph: the same computation with a fraction of the launch time. When no row is
            padded, a block's forwards attend without a mask (every key is attendable), so SDPA
            may take FlashAttention-2 (same attention, different rounding from the masked
            call). "whole": every denoising step and commit is one graph, the exact ones
            attending through the split-KV decode kernel (`dense_decode_attention`), and with
            ``sparsed`` the selecting steps too (``scorer="fused"``, pattern "topk" or "local";
            otherwise they run piecewise, said once); needs the decode kernel (Triton, a
            power-of-two head_dim). Needs a Qwen3-layout model on a CUDA device (else
            ArgumentValueError). The prefill runs the model's forward.
        return_dict_in_generate: return a DiffusionGenerationOutput (``num_forwards``: prefill,
            denoising and commit forwards; ``block_steps``: denoising steps of each block;
            ``sparsed_state``: the PrefixSparseState, with the kept density, or None).

    Returns:
        (B, P + gen_length): the prompt as given, then each row's ``gen_length`` tokens (mask
        tokens after a row's stop); or a DiffusionGenerationOutput.
    """
    gen_length = check_int("gen_length", gen_length, 1)
    block_length = check_int("block_length", block_length, 1)
    steps = check_int("denoising_steps", denoising_steps, 1)
    prefill_chunk = check_int("prefill_chunk", prefill_chunk, 1)
    mask_id = resolve_mask_id(model, mask_id, "mask_id")
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in MASK_IMPLEMENTATIONS:
        raise NotImplementedError(
            f"blockdiff_generate builds its block-causal mask for attn_implementation 'sdpa', 'eager' or "
            f"'sparsed', got {implementation!r} (load the model with attn_implementation='sdpa')"
        )
    layer_types = list(getattr(getattr(model, "config", None), "layer_types", None) or [])
    if "sliding_attention" in layer_types:
        windowed = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
        raise NotImplementedError(
            f"blockdiff_generate builds a block-causal mask over every cached key, but layers {windowed} of this "
            "model use sliding-window attention (config.use_sliding_window), which it does not apply"
        )
    if sparsed is not None and not isinstance(sparsed, PrefixSparseConfig):
        raise ArgumentTypeError(
            "sparsed", f"sparsed must be a PrefixSparseConfig or None, got {type(sparsed).__name__}"
        )
    if (sparsed is not None) != (implementation == "sparsed"):
        raise ArgumentValueError(
            "sparsed",
            "sparse prefix selection needs the model loaded with attn_implementation='sparsed', and that "
            f"attention needs sparsed=PrefixSparseConfig(...); got sparsed={sparsed!r} with {implementation!r}",
        )
    _, _, _, prompt_index = prepare_canvas(model, input_ids, attention_mask, mask_id, 0)  # validates the prompt
    batch, width = input_ids.shape
    threshold, eos, generators = _check_arguments(
        remasking, threshold, temperature, top_k, top_p, eos_token_id, mask_id, generator, batch
    )
    device = input_ids.device

    # Layout (host ints, read once): row r has p real tokens, q = p // BL whole prompt blocks and
    # a tail of p % BL tokens opening its first decoded block; n blocks cover tail + gen_length.
    lengths = prompt_index.sum(-1).tolist()
    full = [p // block_length for p in lengths]
    prefill_blocks = max(full)
    decode_blocks = max(-(-(p % block_length + gen_length) // block_length) for p in lengths)
    total = (prefill_blocks + decode_blocks) * block_length
    check_length(model, prefill_blocks * block_length, decode_blocks * block_length, "gen_length (whole blocks)")
    pads = torch.tensor([(prefill_blocks - q) * block_length for q in full], device=device)  # (B,)
    ends = pads + torch.tensor(lengths, device=device)  # (B,) first generated position

    column = torch.arange(total, device=device)[None, :]  # (1, T)
    valid = column >= pads[:, None]  # (B, T) False on padding
    positions = (column - pads[:, None]).clamp_min(0)  # (B, T) each row from 0
    source = (column - (ends - width)[:, None]).clamp(0, width - 1)  # (B, T) index into the padded prompt
    prompt_here = valid & (column < ends[:, None])
    x = torch.where(prompt_here, input_ids.long().gather(1, source), mask_id)  # (B, T) padding too holds masks

    dtype = next(model.parameters()).dtype
    cache = BlockDiffusionKVCache.for_model(model, batch, total)
    padded = len(set(full)) > 1  # some row is left padded (its prompt has fewer whole blocks)
    state = None if sparsed is None else PrefixSparseState(sparsed, padded=padded)
    if not (isinstance(cuda_graphs, bool) or cuda_graphs in CUDA_GRAPH_MODES):
        raise ArgumentTypeError(
            "cuda_graphs", f"cuda_graphs must be a bool or one of {CUDA_GRAPH_MODES}, got {cuda_graphs!r}"
        )
    whole = cuda_graphs == "whole"
    if whole and sparsed is not None and whole_scoring_refusal(sparsed) is not None:
        warn_once(
            "whole-graph-scoring",
            f"cuda_graphs='whole': the selecting steps run as piecewise graphs ({whole_scoring_refusal(sparsed)}); "
            "every other forward is one graph",
        )
    graphs = GraphedDecoder(model, batch, block_length, whole=whole) if cuda_graphs else None
    run = _BlockRunner(model, cache, dtype, state, graphs, padded)
    schedule = llada_transfer_schedule(block_length, steps)
    # With a fixed count per step and greedy sampling, the steps a block needs are known on the
    # host (`planned_steps`): those run without reading the masks back, so the host queues the
    # next step while the device computes; from there on each step reads back as below.
    static = remasking != "low_confidence_dynamic" and temperature == 0
    everyone = list(range(batch))
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    generated = column >= ends[:, None]  # (B, T)
    stopped_after = [None] * batch  # the block after which each row stopped
    block_steps = []

    # The prefill in chunks of whole blocks: each chunk's mask is (B, 1, chunk, stop), not the
    # (B, 1, P, P) of one forward (17 GB of bool at 128k); the K/V are the same.
    chunk = max(1, prefill_chunk // block_length) * block_length
    for start in range(0, prefill_blocks * block_length, chunk):
        stop = min(start + chunk, prefill_blocks * block_length)
        keep = block_causal_mask(valid, start, stop, block_length)
        run("commit", x[:, start:stop], positions[:, start:stop], keep, False, prefill=True)

    for b in range(prefill_blocks, prefill_blocks + decode_blocks):
        start, stop = b * block_length, (b + 1) * block_length
        keep = block_causal_mask(valid, start, stop, block_length)  # (B, 1, BL, stop)
        block = x[:, start:stop].clone()  # (B, BL)
        step = 0
        # Masked positions per row: the first decoded block holds each prompt's tail.
        tails = [p % block_length if b == prefill_blocks else 0 for p in lengths]
        planned = planned_steps([block_length - t for t in tails], schedule) if static else 0
        while True:
            masked = block == mask_id  # (B, BL)
            rows = everyone  # the rows that draw samples: only read back when sampling (never in the plan)
            if step >= planned:
                left = masked.sum(-1).tolist()  # the read-back: which rows go on
                if max(left) == 0:
                    break
                rows = [r for r in range(batch) if left[r] > 0]
            past_schedule = step >= steps
            if state is not None and step == 0:
                state.begin_block()  # the block's first step selects
            elif state is not None:
                state.mode = "sparse"  # its later steps read the kept prefix blocks
            logits = run("denoise", block, positions[:, start:stop], keep, True)  # (B, BL, V)
            if past_schedule:  # only reached when the model wrote the mask token itself
                logits[..., mask_id] = -torch.inf
            tokens, confidence = sample_tokens(logits, temperature, top_k, top_p, generators, rows)
            count = block_length if past_schedule else schedule[step]
            transfer = choose_transfer(remasking, confidence, masked, count, threshold)
            block = torch.where(transfer, tokens, block)
            step += 1
            assert step <= steps + 1, "one step past the schedule decodes every masked position"
        x[:, start:stop] = block
        if state is not None:  # the commit stores exact K/V, or with sparse_commit reads as the steps did
            state.mode = "sparse" if state.config.sparse_commit else "dense"
        run("commit", block, positions[:, start:stop], keep, False)
        block_steps.append(step)
        if eos:
            hit = (torch.isin(x[:, :stop], eos_ids) & generated[:, :stop]).any(-1).tolist()
            for r in range(batch):
                if hit[r] and stopped_after[r] is None:
                    stopped_after[r] = b
            if all(s is not None for s in stopped_after):
                break

    for r, b in enumerate(stopped_after):
        if b is not None:
            x[r, (b + 1) * block_length :] = mask_id
    out = torch.cat([input_ids.long(), x.gather(1, ends[:, None] + torch.arange(gen_length, device=device))], dim=1)
    if not return_dict_in_generate:
        return out
    return DiffusionGenerationOutput(
        sequences=out,
        sparsed_state=state,
        num_forwards=cache.commits + cache.denoises,
        block_steps=tuple(block_steps),
    )
