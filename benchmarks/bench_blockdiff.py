"""Block diffusion (SDAR on native Qwen3): dense vs sparse prefix selection, per step and end to end.

    python benchmarks/bench_blockdiff.py --prefixes 8192 32768 131072 --blocks 4 32 --batches 1 8   # H200
    python benchmarks/bench_blockdiff.py                                                            # CPU smoke

SDAR-8B shape (Qwen3-8B: 36 layers, 32 query / 8 key-value heads, head_dim 128), random bf16
weights, YaRN (factor 4 over 32,768 positions) for prefixes past 32k. In one process:

- ``attention``: one layer's attention of a block of B x block queries against a prefix of P
  cached positions, on views of one preallocated cache (the layout `block_cache` serves):
  dense SDPA with the sampler's bool mask (``dense_mask``), without a mask (``dense``: SDPA's
  default order, cuDNN first on an H200) and without a mask with FlashAttention-2 first
  (``dense_flash``, `policy.decode_kernels`, what the graphed sampler runs when nothing is
  padded); the selecting step (``score``: exact attention
  plus block masses and top-k; unpadded, as the sampler runs it for rows of one length: a fused
  attention with log-sum-exp, FlashAttention-2's since session 10 (cuDNN's before), then one
  scoring sweep) and the sparse step (``sparse_q``: one selection per query head,
  ``sparse_kv``: per key-value head), the per-KV-head selection through compiled FlexAttention
  (``sparse_flex``, with ``flex_build`` its BlockMask's construction and ``max_err`` its largest
  difference from the gather), the block-sparse decode kernel reading the kept blocks in place
  (``sparse_triton``, `kernels.sparse_decode`, CUDA only, with its ``max_err``), the split-KV
  dense decode kernel (``dense_triton``), and FlashAttention-2, that kernel and the sparse kernel
  replayed from a CUDA graph (``dense_flash_graph``, ``dense_triton_graph``,
  ``sparse_triton_graph``: their kernels without the host's launch work, as the sampler's graphs
  run them), each a median of `common.bench`; ``vs_best_dense`` is against the fastest dense row;
- ``e2e``: `blockdiff_generate` end to end (prefill of P tokens in chunks, then --gen tokens),
  dense on the preallocated cache (``dense``), the same with a cache that concatenates like
  transformers' ``DynamicCache`` and SDAR's sampler (``concat``, reported separately: not the
  baseline), the same dense run with transformers' SDPA told to pass the grouped K/V heads to
  SDPA (``dense_gqa``: with a mask, transformers copies K/V to every query head, ``repeat_kv``,
  4x the cache per layer per step on this shape), and sparse prefix selection (``sparse``); one
  run timed by `timing.synced_seconds` (``peak_mib``: peak memory above what was allocated when
  it began; ``total_mib``: the peak in all, which shows what an earlier variant left), after a
  short warm-up generation; ``prefill_s``: of those seconds, the prefill's (from the first forward to
  the first denoising step, by CUDA events, so the run is not synchronised in between), and
  ``vs_dense_decode``: the ratio without the prefills (what the generated tokens cost). A
  ``_graphs`` suffix (``dense_graphs``, ``dense_gqa_graphs``, ``sparse_graphs``)
  runs the same with ``cuda_graphs=True`` (`decode_graphs`: CUDA graphs around the eager
  attention, captured inside the timed call; graphed sparse steps read the kept blocks with the
  block-sparse decode kernel). ``sparse_fused`` (and ``_graphs``) is ``sparse`` with
  ``PrefixSparseConfig(scorer="fused")``: each block's selecting step is one sweep of the decode
  kernel over every prefix block. Two more run with graphs only: ``sparse_gather_graphs`` (the
  graphed sparse steps gather the kept keys and call SDPA instead of the kernel) and
  ``dense_cudnn_graphs`` (``dense_gqa_graphs`` with SDPA's own kernel order, cuDNN first on an
  H200, instead of FlashAttention-2 first: cuDNN is faster per call at batch 8 but rebuilds its
  plan for every new key length). A ``_whole`` suffix (``dense_whole``, ``sparse_whole``,
  ``sparse_fused_whole``) runs with ``cuda_graphs="whole"``: every denoising step and commit is
  one CUDA graph, the exact ones attending through the split-KV decode kernel
  (`kernels.sparse_decode.dense_decode_attention`), and with the fused scorer the selecting steps
  too. ``vs_dense`` is against the fastest dense variant run (``dense``, ``dense_gqa``,
  ``dense_graphs``, ``dense_gqa_graphs``, ``dense_cudnn_graphs``, ``dense_whole``).

A configuration that fails (e.g. out of memory) is recorded with its error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import time
import traceback

import torch
import torch.nn.functional as F

import sparsed_backend  # noqa: F401  (registers the "sparsed" attention)
from common import bench, environment, markdown_table, write_results
from sparsed_backend.attention.policy import decode_kernels
from sparsed_backend.attention.prefix_selection import PrefixSparseConfig, PrefixSparseState, prefix_sparse_attention
from sparsed_backend.sampling import block_diffusion
from sparsed_backend.sampling.block_diffusion import blockdiff_generate
from sparsed_backend.timing import PeakMemory, synced_seconds

# Qwen3's YaRN (factor 4 over 32,768 positions); the factor grows when prefix + generation pass 131,072.
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def qwen3_config(small: bool, max_positions: int):
    from transformers import Qwen3Config

    if small:  # CPU smoke size
        shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, vocab_size=512)  # fmt: skip
    else:  # Qwen3-8B / SDAR-8B
        shape = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936)  # fmt: skip
    rope, positions = {"rope_theta": 1e6, "rope_type": "default"}, 32768
    if max_positions > YARN["original_max_position_embeddings"]:  # the factor that spans max_positions
        factor = max(YARN["factor"], max_positions / YARN["original_max_position_embeddings"])
        rope = {"rope_theta": 1e6, **YARN, "factor": factor}
        # transformers checks max_position_embeddings == factor x original (else it warns)
        positions = math.ceil(factor * YARN["original_max_position_embeddings"])
    return Qwen3Config(**shape, max_position_embeddings=positions, rope_parameters=rope,
                       tie_word_embeddings=False)  # fmt: skip


@contextlib.contextmanager
def sdpa_grouped_heads():
    """transformers' SDPA attention passing grouped K/V heads with ``enable_gqa`` even with a mask
    (its default copies K/V to every query head whenever a mask is given)."""
    from transformers.integrations import sdpa_attention

    saved = sdpa_attention.use_gqa_in_sdpa
    sdpa_attention.use_gqa_in_sdpa = lambda attention_mask, key, value: True
    try:
        yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = saved


class ConcatCache:
    """The concatenating baseline: commits append with ``torch.cat`` (as ``DynamicCache``), and a
    denoising step concatenates the prefix with the block's K/V (as SDAR's sampler) every layer."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list = [None] * num_layers
        self.values: list = [None] * num_layers
        self.num_layers, self.length, self.commits, self.denoises = num_layers, 0, 0, 0
        self._forward = None

    @classmethod
    def for_model(cls, model, batch_size: int, max_length: int) -> ConcatCache:
        return cls(model.config.num_hidden_layers)

    def prepare(self, forward: str, new_positions: int) -> None:
        self._forward = forward

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        keys = key_states if k is None else torch.cat([k, key_states], 2)
        values = value_states if v is None else torch.cat([v, value_states], 2)
        if layer_idx == self.num_layers - 1:
            self.commits += self._forward == "commit"
            self.denoises += self._forward == "denoise"
        if self._forward == "commit":
            self.keys[layer_idx], self.values[layer_idx] = keys, values
            if layer_idx == self.num_layers - 1:
                self.length = keys.shape[2]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


