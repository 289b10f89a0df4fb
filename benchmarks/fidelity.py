"""Fidelity: exact-match accuracy of the shipped retrieval model, dense vs SparseD and baselines.

    python benchmarks/fidelity.py --prompts 256                 # GPU, the committed table
    python benchmarks/fidelity.py --prompts 16 --lengths 512    # CPU smoke size

Grid: context length x select x skip for SparseD (skip = 0 is "sparse from step 0": the
pattern chosen at step 0 is used from step 1 on), plus baselines of the same density in the
same harness: "local" (a sliding window of key blocks, no scoring) and "reselect" (top-k
blocks chosen afresh from dense scores at every sparse step). Every cell answers the same
prompts greedily; the interval is the 95% Wilson score interval.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch
from transformers import AutoModel, AutoTokenizer

from common import environment, markdown_table, write_results
from sparsed_backend import SparseDConfig
from sparsed_backend.cli import shipped_model_path
from sparsed_backend.demo import exact_match, make_batch
from sparsed_backend.generation import llada_generate


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.inference_mode()
def accuracy(model, tok, ids, answers, args, sparsed) -> tuple[int, float]:
    correct, density = 0, []
    for i in range(0, ids.shape[0], args.batch):
        out = llada_generate(
            model, ids[i : i + args.batch], steps=args.steps, gen_length=args.gen_length,
            block_length=args.gen_length, sparsed=sparsed, return_dict_in_generate=True,
        )  # fmt: skip
        preds = tok.batch_decode(out.sequences[:, ids.shape[1] :], skip_special_tokens=True)
        correct += sum(exact_match(p, a) for p, a in zip(preds, answers[i : i + args.batch], strict=True))
        if out.sparsed_state is not None and out.sparsed_state.layers:
            density.append(out.sparsed_state.density())
    return correct, (sum(density) / len(density) if density else 1.0)


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048] if cuda else [512])
    p.add_argument("--selects", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    p.add_argument("--skips", type=float, nargs="+", default=[0.0, 0.1, 0.2])
    p.add_argument("--baseline-skip", type=float, default=0.2, help="skip used by the baselines")
    p.add_argument("--prompts", type=int, default=256 if cuda else 16)
    p.add_argument("--batch", type=int, default=128 if cuda else 8)
    p.add_argument("--steps", type=int, default=None, help="default: one per generated token")
    p.add_argument("--gen-length", type=int, default=None, help="default: the model's trained answer span")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--name", default="fidelity" if cuda else "fidelity_cpu_smoke")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    path = args.model or shipped_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="sparsed", dtype=getattr(torch, args.dtype))
    model = model.to(device).eval()
    args.gen_length = args.gen_length or int(getattr(model.config, "demo_gen_length", 4))
    args.steps = args.steps or args.gen_length
    env = environment(device)
    env.update(model=str(path), dtype=args.dtype, prompts_per_cell=args.prompts, steps=args.steps,
               gen_length=args.gen_length, block_size=args.block_size, greedy=True)  # fmt: skip
    print(json.dumps(env))

    rows: list[dict] = []
    for n in args.lengths:
        prompts, answers = make_batch(random.Random(args.seed + n), n, args.prompts)
        ids = tok(prompts, return_tensors="pt")["input_ids"].to(device)
        cells = [("dense", None, None, None)]
        for skip in args.skips:
            for select in args.selects:
                cells.append(("sparsed", select, skip, SparseDConfig(skip=skip, select=select,
                              block_size=args.block_size, min_sparse_len=0)))  # fmt: skip
        for select in args.selects:
            for name, extra in (("local", {"pattern": "local"}), ("reselect", {"reselect": True})):
                cfg = SparseDConfig(skip=args.baseline_skip, select=select, block_size=args.block_size,
                                    min_sparse_len=0, **extra)  # fmt: skip
                cells.append((name, select, args.baseline_skip, cfg))
        for method, select, skip, cfg in cells:
            t0 = time.perf_counter()
            k, density = accuracy(model, tok, ids, answers, args, cfg)
            lo, hi = wilson(k, len(answers))
            row = {"N": ids.shape[1], "method": method, "select": select, "skip": skip, "correct": k,
                   "prompts": len(answers), "accuracy": k / len(answers), "ci95_low": lo, "ci95_high": hi,
                   "density": density, "seconds": time.perf_counter() - t0}  # fmt: skip
            rows.append(row)
            print(f"  N={row['N']:5d} {method:9s} select={select} skip={skip}: {k}/{len(answers)} "
                  f"= {row['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] density {density:.2f}", flush=True)  # fmt: skip
    cols = ["N", "method", "select", "skip", "accuracy", "ci95_low", "ci95_high", "correct", "prompts", "density"]
    table = markdown_table(rows, cols)
    out = write_results(args.name, env, rows, table, args.out)
    plot(rows, out / f"{args.name}.png")
    print(table)


def plot(rows, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    lengths = sorted({r["N"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.2), squeeze=False)
    for ax, n in zip(axes[0], lengths, strict=True):
        sub = [r for r in rows if r["N"] == n]
        dense = next(r for r in sub if r["method"] == "dense")
        ax.axhline(dense["accuracy"], color="black", ls="--", label="dense")
        series = {}
        for r in sub:
            if r["method"] == "sparsed":
                series.setdefault(f"SparseD skip={r['skip']}", []).append(r)
            elif r["method"] != "dense":
                series.setdefault(f"{r['method']} skip={r['skip']}", []).append(r)
        for label, pts in series.items():
            xs = [r["select"] for r in pts]
            ys = [r["accuracy"] for r in pts]
            err = [[r["accuracy"] - r["ci95_low"] for r in pts], [r["ci95_high"] - r["accuracy"] for r in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        ax.set(
            xlabel="select (share of key blocks kept)", ylabel="exact match", title=f"N = {n} tokens", ylim=(0, 1.02)
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
