"""Tensor parallel end to end: LLaDA-8B shape (random weights), TP=N ranks against 1 GPU.

    # once per machine, then per TP size (every run appends its own result files):
    torchrun --nproc-per-node 1 benchmarks/bench_tp.py --checkpoint /tmp/llada8b --out DIR
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --checkpoint /tmp/llada8b --out DIR
    python benchmarks/bench_tp.py --compare --out DIR          # the side-by-side table
    # CPU smoke size, 2 processes on gloo (needs accelerate, as transformers' TP loading does):
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --smoke

The model is loaded from a checkpoint with ``distributed_config=DistributedConfig(tp_plan=
"auto")`` when there is more than one rank (the way users shard it), and as a plain one-device
model with a single rank. When ``--checkpoint`` holds no model yet, rank 0 builds one with
random weights (bench_e2e's LLaDA-8B config) and saves it there first (about 16 GB in bf16).

Per length it times, on every rank, a dense step (the sparsed backend's dense path), the switch
step (dense + block scoring + masks) and a sparse step, each after a discarded warm-up, and
reports the slowest rank's median. The full generation is projected as in bench_e2e: total =
dense * switch_index + switch + sparse * (steps - switch_index - 1). Memory per rank: what the
weights hold after loading and the peak allocated while stepping (weights included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench_e2e import build_model, sparsed_total, step_runners
from common import environment, markdown_table, write_results
from sparsed_backend import SparseDConfig
from sparsed_backend.timing import PeakMemory, median_seconds

COLUMNS = ["tp", "N", "layers", "dense_s", "switch_s", "sparse_s", "step_speedup", "density", "weights_gib",
           "peak_gib", "load_s"]  # fmt: skip
SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size")


def _setup() -> tuple[int, int, torch.device]:
    """Process group (when torchrun started several ranks) and this rank's device."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        # Rank 0 may spend minutes writing the checkpoint while the others wait at a barrier.
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=datetime.timedelta(minutes=30))  # fmt: skip
    return rank, world, device


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def ensure_checkpoint(path: Path, args, rank: int, world: int, device, dtype):
    """Write a random-weight model to ``path`` on rank 0 unless one is there; return it if built."""
    model = None
    if rank == 0 and not (path / "config.json").exists():
        t0 = time.perf_counter()
        model = build_model(args.layers, device, dtype, small=args.smoke)
        model.save_pretrained(path)
        print(f"wrote a random {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B-parameter model to "
              f"{path} in {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        if world > 1:  # the sharded load below reads it back
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    _barrier(world)
    return model


def load(path: Path, world: int, device, dtype):
    from transformers import AutoModel, DistributedConfig

    if world == 1:
        model = AutoModel.from_pretrained(path, attn_implementation="sparsed", dtype=dtype, device_map=device)
    else:
        model = AutoModel.from_pretrained(
            path, attn_implementation="sparsed", dtype=dtype, distributed_config=DistributedConfig(tp_plan="auto")
        )
    return model.eval()


def timed(fn, device, repeats: int, world: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` synced calls (`sparsed_backend.timing`), after
    one discarded warm-up (compilation, autotuning), every rank at a barrier before each call."""
    return median_seconds(fn, device, repeats, warmup=1, before=lambda: _barrier(world))


@torch.no_grad()
def run_length(model, n: int, args, device, world: int) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=device, generator=g)
    keep = args.gen_length
    cfg = SparseDConfig(skip=args.skip, select=args.select, block_size=args.block_size, min_sparse_len=0)
    run, state = step_runners(model, ids, keep, cfg, n - keep)

    mine = {}
    # The switch step is the slowest and runs once per generation: one timed run after warm-up.
    kinds = (
        ("dense", run["dense"], args.repeats),
        ("switch", run["switch"], 1),
        ("sparse", run["sparse"], args.repeats),
    )
    with PeakMemory(device) as peak:  # the peak over every step kind
        for name, fn, reps in kinds:
            t0 = time.perf_counter()
            mine[f"{name}_s"] = timed(fn, device, reps, world)
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"  TP={world} N={n} {name}: {mine[f'{name}_s']:.3f} s per step "
                      f"({time.perf_counter() - t0:.0f} s with warm-up)", flush=True)  # fmt: skip
    mine["peak_gib"] = peak.total_mib / 2**10  # weights included
    mine["density"] = state.density()  # of this rank's heads
    ranks = _gather(mine, world)
    row = {"tp": world, "N": n, "layers": model.config.n_layers}
    for key in ("dense_s", "switch_s", "sparse_s", "peak_gib"):
        row[key] = max(r[key] for r in ranks)  # the slowest rank sets the pace
    row["density"] = statistics.fmean(r["density"] for r in ranks)  # every rank has as many heads
    row["peak_gib_per_rank"] = [r["peak_gib"] for r in ranks]
    row["step_speedup"] = row["dense_s"] / row["sparse_s"]
    for total in args.steps:
        row[f"dense_total_{total}_s"] = total * row["dense_s"]
        row[f"sparsed_total_{total}_s"] = sparsed_total(cfg, total, row["dense_s"], row["switch_s"], row["sparse_s"])
    return row


def compare(out: Path, name: str, steps: list[int]) -> None:
    """Side by side: every TP size's runs from ``out``, with speedups over TP=1."""
    runs = {}
    for f in sorted(out.glob(f"{name}_tp*.json")):
        data = json.loads(f.read_text())
        runs[data["rows"][0]["tp"]] = data
    if 1 not in runs:
        raise SystemExit(f"no {name}_tp1.json in {out}: run the 1-rank baseline first")
    rows = []
    for _, data in sorted(runs.items()):
        for r in data["rows"]:
            base = next(b for b in runs[1]["rows"] if b["N"] == r["N"])
            for total in steps:
                rows.append({
                    **{k: r[k] for k in COLUMNS}, "steps": total,
                    "dense_total_s": r[f"dense_total_{total}_s"], "sparsed_total_s": r[f"sparsed_total_{total}_s"],
                    "sparsed_over_dense": r[f"dense_total_{total}_s"] / r[f"sparsed_total_{total}_s"],
                    "dense_tp_speedup": base[f"dense_total_{total}_s"] / r[f"dense_total_{total}_s"],
                    "sparsed_tp_speedup": base[f"sparsed_total_{total}_s"] / r[f"sparsed_total_{total}_s"],
                    "sparsed_tpN_over_dense_tp1": base[f"dense_total_{total}_s"] / r[f"sparsed_total_{total}_s"],
                })  # fmt: skip
    keys = ("device", "torch", "transformers", "dtype", "date", "command")
    env = {f"TP={tp}": ", ".join(str(data["environment"].get(k)) for k in keys) for tp, data in sorted(runs.items())}
    env["shape"] = runs[1]["environment"].get("shape")
    env["sparsed"] = ", ".join(f"{k} {runs[1]['environment'].get(k)}" for k in ("skip", "select", "block_size"))
    env["reading"] = ("per-step times are the slowest rank's medians; totals are projected from them; "
                      "*_tp_speedup = TP=1 total / TP=N total; sparsed_tpN_over_dense_tp1 = dense on 1 GPU / "
                      "sparsed on N GPUs; peak_gib is per rank, weights included")  # fmt: skip
    cols = ["tp", "N", "steps", "dense_s", "switch_s", "sparse_s", "dense_total_s", "sparsed_total_s",
            "sparsed_over_dense", "dense_tp_speedup", "sparsed_tp_speedup", "sparsed_tpN_over_dense_tp1",
            "weights_gib", "peak_gib", "density"]  # fmt: skip
    table = markdown_table(rows, cols)
    write_results(name, env, rows, table, out)
    print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (gloo), to test the script")
    p.add_argument("--checkpoint", default=None, help="model directory; written on rank 0 when empty")
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--steps", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--skip", type=float, default=0.2)
    p.add_argument("--select", type=float, default=0.3)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--name", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--compare", action="store_true", help="merge the runs in --out into one table (no torchrun)")
    args = p.parse_args()
    args.name = args.name or ("bench_tp_cpu_smoke" if args.smoke else "bench_tp")
    if args.compare:
        compare(Path(args.out) if args.out else Path(__file__).resolve().parent / "results", args.name, args.steps)
        return
    if args.smoke:
        args.lengths = args.lengths or [256]
        args.layers = args.layers or 2
        args.block_size, args.gen_length = min(args.block_size, 32), min(args.gen_length, 64)
        args.checkpoint = args.checkpoint or "/tmp/sparsed_bench_tp_smoke"
    else:
        args.lengths = args.lengths or [65536]
        args.layers = args.layers or 32
        if args.checkpoint is None:
            p.error("--checkpoint is required (a directory for the random-weight model)")
    rank, world, device = _setup()
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("no CUDA device: use --smoke for the CPU size")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = Path(args.checkpoint)

    model = ensure_checkpoint(path, args, rank, world, device, dtype)
    load_s = math.nan  # a model just built in memory was not loaded
    if model is None:
        t0 = time.perf_counter()
        model = load(path, world, device, dtype)
        _barrier(world)
        load_s = time.perf_counter() - t0
    weights = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    weights = max(_gather(weights, world))
    rows = []
    for n in args.lengths:
        row = run_length(model, n, args, device, world)
        row.update(weights_gib=weights, load_s=load_s)
        rows.append(row)
        if rank == 0:
            print(json.dumps({k: row[k] for k in COLUMNS}), flush=True)
    if rank == 0:
        env = environment(device)
        shape = {k: getattr(model.config, k) for k in SHAPE_KEYS}
        env.update(tp=world, dtype=str(dtype).removeprefix("torch."), skip=args.skip, select=args.select,
                   block_size=args.block_size, gen_length=args.gen_length, batch=1, shape=json.dumps(shape),
                   command=f"torchrun --nproc-per-node {world} {env['command']}")  # fmt: skip
        cols = COLUMNS + [f"{k}_total_{t}_s" for t in args.steps for k in ("dense", "sparsed")]
        write_results(f"{args.name}_tp{world}", env, rows, markdown_table(rows, cols), args.out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
