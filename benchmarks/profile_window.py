"""Where a cached (windowed) step's time goes: LLaDA with a prefix / dual K/V cache, dense vs sparsed.

    python benchmarks/profile_window.py --length 65536 --layers 8       # GPU, LLaDA-8B shape
    python benchmarks/profile_window.py                                # CPU smoke size

A K/V-cached generation runs most of its steps on a window: the decoding block alone (dual) or
the block and everything after it (prefix), against every layer's cached K/V. At 64k on an H200
such a step took about 36 ms with or without SparseD (issue 21's figures). This script runs, in
one process on one random-weight model, a refresh that fills the cache (for sparsed: the switch
step, which selects the blocks), then windowed steps of each kind, and prints per kind:

- ``wall``: the median synced time of one windowed forward;
- ``kernels``: the GPU time of its kernels (torch.profiler), so ``wall - kernels`` is time the
  GPU waited for the host (launches, Python);
- ``attention``: the part of ``kernels`` in attention kernels (names holding flash, fmha, cudnn,
  attention, or FlexAttention's Triton template ``triton_tem``; the names matched are printed);
- the kernels taking the most GPU time, and the host's busiest operators.

Kinds, each with both caches: ``sdpa`` (transformers' SDPA attention), ``dense`` (the "sparsed"
attention with no SparseD state: windows of up to 64 rows through the split-KV dense decode
kernel on CUDA), ``sparsed``; and ``sparsed_flex+dual``, the dual window on FlexAttention (the
decode kernel refused), as it ran before the kernel took such windows.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench_e2e import build_model
from sparsed_backend import SparseDConfig, SparseDState
from sparsed_backend.attention import policy
from sparsed_backend.sampling.kv_cache import BlockKVCache
from sparsed_backend.timing import sync

ATTENTION_NAMES = ("flash", "fmha", "cudnn", "attention", "triton_tem")


def windowed_forward(model, ids, window, cache, state):
    """One cached step on ``window`` = (start, stop) (the logits of the window's last 32 rows)."""
    start, stop = window
    cache.set_window(start, stop)
    extra = {} if state is None else {"sparsed_state": state}
    return model(input_ids=ids[:, start:stop], logits_to_keep=min(32, stop - start), kv_cache=cache, **extra)


@contextlib.contextmanager
def patched_refusal(refusal):
    """Inside: `policy.decode_kernel_refusal` replaced by ``refusal`` (None: unchanged)."""
    saved = policy.decode_kernel_refusal
    if refusal is not None:
        policy.decode_kernel_refusal = refusal
    try:
        yield
    finally:
        policy.decode_kernel_refusal = saved


@torch.inference_mode()
def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=65536 if cuda else 1024, help="sequence length (prompt + gen)")
    p.add_argument("--gen", type=int, default=256, help="generated positions at the end of the sequence")
    p.add_argument("--block", type=int, default=32, help="decoding block (the dual window)")
    p.add_argument("--layers", type=int, default=8 if cuda else 2)
    p.add_argument("--select", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(args.layers, dev, dtype, small=not cuda)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), device=dev)
    gen_start = args.length - args.gen
    block = (gen_start + args.block, gen_start + 2 * args.block)  # the second decoding block
    windows = {"dual": block, "prefix": (block[0], args.length)}
    config = SparseDConfig(skip=0.2, select=args.select, min_sparse_len=0)
    print(f"length {args.length}, layers {args.layers}, {dev}, {dtype}, select {args.select}", flush=True)

    runs = [(attn, kind) for attn in ("sdpa", "dense", "sparsed") for kind in windows] + [("sparsed_flex", "dual")]
    for attn, kind in runs:
        window = windows[kind]
        model.set_attn_implementation("sdpa" if attn == "sdpa" else "sparsed")
        state = None
        if attn.startswith("sparsed"):
            state = SparseDState(config, steps=1000, gen_start=gen_start)
            state.step = config.switch_step(1000)  # the refresh below selects
        # sparsed_flex: the dual window on FlexAttention, as before the decode kernel took it
        refusal = (lambda query, block_size: "FlexAttention asked for") if attn == "sparsed_flex" else None
        with patched_refusal(refusal):
            cache = BlockKVCache(kind)
            cache.refresh()
            extra = {} if state is None else {"sparsed_state": state}
            model(input_ids=ids, logits_to_keep=32, kv_cache=cache, **extra)
            if state is not None:
                state.step = config.switch_step(1000) + 1  # the windows are sparse steps
            run = functools.partial(windowed_forward, model, ids, window, cache, state)
            for _ in range(3):
                run()
            sync(dev)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run()
                sync(dev)
                times.append(time.perf_counter() - t0)
            wall_ms = 1e3 * statistics.median(times)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                run()
                sync(dev)
            name = f"{attn}+{kind}"
            rows = window[1] - window[0]
            line = f"\n## {name}: {rows} query rows x {args.length} keys; wall {wall_ms:.2f} ms"
            if cuda:
                kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
                total = sum(e.self_device_time_total for e in kernels) / 1e3
                matched = sorted({e.name for e in kernels if any(a in e.name.lower() for a in ATTENTION_NAMES)})
                attention = sum(e.self_device_time_total for e in kernels if e.name in matched) / 1e3
                line += f"; kernels {total:.2f} ms (host-bound {wall_ms - total:.2f} ms); attention {attention:.2f} ms"
                print(line, flush=True)
                print("attention kernels: " + "; ".join(n[:80] for n in matched))
                table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.rows,
                                                      max_name_column_width=60)  # fmt: skip
                print(table)
            else:
                print(line + " (CPU: no kernel split)", flush=True)
            averages = prof.key_averages()
            print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
