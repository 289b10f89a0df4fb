"""End to end: one denoising step of a LLaDA-8B-shaped model (random weights), dense vs sparsed.

    python benchmarks/bench_e2e.py --lengths 16384 32768 65536 --layers 32     # H100
    python benchmarks/bench_e2e.py                                             # CPU smoke size

Per length it times, in one process and on one model: a dense step on the fastest dense
kernel (cuDNN through our backend's dense path), a dense step on FlashAttention-2 (HF "sdpa"
pinned to the flash backend), the switch step (dense + block scoring + masks for every
layer) and a sparse step. It then weighs them by the schedule (skip, select) for several step
counts: total = dense * switch_index + switch + sparse * (steps - switch_index - 1).
Logits are computed for the last --gen-length positions only, as the samplers do.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import environment, markdown_table, write_results
from sparsed_backend import SparseDConfig, SparseDState
from sparsed_backend.attention import flex_shapes
from sparsed_backend.models import LLaDAConfig, LLaDAModelLM
from sparsed_backend.timing import PeakMemory, median_seconds


def build_model(layers: int, device: torch.device, dtype: torch.dtype, small: bool) -> LLaDAModelLM:
    if small:  # CPU smoke size
        cfg = LLaDAConfig(d_model=256, n_heads=4, n_kv_heads=4, n_layers=layers, mlp_hidden_size=512,
                          vocab_size=512, embedding_size=512)  # fmt: skip
    else:  # LLaDA-8B shape
        cfg = LLaDAConfig(n_layers=layers)
    with torch.device(device):
        model = LLaDAModelLM._from_config(cfg, attn_implementation="sparsed", dtype=dtype)
    return model.eval()


def timed(fn, device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak MiB above baseline) of ``fn()`` over ``repeats`` synced calls
    (`sparsed_backend.timing`; the caller runs the warm-up)."""
    with PeakMemory(device) as peak:
        seconds = median_seconds(fn, device, repeats)
    return seconds, peak.mib


def step_runners(model, ids, keep, config: SparseDConfig, gen_start: int):
    """Closures that run one forward of each step kind: ``{"dense", "switch", "sparse"}``.

    The state parks on a long schedule's switch step (clearing its masks, so every call selects
    again) or on the step after it (reusing them). Returns (the closures, that SparseDState).
    """
    steps = 1000  # any schedule long enough to park the state on a given step kind
    switch = config.switch_step(steps)
    state = SparseDState(config, steps=steps, gen_start=gen_start)

    def dense():
        model(ids, logits_to_keep=keep)

    def switch_step():
        state.step = switch
        state.layers.clear()
        model(ids, logits_to_keep=keep, sparsed_state=state)

    def sparse_step():
        state.step = switch + 1
        model(ids, logits_to_keep=keep, sparsed_state=state)

    return {"dense": dense, "switch": switch_step, "sparse": sparse_step}, state


def sparsed_total(config: SparseDConfig, steps: int, dense_s: float, switch_s: float, sparse_s: float) -> float:
    """A ``steps``-step SparseD generation from its step times: dense steps up to the switch step,
    the switch step, then sparse steps."""
    s = config.switch_step(steps)
    return s * dense_s + switch_s + (steps - s - 1) * sparse_s


