"""Shape policy for compiled FlexAttention: static compiles vs dynamic shapes vs bucketed padding.

    python benchmarks/bench_shapes.py --lengths 16384 16640 65536 65792     # GPU: the committed table
    python benchmarks/bench_shapes.py --lengths 256 320 --heads 2           # CPU smoke size

One process, LLaDA-8B attention shape (32 heads x 128, bf16 on CUDA), one block-sparse mask
per length (select 0.3 of 128-token key blocks, drawn at random per row and head). For every
length it runs the same inputs through three compiled callers:

- ``static``: ``torch.compile(dynamic=False)``: one graph per distinct shape (today's policy);
- ``dynamic``: ``torch.compile(dynamic=True)``: every size symbolic;
- ``auto``: ``torch.compile(dynamic=None)``: static first, sizes that changed symbolic after;
- ``bucket``: static, with q/k/v zero-padded to the bucket grid (``flex_shapes.bucket_length``)
  and the tail keys masked; the time includes the padding copies.

Reported per caller and length: the first call's seconds (compile included), the median step
time, graphs compiled by this call, and the largest difference from the static output.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from common import bench, environment, markdown_table, write_results
from sparsed_backend._compat import compile_counters
from sparsed_backend.attention.masks import block_mask_from_table
from sparsed_backend.timing import synced_seconds


# One function per compiled caller: dynamo keeps its cache and recompile count per code object.
def _call_static(q, k, v, block_mask, scale, kernel_options):
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, kernel_options=kernel_options)


def _call_dynamic(q, k, v, block_mask, scale, kernel_options):
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, kernel_options=kernel_options)


def _call_auto(q, k, v, block_mask, scale, kernel_options):
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, kernel_options=kernel_options)


def _call_bucket(q, k, v, block_mask, scale, kernel_options):
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, kernel_options=kernel_options)


def _graphs() -> int:
    return compile_counters().get("stats", {}).get("unique_graphs", 0)


def _bucket(n: int, block: int) -> int:
    from sparsed_backend.attention.flex_shapes import bucket_length

    return bucket_length(n, block)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--select", type=float, default=0.3)
    p.add_argument("--policies", nargs="+", default=["static", "dynamic", "auto", "bucket"])
    p.add_argument("--out", default=None)
    p.add_argument("--name", default="bench_shapes")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = args.lengths or ([16384, 16640, 65536, 65792] if device.type == "cuda" else [256, 320])
    from sparsed_backend.attention import policy

    compiled = {
        "static": torch.compile(_call_static, dynamic=False, fullgraph=True),
        "dynamic": torch.compile(_call_dynamic, dynamic=True, fullgraph=True),
        "auto": torch.compile(_call_auto, dynamic=None, fullgraph=True),
        "bucket": torch.compile(_call_bucket, dynamic=False, fullgraph=True),
    }
    torch._dynamo.config.recompile_limit = 64
    rows = []
    torch.manual_seed(0)
    for n in lengths:
        g = torch.Generator(device=device).manual_seed(n)
        q, k, v = (torch.randn(1, args.heads, n, args.head_dim, device=device, dtype=dtype, generator=g) for _ in "qkv")
        nb = -(-n // args.block)
        keep = max(1, math.ceil(args.select * nb))
        scores = torch.rand(1, args.heads, nb, nb, device=device, generator=g)
        table = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(keep, -1).indices, True)
        full = device.type == "cuda"
        masks = {"static": block_mask_from_table(table, n, n, args.block, None, full_blocks=full)}
        masks["dynamic"] = masks["auto"] = masks["static"]
        nb_pad = _bucket(n, args.block)
        table_p = F.pad(table, (0, nb_pad // args.block - nb, 0, nb_pad // args.block - nb))
        valid = torch.arange(nb_pad, device=device)[None] < n
        masks["bucket"] = block_mask_from_table(table_p, nb_pad, nb_pad, args.block, valid, full_blocks=full)
        opts = policy.flex_kernel_options(q, masks["static"])
        ref = None
        for name in args.policies:
            mask = masks[name]

            def run(name=name, mask=mask, qkv=(q, k, v), opts=opts, n=n, pad=nb_pad - n):
                if name != "bucket":
                    return compiled[name](*qkv, mask, args.head_dim**-0.5, opts)
                padded = (F.pad(t, (0, 0, 0, pad)) for t in qkv)
                return compiled[name](*padded, mask, args.head_dim**-0.5, opts)[:, :, :n]

            before = _graphs()
            try:
                first, out = synced_seconds(run, device)  # compilation included
                err = 0.0 if ref is None else float((out.float() - ref.float()).abs().max())
                if ref is None:
                    ref = out
                ms, failure = bench(run, device)
                status = failure or "ok"
            except Exception as e:  # record why a configuration failed and go on
                first, err, ms, status = math.nan, math.nan, math.nan, f"{type(e).__name__}: {str(e)[:160]}"
            row = {"policy": name, "length": n, "padded_to": nb_pad if name == "bucket" else n,
                   "first_call_s": first, "step_ms": ms, "new_graphs": _graphs() - before, "max_abs_diff": err,
                   "status": status}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    env = environment(device)
    env.update({"dtype": str(dtype), "heads": args.heads, "head_dim": args.head_dim, "block": args.block,
                "select": args.select})  # fmt: skip
    cols = ["policy", "length", "padded_to", "first_call_s", "step_ms", "new_graphs", "max_abs_diff", "status"]
    table = markdown_table(rows, cols)
    out = write_results(args.name, env, rows, table, args.out)
    print(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