VARIANTS = ("dense", "dense_gqa", "concat", "sparse", "sparse_fused")
GRAPHED_ONLY = ("dense_cudnn_graphs", "sparse_gather_graphs")
WHOLE = ("dense_whole", "sparse_whole", "sparse_fused_whole")  # cuda_graphs="whole"
# the baseline: the fastest of them
DENSE_VARIANTS = ("dense", "dense_gqa", "dense_graphs", "dense_gqa_graphs", "dense_cudnn_graphs", "dense_whole")


def graph_mode(variant: str) -> tuple[str, bool | str]:
    """(the variant's name without its suffix, the ``cuda_graphs`` it runs with)."""
    if variant.endswith("_whole"):
        return variant.removesuffix("_whole"), "whole"
    return variant.removesuffix("_graphs"), variant.endswith("_graphs")


@contextlib.contextmanager
def patched(module, name: str, value):
    """``module.name`` replaced by ``value`` inside the block (a benchmark's variant switch)."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def variant_context(name: str, whole: bool = False):
    """What a variant changes around the sampler: grouped K/V heads for transformers' SDPA (also
    in ``dense_whole``'s prefill, the one forward it does not run whole, as the sparse runs'
    prefill passes them); SDPA's own kernel order in the graphed forwards (``dense_cudnn``); the
    gather in graphed sparse steps (``sparse_gather``)."""
    from sparsed_backend.sampling import decode_graphs

    stack = contextlib.ExitStack()
    if name in ("dense_gqa", "dense_cudnn") or name == "dense" and whole:
        stack.enter_context(sdpa_grouped_heads())
    if name == "dense_cudnn":
        stack.enter_context(patched(decode_graphs, "decode_kernels", lambda query: contextlib.nullcontext()))
    if name == "sparse_gather":
        refusal = lambda query, block_size: "the gather variant"  # noqa: E731
        stack.enter_context(patched(decode_graphs, "decode_kernel_refusal", refusal))
    return stack


def sparse_config(args, per_kv_head: bool) -> PrefixSparseConfig:
    """The prefix selection the flags ask for: a --budget of tokens, else a --select share."""
    keep = {"select": None, "budget": args.budget} if args.budget is not None else {"select": args.select}
    return PrefixSparseConfig(**keep, block_size=args.block_size, per_kv_head=per_kv_head,
                              select_every=args.select_every, sparse_commit=args.sparse_commit)  # fmt: skip


def attention_rows(args, device, dtype, rows: list[dict]) -> None:
    for p, bl, b in ((p, bl, b) for p in args.prefixes for bl in args.blocks for b in args.batches):
        base = {"kind": "attention", "prefix": p, "block": bl, "batch": b}
        try:
            attention_case(args, device, dtype, base, rows)
        except torch.OutOfMemoryError as err:  # recorded: the table shows which shapes fit
            rows.append(dict(base, variant="all", error=f"OutOfMemoryError: {str(err).splitlines()[0][:120]}"))
        if device.type == "cuda":
            torch.cuda.empty_cache()


def attention_case(args, device, dtype, base: dict, rows: list[dict]) -> None:
    """One (prefix, block, batch) shape of ``attention_rows``."""
    p, bl, b = base["prefix"], base["block"], base["batch"]
    hq, hkv, d = (4, 2, 32) if device.type == "cpu" else (32, 8, 128)
    s = p + bl
    g = torch.Generator(device=device).manual_seed(0)
    cache = torch.randn(2, b, hkv, s, d, device=device, dtype=dtype, generator=g)
    k, v = cache[0], cache[1]  # views of one preallocated cache
    q = torch.randn(b, hq, bl, d, device=device, dtype=dtype, generator=g)
    mask = torch.ones(b, 1, bl, s, dtype=torch.bool, device=device)
    scale = d**-0.5
    times, first = {}, len(rows)

    def run(name, fn):
        ms, error = bench(fn, device)
        times[name] = ms
        rows.append(dict(base, variant=name, ms=ms, error=error or ""))
        print(f"  P={p:7d} block={bl:3d} batch={b} {name:10s} {ms:9.3f} ms {error or ''}", flush=True)

    run("dense", lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True))
    run("dense_mask", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True))

    def flash():
        with decode_kernels(q):  # FlashAttention-2 first: what the sampler's graphed forwards use
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    run("dense_flash", flash)
    for name, per_kv in (("sparse_q", False), ("sparse_kv", True)):
        state = PrefixSparseState(sparse_config(args, per_kv), padded=False)  # as the sampler sets it: no padding

        def score(state=state):
            state.begin_block()
            return prefix_sparse_attention(q, k, v, mask, scale, state, 0)

        run(f"score_{name[7:]}", score)
        state.mode = "sparse"
        run(name, lambda state=state: prefix_sparse_attention(q, k, v, mask, scale, state, 0))
        rows[-1]["density"] = state.layers[0].density
    flex_case(q, k, v, mask, scale, state, run, rows)
    triton_case(q, k, v, mask, scale, state, run, rows)
    graphed_case(q, k, v, scale, flash, state, run, rows)
    dense = ("dense", "dense_mask", "dense_flash", "dense_triton", "dense_flash_graph", "dense_triton_graph")
    best = min(times.get(name, math.nan) for name in dense if not math.isnan(times.get(name, math.nan)))
    for row in rows[first:]:
        if "ms" in row and row["variant"] != "flex_build":  # building a mask is no attention
            row["vs_best_dense"] = best / row["ms"]


def flex_case(q, k, v, mask, scale, state, run, rows) -> None:
    """``sparse_flex``: the per-KV-head selection of ``state`` (after its sparse step) run by
    compiled FlexAttention instead of gather + SDPA. The BlockMask comes from a token-level keep
    table (the gathered positions) through ``create_block_mask``, so its mask_mod is never
    trivial (a trivial one runs dense on torch 2.11 without a word) and key blocks with no kept
    key are skipped. ``flex_build`` times that mask's construction (once per decoded block in a
    sampler); ``max_err`` is the largest difference from the gather's output."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from sparsed_backend.attention.prefix_selection import _gather_positions

    B, Hq, L, _ = q.shape
    S = k.shape[2]
    sel = state.layers[0]
    pos, valid = _gather_positions(sel, L, mask[:, 0, -1])  # (B, Hkv, K)
    keep = torch.zeros(B, sel.blocks.shape[1], S, dtype=torch.bool, device=q.device)
    keep.scatter_(-1, pos, valid)
    keep = keep.repeat_interleave(Hq // keep.shape[1], 1)  # (B, Hq, S)

    def keep_mod(b, h, q_idx, kv_idx):
        return keep[b, h, kv_idx]

    def build():
        return create_block_mask(keep_mod, B, Hq, L, S, device=q.device, BLOCK_SIZE=128)

    block_mask = build()
    flex = torch.compile(flex_attention, dynamic=False)
    try:
        out = flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
        want = prefix_sparse_attention(q, k, v, mask, scale, state, 0)
        err = (out.float() - want.float()).abs().max().item()
    except Exception as error:  # recorded: the row says why FlexAttention could not run this shape
        base = {key: rows[-1][key] for key in ("kind", "prefix", "block", "batch")}
        failure = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        rows.append(dict(base, variant="sparse_flex", error=failure))
        return
    run("flex_build", build)
    run("sparse_flex", lambda: flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True))
    rows[-1]["density"], rows[-1]["max_err"] = sel.density, err


