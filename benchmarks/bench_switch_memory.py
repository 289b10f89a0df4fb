"""One layer's switch step at long context: peak memory, time and mask state, against a dense pass.

    python benchmarks/bench_switch_memory.py --lengths 65536 131072 262144     # H200
    python benchmarks/bench_switch_memory.py                                   # CPU smoke size

Per attention shape (LLaDA-8B: 32 query / 32 key-value heads; Dream-7B: 28 / 4; head_dim 128)
and prompt length, on random bf16 Q/K/V laid out as the models hand them over ((B, L, H, D)
projections transposed to (B, H, L, D)), it measures in one process:

- ``dense``: the dense pass of the steps before the switch (`dense.dense_attention`);
- ``cudnn_grouped`` / ``cudnn_repeated``: cuDNN's attention with log-sum-exp on the grouped K/V
  heads as given, and on K/V repeated to the query's head count (what the switch step did before);
  ``lse_diff`` is the largest log-sum-exp difference between the two (GQA shapes only);
- ``switch``: the library's whole switch step (`switch_step.run_switch_step`: dense pass, block
  scoring, selection and BlockMask) on each block grid, with the layer's mask state.

``mask_state_mib`` is one layer's BlockMask index lists plus block table; a model holds one per
layer, all of the same size (the index lists are trimmed to the host-known widest row), so the
model's mask state is ``layers`` times it (``model_mask_state_mib``). Peaks are above what was
allocated before the call (Q/K/V excluded).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from common import environment, markdown_table, write_results
from sparsed_backend import SparseDConfig, _compat
from sparsed_backend.attention.dense import dense_attention
from sparsed_backend.attention.switch_step import run_switch_step
from sparsed_backend.timing import PeakMemory, synced_seconds

SHAPES = {"llada": (32, 32, 32), "dream": (28, 4, 28)}  # query heads, key-value heads, layers


def measure(fn, device: torch.device) -> tuple[float, float, object]:
    """(seconds, peak MiB above the start, result) of one synced call of ``fn``
    (`sparsed_backend.timing`); a call that raises
    gives (nan, nan, "ErrorType: first line")."""
    try:
        with PeakMemory(device) as peak:
            seconds, result = synced_seconds(fn, device)
        return seconds, peak.mib, result
    except Exception as err:  # a failing configuration is recorded with its error
        return math.nan, math.nan, f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"


@torch.inference_mode()
def run_shape(name: str, n: int, args, device, dtype, rows: list[dict]) -> None:
    hq, hkv, layers = SHAPES[name]
    d, scale = args.head_dim, args.head_dim**-0.5
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, n, hq, d, device=device, dtype=dtype, generator=g).transpose(1, 2)
    k = torch.randn(1, n, hkv, d, device=device, dtype=dtype, generator=g).transpose(1, 2)
    v = torch.randn(1, n, hkv, d, device=device, dtype=dtype, generator=g).transpose(1, 2)
    qkv_mib = sum(t.numel() * t.element_size() for t in (q, k, v)) / 2**20
    base = {"shape": name, "N": n, "heads": f"{hq}/{hkv}", "qkv_mib": qkv_mib}

    def record(kind: str, fn, warm: bool = True, **extra):
        if warm:
            measure(fn, device)  # warm-up: kernel selection and compilation stay out of the numbers
        seconds, peak, result = measure(fn, device)
        row = dict(base, kind=kind, seconds=seconds, peak_mib=peak, **extra)
        if isinstance(result, str):
            row["error"] = result
        rows.append(row)
        print(f"  {name:5s} N={n:7d} {kind:16s} {seconds:8.3f} s  peak {peak:9.1f} MiB {row.get('error', '')}",
              flush=True)  # fmt: skip
        return result

    record("dense", lambda: dense_attention(q, k, v, scale))
    if device.type == "cuda":
        grouped = record("cudnn_grouped", lambda: _compat.cudnn_attention_with_lse(q, k, v, scale))
        rep = hq // hkv

        def repeated_heads():
            return _compat.cudnn_attention_with_lse(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), scale)

        repeated = record("cudnn_repeated", repeated_heads)
        if hq != hkv and not isinstance(grouped, str) and not isinstance(repeated, str):
            diff = (grouped[1].float() - repeated[1].float()).abs().max().item()
            out_diff = (grouped[0].float() - repeated[0].float()).abs().max().item()
            rows[-2].update(lse_diff=diff, out_diff=out_diff)
        del grouped, repeated
    gen_start = n - args.gen_length
    for grid in args.grids:
        cfg = SparseDConfig(skip=args.skip, select=args.select, block_size=args.block_size, min_sparse_len=0,
                            prompt_end_offset=None if grid == "none" else grid)  # fmt: skip
        result = record(
            f"switch_{grid}",
            lambda cfg=cfg: run_switch_step(q, k, v, scale, cfg, gen_start=gen_start),
        )
        if not isinstance(result, str):
            mib = result[1].memory_bytes() / 2**20
            rows[-1].update(mask_state_mib=mib, model_mask_state_mib=mib * layers, layers=layers,
                            density=float(result[1].density))  # fmt: skip
        del result
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072, 262144] if cuda else [1024])
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["llada", "dream"])
    p.add_argument("--grids", nargs="+", choices=["middle", "none"], default=["middle", "none"])
    p.add_argument("--head-dim", type=int, default=128 if cuda else 32)
    p.add_argument("--skip", type=float, default=0.2)
    p.add_argument("--select", type=float, default=0.3)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--name", default="bench_switch_memory" if cuda else "bench_switch_memory_cpu_smoke")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    env = environment(device)
    env.update(skip=args.skip, select=args.select, block_size=args.block_size, head_dim=args.head_dim, batch=1)
    print(json.dumps(env), flush=True)
    rows: list[dict] = []
    for n in args.lengths:
        for name in args.shapes:
            run_shape(name, n, args, device, dtype, rows)
    cols = ["shape", "N", "heads", "kind", "seconds", "peak_mib", "qkv_mib", "mask_state_mib", "layers",
            "model_mask_state_mib", "density", "lse_diff", "out_diff", "error"]  # fmt: skip
    table = markdown_table(rows, cols)
    write_results(args.name, env, rows, table, args.out)
    print(table)


if __name__ == "__main__":
    main()