@torch.inference_mode()
def run_length(model, n, args, device, rows):
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=device, generator=g)
    keep = args.gen_length

    def dense():
        model(ids, logits_to_keep=keep)

    def flash():
        model.config._attn_implementation = "sdpa"
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                model(ids, logits_to_keep=keep)
        finally:
            model.config._attn_implementation = "sparsed"

    base = {"N": n, "layers": model.config.n_layers}
    for name, fn, reps in (("dense_cudnn", dense, args.repeats), ("dense_fa2", flash, args.repeats)):
        fn()  # warm-up: compilation and autotuning stay out of the numbers
        sec, peak = timed(fn, device, reps)
        base[f"{name}_s"], base[f"{name}_peak_mib"] = sec, peak
        print(f"  N={n:6d} {name:12s} {sec:8.3f} s  peak {peak:9.1f} MiB", flush=True)
    for grid, shapes in itertools.product(args.grids, args.shape_policies):
        # grid: SparseDConfig.prompt_end_offset ("middle", the default, or "none", the paper's).
        # shapes: "bucket", the package's policy (flex_shapes); "exact": static compiles at the
        # real lengths, the policy before bucketing, measured side by side.
        offset = None if grid == "none" else grid
        cfg = SparseDConfig(skip=args.skip, select=args.select, block_size=args.block_size, min_sparse_len=0,
                            prompt_end_offset=offset)  # fmt: skip
        run, state = step_runners(model, ids, keep, cfg, n - keep)
        ctx = flex_shapes.exact_lengths() if shapes == "exact" else contextlib.nullcontext()
        with ctx:
            result = dict(base, grid=grid, front=cfg.grid_front(n - keep), shapes=shapes)
            steps = (("switch", run["switch"], max(1, args.repeats - 1)), ("sparse", run["sparse"], args.repeats))
            for name, fn, reps in steps:
                fn()  # warm-up: compilation and autotuning stay out of the numbers
                sec, peak = timed(fn, device, reps)
                result[f"{name}_s"], result[f"{name}_peak_mib"] = sec, peak
                print(f"  N={n:6d} {grid:6s} {shapes:6s} {name:12s} {sec:8.3f} s  peak {peak:9.1f} MiB", flush=True)
            result["flex_lengths"] = state.layers[0].block_mask.seq_lengths[1]
        _totals(result, state, cfg, args, rows)


def _totals(result, state, cfg, args, rows) -> None:
    result["mask_state_mib"] = state.memory_bytes() / 2**20
    result["density"] = state.density()
    result["step_speedup"] = result["dense_cudnn_s"] / result["sparse_s"]
    result["switch_over_dense"] = result["switch_s"] / result["dense_cudnn_s"]
    for total_steps in args.steps:
        sparse_total = sparsed_total(cfg, total_steps, result["dense_cudnn_s"], result["switch_s"], result["sparse_s"])
        for base in ("dense_cudnn", "dense_fa2"):
            row = dict(result, steps=total_steps, baseline=base)
            row["baseline_total_s"] = total_steps * result[f"{base}_s"]
            row["sparsed_total_s"] = sparse_total
            row["speedup"] = row["baseline_total_s"] / sparse_total
            rows.append(row)


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536] if cuda else [512])
    p.add_argument("--layers", type=int, default=32 if cuda else 2)
    p.add_argument("--steps", type=int, nargs="+", default=[128, 256, 1024])
    p.add_argument("--skip", type=float, default=0.2)
    p.add_argument("--select", type=float, default=0.3)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--shape-policies",
        nargs="+",
        choices=["bucket", "exact"],
        default=["bucket"],
        help="bucket: the package's FlexAttention shapes; exact: static compiles at the real lengths",
    )
    p.add_argument(
        "--grids",
        nargs="+",
        choices=["middle", "none"],
        default=["middle"],
        help="SparseDConfig.prompt_end_offset: middle (the default) or none (the paper's block grid)",
    )
    p.add_argument("--name", default="bench_e2e" if cuda else "bench_e2e_cpu_smoke")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    env = environment(device)
    env.update(skip=args.skip, select=args.select, block_size=args.block_size, layers=args.layers, batch=1)
    print(json.dumps(env))
    model = build_model(args.layers, device, dtype, small=not cuda)
    rows: list[dict] = []
    for n in args.lengths:
        run_length(model, n, args, device, rows)
        if cuda:
            torch.cuda.empty_cache()
    cols = ["N", "grid", "front", "shapes", "flex_lengths", "layers", "steps", "baseline", "dense_cudnn_s",
            "dense_fa2_s", "switch_s", "sparse_s", "baseline_total_s", "sparsed_total_s", "speedup",
            "sparse_peak_mib", "dense_cudnn_peak_mib", "mask_state_mib"]  # fmt: skip
    table = markdown_table(rows, cols)
    write_results(args.name, env, rows, table, args.out)
    print(table)


if __name__ == "__main__":
    main()