def triton_case(q, k, v, mask, scale, state, run, rows) -> None:
    """``sparse_triton``: the per-KV-head selection of ``state`` read in place by the block-sparse
    decode kernel (`kernels.sparse_decode`: a GQA group's heads per program, kept blocks split
    over programs), with ``max_err`` its largest difference from the gather. CUDA only."""
    base = {key: rows[-1][key] for key in ("kind", "prefix", "block", "batch")}
    if not q.is_cuda:
        rows.append(dict(base, variant="sparse_triton", error="needs CUDA (Triton)"))
        return
    from sparsed_backend.attention.kernels.sparse_decode import decode_offsets, sparse_decode_attention

    sel = state.layers[0]
    offsets = decode_offsets(sel.prefix_len, sel.front, k.shape[2], q.device)

    def sparse_triton():
        return sparse_decode_attention(q, k, v, sel.blocks, offsets, sel.block_size, scale)

    try:
        want = prefix_sparse_attention(q, k, v, mask, scale, state, 0)
        err = (sparse_triton().float() - want.float()).abs().max().item()
    except Exception as error:  # recorded: the row says why the kernel could not run this shape
        rows.append(dict(base, variant="sparse_triton", error=f"{type(error).__name__}: {str(error)[:160]}"))
        return
    run("sparse_triton", sparse_triton)
    rows[-1]["density"], rows[-1]["max_err"] = sel.density, err


