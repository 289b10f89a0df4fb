"""Attention alone: dense kernels vs sparsed, plus the switch step, per length and model shape.

    python benchmarks/bench_attention.py                      # GPU: 4k..64k, both shapes
    python benchmarks/bench_attention.py --lengths 512 1024   # CPU smoke size (default on CPU)

Times are medians of device-synced runs after warm-up (compile excluded). TFLOP/s are
sparsity-adjusted: 4 * B * Hq * L * S * D * (kept share of blocks) / time. speedup_vs_dense
is against cuDNN SDPA measured in the same run; switch_overhead is (switch step - dense step)
/ dense step, where the switch step is dense attention + scoring + selection + mask build.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import bench, environment, markdown_table, pyplot, write_results
from sparsed_backend import SparseDConfig
from sparsed_backend.attention.backend import dense_attention, sparse_attention
from sparsed_backend.attention.masks import block_mask_from_table
from sparsed_backend.attention.switch_step import dense_with_lse, run_switch_step, select_layer
from sparsed_backend.timing import peak_mib

SHAPES = {"llada": (32, 32, 128), "dream": (28, 4, 128)}  # (q heads, kv heads, head_dim)


def sdpa_with(backend, q, k, v, scale, expand=False):
    if expand and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    gqa = k.shape[1] != q.shape[1]
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=False, scale=scale, enable_gqa=gqa)


def run_shape(name, n, args, device, dtype, rows):
    hq, hkv, d = SHAPES[name]
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, hq, n, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, hkv, n, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(1, hkv, n, d, device=device, dtype=dtype, generator=g)
    scale = d**-0.5
    flops = 4 * hq * n * n * d
    base = {"shape": name, "N": n, "heads": f"{hq}/{hkv}", "head_dim": d, "dtype": str(dtype).split(".")[-1]}

    def add(method, fn, density=1.0):
        ms, failure = bench(fn, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        mem = math.nan
        if device.type == "cuda" and failure is None:
            with contextlib.suppress(Exception):  # timed fine, failed measuring memory: the time stays, memory NaN
                mem = peak_mib(fn, device)
        row = dict(base, method=method, ms=ms, density=density, tflops=flops * density / ms / 1e9, peak_mib=mem,
                   status=failure or "ok")  # fmt: skip
        rows.append(row)
        print(f"  {name:6s} N={n:6d} {method:28s} {ms:9.3f} ms  {row['tflops']:7.1f} TFLOP/s  {mem:8.1f} MiB")
        return ms

    ref_ms = math.nan
    if device.type == "cuda":
        ref_ms = add("sdpa_cudnn", lambda: sdpa_with(SDPBackend.CUDNN_ATTENTION, q, k, v, scale))
        if hkv != hq:
            add("sdpa_cudnn_expand_kv", lambda: sdpa_with(SDPBackend.CUDNN_ATTENTION, q, k, v, scale, True))
        add("sdpa_flash", lambda: sdpa_with(SDPBackend.FLASH_ATTENTION, q, k, v, scale))
    backend_ms = add("sparsed_dense_step", lambda: dense_attention(q, k, v, scale))
    if math.isnan(ref_ms):
        ref_ms = backend_ms

    bs = args.block_size
    n_blocks = -(-n // bs)
    full = torch.ones(1, hq, n_blocks, n_blocks, dtype=torch.bool, device=device)
    full_mask = block_mask_from_table(full, n, n, bs, None, full_blocks=device.type == "cuda")
    add("flex_dense", lambda: sparse_attention(q, k, v, full_mask, scale))

    _, lse = dense_with_lse(q, k, v, scale)
    for select in args.selects:
        cfg = SparseDConfig(skip=0.0, select=select, block_size=bs, min_sparse_len=0)
        # Scoring + selection + mask build alone (the dense pass's log-sum-exp given).
        add(f"switch_select@{select}", lambda cfg=cfg: select_layer(q, k, scale, cfg, lse=lse), density=0.0)
        # The whole switch step: dense attention with log-sum-exp, then the above.
        switch_ms = add(f"switch_step@{select}", lambda cfg=cfg: run_switch_step(q, k, v, scale, cfg), density=1.0)
        rows[-1]["switch_overhead"] = (switch_ms - backend_ms) / backend_ms
        sel = select_layer(q, k, scale, cfg, lse=lse)
        rows[-1]["mask_mib"] = sel.memory_bytes() / 2**20
        for i, opts in enumerate(args.flex_options):
            tag = f"sparsed@{select}" + (f"[opt{i}]" if len(args.flex_options) > 1 else "")
            ms = add(
                tag,
                lambda o=opts, m=sel.block_mask: sparse_attention(q, k, v, m, scale, kernel_options=o),
                float(sel.density),
            )
            rows[-1]["speedup_vs_dense"] = ref_ms / ms
            rows[-1]["kernel_options"] = json.dumps(opts)


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536] if cuda else [512, 1024])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--selects", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--flex-options", type=json.loads, default=[None], help="JSON list of kernel_options dicts")
    p.add_argument("--name", default="bench_attention" if cuda else "bench_attention_cpu_smoke")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        SHAPES.update({"llada": (4, 4, 64), "dream": (4, 2, 64)})  # CPU smoke size
    env = environment(device)
    print(json.dumps(env))
    rows: list[dict] = []
    for name in args.shapes:
        for n in args.lengths:
            run_shape(name, n, args, device, dtype, rows)
    cols = ["shape", "N", "method", "ms", "tflops", "density", "speedup_vs_dense", "switch_overhead", "peak_mib",
            "status"]  # fmt: skip
    table = markdown_table(rows, cols)
    out = write_results(args.name, env, rows, table, args.out)
    plot(rows, out / f"{args.name}.png")
    print(table)


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        sub = [r for r in rows if r["shape"] == shape and not r["method"].startswith("switch")]
        for method in dict.fromkeys(r["method"] for r in sub):
            pts = [(r["N"], r["ms"]) for r in sub if r["method"] == method and not math.isnan(r["ms"])]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="ms (median)", title=shape)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
