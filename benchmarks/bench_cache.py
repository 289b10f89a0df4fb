"""End to end with a K/V cache: dense, sparsed, and each with the prefix / dual cache.

    python benchmarks/bench_cache.py --lengths 16384 65536                      # H100, LLaDA-8B shape
    python benchmarks/bench_cache.py --model dream --lengths 131072 --variants dense+prefix sparsed+prefix
    python benchmarks/bench_cache.py                                            # CPU smoke size

Per prompt length, in one process on one random-weight model (bf16 on CUDA):

- no cache: a dense step, the switch step and a sparse step are timed after a warm-up and
  weighed by the schedule, as bench_e2e.py does (a 64k dense generation of 256 steps would
  take over 20 minutes);
- with a cache: the real sampler runs the whole generation (``llada_generate`` /
  ``dream_generate`` with ``block_length``). Every forward is timed, synchronised
  (``sparsed_backend.timing.StepTimer``); a step kind's first forward (compilation, autotuning)
  counts at the median of that kind's others, and a kind that runs once (the switch step) at
  its warm no-cache time. ``wall_s`` is the
  raw wall time, compilation included.

``dense+...`` runs the model's "sparsed" attention without a SparseD config (on CUDA its cache
windows of up to 64 rows run the split-KV dense decode kernel, as SparseD's dense windows do);
``sdpa+...`` (asked for by name) runs transformers' SDPA attention instead;
``speedup_vs_best_dense_cache`` is against the fastest dense cache variant run.
Peak memory is measured above the weights; ``cache_mib`` is what the cache holds at the end,
``mask_state_mib`` the SparseD block masks of all layers; ``step_kinds`` gives each forward
kind's median time (e.g. ``dense@65536`` a refresh over the whole sequence, ``sparse@32`` a
windowed step). A cache variant that runs out of memory is recorded with its error.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import torch

from bench_e2e import build_model, sparsed_total, step_runners, timed
from common import environment, markdown_table, write_results
from sparsed_backend import SparseDConfig
from sparsed_backend.sampling.generation import dream_generate, llada_generate
from sparsed_backend.timing import PeakMemory, StepTimer, synced_seconds

VARIANTS = ["dense+prefix", "dense+dual", "sparsed+prefix", "sparsed+dual"]
# transformers' SDPA attention (the model loaded with attn_implementation="sdpa"); "dense" is the
# "sparsed" attention with no SparseD config, whose cache windows of up to 64 rows run the
# split-KV dense decode kernel on CUDA
SDPA_VARIANTS = ["sdpa+prefix", "sdpa+dual"]
DENSE_CACHES = ("dense+prefix", "dense+dual", "sdpa+prefix", "sdpa+dual")


def build_dream(layers: int, device: torch.device, dtype: torch.dtype, small: bool):
    from sparsed_backend.models import DreamConfig, DreamModel

    if small:
        cfg = DreamConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=layers,
                          intermediate_size=512, vocab_size=512, max_position_embeddings=1 << 20)  # fmt: skip
    else:  # Dream-7B shape: 28 layers, 28 query / 4 key-value heads
        cfg = DreamConfig(num_hidden_layers=layers, max_position_embeddings=1 << 20)
    with torch.device(device):
        model = DreamModel._from_config(cfg, attn_implementation="sparsed", dtype=dtype)
    return model.eval()


def steady_total(records: list[tuple[str, int, float]], single: dict[str, float]) -> float:
    """Sum of a generation's forwards (StepTimer records), each kind's first one replaced: by the
    median of that (mode, query rows) kind's others, or for a kind that ran once by ``single``'s
    warm time of its mode (the switch step)."""
    by_key: dict = {}
    for mode, rows, t in records:
        by_key.setdefault((mode, rows), []).append(t)
    total = 0.0
    for (mode, _), times in by_key.items():
        total += statistics.median(times[1:]) * len(times) if len(times) > 1 else single.get(mode, times[0])
    return total


def step_kinds(records: list[tuple[str, int, float]]) -> str:
    """Each forward kind's median time, "mode@query rows: seconds x count", the first forward of a
    kind (compilation) left out where the kind ran more than once."""
    by_key: dict = {}
    for mode, rows, t in records:
        by_key.setdefault((mode, rows), []).append(t)
    return "; ".join(
        f"{mode}@{rows}: {statistics.median(ts[1:] or ts):.3g} s x{len(ts)}" for (mode, rows), ts in by_key.items()
    )


@torch.inference_mode()
def run_length(model, kind, n, args, device, rows, warm=True):
    g = torch.Generator(device=device).manual_seed(0)
    prompt_len = n - args.gen_length
    top = model.config.mask_token_id  # prompts never hold the mask token
    ids = torch.randint(0, top, (1, prompt_len), device=device, generator=g)
    full = torch.randint(0, top, (1, n), device=device, generator=g)
    cfg = SparseDConfig(skip=args.skip, select=args.select, block_size=args.block_size, min_sparse_len=0)
    run, state = step_runners(model, full, args.gen_length, cfg, prompt_len)
    single, peaks = {}, {}
    for name, fn in run.items():
        if warm or name == "sparse":  # the sparse step compiles FlexAttention for each length bucket
            fn()  # warm-up: compilation and autotuning stay out of the numbers
        single[name], peaks[name] = timed(fn, device, args.repeats)
        print(f"  N={n:6d} {name:8s} step {single[name]:8.3f} s  peak {peaks[name]:9.1f} MiB", flush=True)
    dense_total = args.steps * single["dense"]
    sparsed_s = sparsed_total(cfg, args.steps, single["dense"], single["switch"], single["sparse"])
    mask_mib = state.memory_bytes() / 2**20
    state.layers.clear()
    base_row = {"N": n, "model": kind, "steps": args.steps, "gen_length": args.gen_length,
                "block_length": args.block_length, "dense_step_s": single["dense"], "switch_step_s": single["switch"],
                "sparse_step_s": single["sparse"]}  # fmt: skip
    results = {"dense": dense_total, "sparsed": sparsed_s}
    rows.append(dict(base_row, variant="dense", total_s=dense_total, measured="projected", peak_mib=peaks["dense"]))
    rows.append(dict(base_row, variant="sparsed", total_s=sparsed_s, measured="projected",
                     peak_mib=max(peaks["switch"], peaks["sparse"]), mask_state_mib=mask_mib))  # fmt: skip
    generate = llada_generate if kind == "llada" else dream_generate
    length_arg = {"gen_length": args.gen_length} if kind == "llada" else {"max_new_tokens": args.gen_length}
    for variant in args.variants:
        attn, cache = variant.split("+")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        call = functools.partial(
            generate, model, ids, steps=args.steps, block_length=args.block_length, kv_cache=cache,
            sparsed=cfg if attn == "sparsed" else None, return_dict_in_generate=True, **length_arg,
        )  # fmt: skip
        clock = StepTimer(model)
        model.set_attn_implementation("sdpa" if attn == "sdpa" else "sparsed")
        try:
            with PeakMemory(device) as peak:
                wall, out = synced_seconds(call, device)  # wall time, compilation included
        except torch.OutOfMemoryError as err:  # recorded: the longest prompt that fits is part of the table
            error = f"OutOfMemoryError: {str(err).splitlines()[0][:160]}"
            rows.append(dict(base_row, variant=variant, measured="failed", error=error))
            print(f"  N={n:6d} {variant:15s} {error}", flush=True)
            continue
        finally:
            clock.remove()
            model.set_attn_implementation("sparsed")
        total = steady_total(clock.records, {"switch": single["switch"]})
        results[variant] = total
        row = dict(base_row, variant=variant, total_s=total, wall_s=wall, measured="run",
                   peak_mib=peak.mib, cache_mib=out.kv_cache.memory_bytes() / 2**20,
                   refreshes=out.kv_cache.refreshes, forwards=out.num_forwards,
                   step_kinds=step_kinds(clock.records))  # fmt: skip
        if out.sparsed_state is not None:
            row["density"] = out.sparsed_state.density()
            row["mask_state_mib"] = out.sparsed_state.memory_bytes() / 2**20
        rows.append(row)
        print(f"  N={n:6d} {variant:15s} {total:8.2f} s (wall {wall:.2f} s) peak {row['peak_mib']:.0f} MiB "
              f"cache {row['cache_mib']:.0f} MiB", flush=True)  # fmt: skip
        del out
    best_cache = min((results[v] for v in DENSE_CACHES if v in results), default=None)
    for row in rows:
        if row["N"] == n and row["model"] == kind and "total_s" in row:
            row["speedup_vs_dense"] = dense_total / row["total_s"]
            if "dense+prefix" in results:
                row["speedup_vs_dense_prefix"] = results["dense+prefix"] / row["total_s"]
            if best_cache is not None:
                row["speedup_vs_best_dense_cache"] = best_cache / row["total_s"]


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["llada", "dream"], default="llada")
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536] if cuda else [640])
    p.add_argument("--layers", type=int, default=None, help="default: 32 (LLaDA) / 28 (Dream) on CUDA, 2 on CPU")
    p.add_argument("--steps", type=int, default=256 if cuda else 16)
    p.add_argument("--gen-length", type=int, default=256 if cuda else 64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--skip", type=float, default=0.2)
    p.add_argument("--select", type=float, default=0.3)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS + SDPA_VARIANTS)
    p.add_argument(
        "--warmup-length",
        type=int,
        default=None,
        help="run everything once at this length first (not recorded); then the dense and switch steps are "
        "timed without a warm-up of their own (at 128k and more a warm-up costs a minute per kind)",
    )
    p.add_argument("--name", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    layers = args.layers or ((32 if args.model == "llada" else 28) if cuda else 2)
    name = args.name or (f"bench_cache_{args.model}" if cuda else f"bench_cache_{args.model}_cpu_smoke")
    env = environment(device)
    env.update(model=args.model, skip=args.skip, select=args.select, block_size=args.block_size, layers=layers,
               batch=1, steps=args.steps, gen_length=args.gen_length, block_length=args.block_length)  # fmt: skip
    print(json.dumps(env), flush=True)
    if args.model == "llada":
        model = build_model(layers, device, dtype, small=not cuda)
        model.config.max_sequence_length = max(args.lengths)  # random weights: any length
    else:
        model = build_dream(layers, device, dtype, small=not cuda)
    if model.config.mask_token_id >= model.config.vocab_size:  # the CPU smoke model's small vocabulary
        model.config.mask_token_id = model.config.vocab_size - 1
    rows: list[dict] = []
    if args.warmup_length:  # every kernel compiled and tuned once; then only the sparse step warms up per length
        run_length(model, args.model, args.warmup_length, args, device, [])
    for n in args.lengths:
        run_length(model, args.model, n, args, device, rows, warm=not args.warmup_length)
    cols = ["model", "N", "variant", "measured", "total_s", "wall_s", "speedup_vs_dense", "speedup_vs_dense_prefix",
            "speedup_vs_best_dense_cache", "peak_mib", "cache_mib", "mask_state_mib", "refreshes", "forwards",
            "density", "step_kinds", "error"]  # fmt: skip
    table = markdown_table(rows, cols)
    write_results(name, env, rows, table, args.out)
    print(table)


if __name__ == "__main__":
    main()