def graphed_case(q, k, v, scale, flash, state, run, rows) -> None:
    """The split-KV dense decode kernel (``dense_triton``, `kernels.sparse_decode.dense_decode_attention`:
    the key range shared out over programs) called eagerly, and each of FlashAttention-2
    (``dense_flash_graph``), that kernel (``dense_triton_graph``) and the block-sparse kernel on
    the per-KV-head selection (``sparse_triton_graph``) replayed from a CUDA graph: the time of
    their kernels without the host's launch work, as the sampler's graphs run them (called
    eagerly, a few small launches cost more than a decode kernel's work). ``vs_best_dense`` is
    against the fastest dense row, graphed or not. CUDA only."""
    base = {key: rows[-1][key] for key in ("kind", "prefix", "block", "batch")}
    if not q.is_cuda:
        rows.append(dict(base, variant="dense_triton", error="needs CUDA (Triton)"))
        return
    from sparsed_backend.attention.kernels.sparse_decode import (
        decode_offsets,
        dense_decode_attention,
        sparse_decode_attention,
    )
    from sparsed_backend.sampling.decode_graphs import _captured

    sel = state.layers[0]
    s = k.shape[2]
    dense_offsets = decode_offsets(0, 0, s, q.device)
    sparse_offsets = decode_offsets(sel.prefix_len, sel.front, s, q.device)

    def dense_triton():
        return dense_decode_attention(q, k, v, dense_offsets, scale)

    def sparse_triton():
        return sparse_decode_attention(q, k, v, sel.blocks, sparse_offsets, sel.block_size, scale)

    try:
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale, enable_gqa=True)
        err = (dense_triton().float() - want).abs().max().item()
    except Exception as error:  # recorded: the row says why the kernel could not run this shape
        rows.append(dict(base, variant="dense_triton", error=f"{type(error).__name__}: {str(error)[:160]}"))
        return
    run("dense_triton", dense_triton)
    rows[-1]["max_err"] = err
    for name, fn in (("dense_flash_graph", flash), ("dense_triton_graph", dense_triton),
                     ("sparse_triton_graph", sparse_triton)):  # fmt: skip
        try:
            graph = _captured(fn)
        except Exception as error:  # recorded: the row says why this call could not be captured
            rows.append(dict(base, variant=name, error=f"{type(error).__name__}: {str(error)[:160]}"))
            continue
        run(name, graph.replay)
        if name == "sparse_triton_graph":
            rows[-1]["density"] = sel.density


class PrefillClock:
    """The prefill's share of one `blockdiff_generate` call: the time from its first forward to
    its first denoising step (CUDA events on CUDA, so nothing waits in between; the host's clock
    on the CPU, where every call is synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextlib.contextmanager
    def watching(self):
        """Inside: the sampler's forwards mark the prefill's start and end."""
        real = block_diffusion._BlockRunner.__call__
        clock = self

        def timed(runner, forward, *args, **kwargs):
            if not clock.marks or (forward == "denoise" and len(clock.marks) == 1):
                clock.marks.append(clock._mark())
            return real(runner, forward, *args, **kwargs)

        with patched(block_diffusion._BlockRunner, "__call__", timed):
            yield self

    def seconds(self) -> float:
        """After the call (and a device sync): the prefill's seconds, NaN if it never decoded."""
        if len(self.marks) < 2:
            return math.nan
        start, stop = self.marks
        return start.elapsed_time(stop) / 1000 if self.cuda else stop - start


def e2e_rows(args, device, dtype, rows: list[dict]) -> None:
    from transformers import Qwen3ForCausalLM

    small = device.type == "cpu"
    cfg = qwen3_config(small, max(args.prefixes) + args.gen + 64)
    with torch.device(device):
        model = Qwen3ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype).eval()
    mask_id = cfg.vocab_size - 1
    sparse_cfg = sparse_config(args, args.per_kv_head)
    real_cache = block_diffusion.BlockDiffusionKVCache
    for p, bl, b in ((p, bl, b) for p in args.prefixes for bl in args.blocks for b in args.batches):
        base = {"kind": "e2e", "prefix": p, "block": bl, "batch": b, "gen": args.gen}
        g = torch.Generator(device=device).manual_seed(1)
        ids = torch.randint(0, mask_id, (b, p), device=device, generator=g)
        common = dict(gen_length=args.gen, block_length=bl, denoising_steps=min(args.steps, bl), mask_id=mask_id,
                      return_dict_in_generate=True)  # fmt: skip
        for variant in args.variants:
            name, graphs = graph_mode(variant)
            sparse = name in ("sparse", "sparse_gather", "sparse_fused")
            model.set_attn_implementation("sparsed" if sparse else "sdpa")
            extra = {}
            if sparse:
                scorer = "fused" if name == "sparse_fused" else "separate"
                extra["sparsed"] = dataclasses.replace(sparse_cfg, scorer=scorer)
            if graphs:
                extra["cuda_graphs"] = graphs
            block_diffusion.BlockDiffusionKVCache = ConcatCache if name == "concat" else real_cache
            try:
                with variant_context(name, graphs == "whole"):
                    blockdiff_generate(model, ids[:, : min(p, 4 * bl)], **{**common, "gen_length": 2 * bl}, **extra)
                    with PeakMemory(device) as peak, PrefillClock(device).watching() as prefill:
                        run = functools.partial(blockdiff_generate, model, ids, **common, **extra)
                        seconds, out = synced_seconds(run, device)
                row = dict(base, variant=variant, seconds=seconds, tokens_per_s=b * args.gen / seconds,
                           prefill_s=prefill.seconds(), forwards=out.num_forwards, peak_mib=peak.mib,
                           total_mib=peak.total_mib)  # fmt: skip
                if out.sparsed_state is not None:
                    row["density"] = out.sparsed_state.density()
                del out
            except Exception as err:  # recorded: the table shows which configurations fail and why
                traceback.print_exc()
                row = dict(
                    base, variant=variant, error=f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
                )
            finally:
                block_diffusion.BlockDiffusionKVCache = real_cache
            rows.append(row)
            print(f"  e2e P={p:7d} block={bl:3d} batch={b} {variant:7s} {row.get('seconds', math.nan):8.2f} s "
                  f"{row.get('error', '')}", flush=True)  # fmt: skip
            if device.type == "cuda":
                torch.cuda.empty_cache()
        done = [r for r in rows[-len(args.variants) :] if "seconds" in r]
        dense = min((r["seconds"] for r in done if r["variant"] in DENSE_VARIANTS), default=math.nan)
        decode = min((r["seconds"] - r["prefill_s"] for r in done if r["variant"] in DENSE_VARIANTS), default=math.nan)
        for r in done:
            r["vs_dense"] = dense / r["seconds"]
            r["vs_dense_decode"] = decode / (r["seconds"] - r["prefill_s"])


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefixes", type=int, nargs="+", default=[8192, 32768, 131072] if cuda else [300])
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 32] if cuda else [4])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8] if cuda else [1])
    p.add_argument("--gen", type=int, default=1024 if cuda else 16, help="generated tokens (e2e)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per block (SDAR: 4), at most the block")
    p.add_argument("--select", type=float, default=0.1)
    p.add_argument("--budget", type=int, default=None, help="kept prefix tokens per head instead of --select")
    p.add_argument("--block-size", type=int, default=128 if cuda else 16, help="prefix tokens per selectable block")
    p.add_argument("--per-kv-head", action="store_true", help="e2e: one selection per key-value head")
    p.add_argument("--select-every", type=int, default=1, help="e2e: blocks per selection (PrefixSparseConfig)")
    p.add_argument("--sparse-commit", action="store_true", help="e2e: commits read the kept blocks too")
    p.add_argument("--parts", nargs="+", choices=["attention", "e2e"], default=["attention", "e2e"])
    p.add_argument(
        "--variants",
        nargs="+",
        choices=[*VARIANTS, *(v + "_graphs" for v in VARIANTS if v != "concat"), *GRAPHED_ONLY, *WHOLE],
        default=["dense", "dense_gqa", "concat", "sparse"],
    )
    p.add_argument("--name", default="bench_blockdiff" if cuda else "bench_blockdiff_cpu_smoke")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    env = environment(device)
    env.update(select=args.select, budget=args.budget, block_size=args.block_size, gen=args.gen, steps=args.steps,
               select_every=args.select_every, sparse_commit=args.sparse_commit)  # fmt: skip
    print(json.dumps(env), flush=True)
    rows: list[dict] = []
    if "attention" in args.parts:
        attention_rows(args, device, dtype, rows)
    if "e2e" in args.parts:
        e2e_rows(args, device, dtype, rows)
    cols = ["kind", "prefix", "block", "batch", "variant", "ms", "seconds", "prefill_s", "tokens_per_s",
            "vs_best_dense", "vs_dense", "vs_dense_decode", "density", "max_err", "forwards", "peak_mib", "total_mib",
            "error"]  # fmt: skip
    table = markdown_table(rows, cols)
    write_results(args.name, env, rows, table, args.out)
    print(table)


if __name__ == "__main__":
    main()
