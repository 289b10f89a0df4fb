"""Fidelity: greedy exact match of the shipped retrieval model, dense vs SparseD and baselines.

    python benchmarks/fidelity.py                                  # GPU: the committed table
    python benchmarks/fidelity.py --prompts 8 --lengths 512 --selects 0.3   # CPU smoke size
    python benchmarks/fidelity.py --keys 4 --methods sparsed --selects 0.3 --caches prefix dual \
        --threshold 0.9 --model DIR      # multi-key questions, every cache and schedule

Every cell answers the same fresh prompts (``sample_prompts(seed=--seed + length)``; training
never used these seeds) with the LLaDA sampler, one answer token per step (5 steps; skip 0.2
puts the switch on step 1, so step 0 runs dense). Methods, all at the same density per select:

- ``sparsed``: SparseD (top-k blocks from the switch step's dense attention, reused);
- ``sparsed+diag``: the same, every query block keeping its own key block (not in the paper);
- ``reselect``: top-k chosen afresh from dense scores at every sparse step;
- ``local``: a sliding window of key blocks around each query block;
- ``random``: a random block pattern drawn once at the switch step.

The interval is the 95% Wilson score interval. For the top-k methods the row also gives how
often the answer's query block keeps the asked record's key block: over all (prompt, layer,
head), and per layer in at least one head.

Multi-key questions (``--keys M``, `sample_prompts(n_keys=M)`): ``? k1 .. kM``, the answer the M
values in order, 5M tokens, generated in blocks of ``--block-length`` (default 5: one block per
key; otherwise 5M is rounded up to whole blocks and the tokens past the answer are not scored),
with one step per generated token, or ``--threshold`` or ``--factor`` decoding. Prompts of M > 1 keys use seeds
110000 + length by default, used nowhere else: training drew its data from generators seeded
(seed * 1,000,003 + step) and (2^40 + ...) for the fine-tune, its gates 1,000,000 + seed, its
final evaluation 5000 + n; the benchmarks use 9000 + n (this one, single key), 20000 + n and
30000-30300 (lm-eval tasks), 40000 + n (fidelity_grid) and 70000 + n (long_context, n <= 16,384).
Every row also gives the kept-block share per key (the answer block of key i against key i's
record), exact match per key position, and agreement with the dense no-cache fixed-step row on
the same prompts: the share of answer tokens equal to it and the share of answers equal to it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import add_shipped_model_arguments, environment, load_shipped_model, markdown_table, pyplot, write_results
from sparsed_backend import SparseDConfig
from sparsed_backend._progress import progress
from sparsed_backend.demo.evaluate import answer_prompts, generation_length, wilson_interval
from sparsed_backend.demo.task import VALUE_LEN, sample_prompts

SINGLE_KEY_SEED = 9000  # the committed single-key tables
MULTI_KEY_SEED = 110000  # fresh: no training run or other benchmark drew prompts from 110000 + n

METHODS = {
    "sparsed": {},  # SparseDConfig's defaults: the block grid moved so the prompt ends mid-block
    "paper": {"prompt_end_offset": None},  # the reference's grid and rule
    "sparsed+diag": {"keep_diagonal": True},
    "reselect": {"reselect": True},
    "local": {"pattern": "local"},
    "random": {"pattern": "random"},
}


def record_block_kept(states, asked_pos: torch.Tensor, prompt_len: int, block_size: int) -> tuple[float, float]:
    """Share of (prompt, key, layer, head) whose answer query block (the block of the key's first
    answer token) keeps the key's record block, and share of (prompt, key, layer) where at least
    one head keeps it. Both blocks are on the selection's grid (``LayerSelection.front`` zero
    rows before position 0 when the grid is moved).

    Args:
        states: the SparseDStates of consecutive batches, every one past its switch step.
        asked_pos: (B, M) position of every asked record's key.
    """
    kept = []
    for st, pos in zip(states, asked_pos.split([next(iter(s.layers.values())).batch for s in states]), strict=True):
        per_layer = []
        for i in sorted(st.layers):
            sel = st.layers[i]
            answer_blocks = (prompt_len + sel.front + VALUE_LEN * torch.arange(pos.shape[1])) // block_size  # (M,)
            record_blocks = (pos + sel.front) // block_size  # (B, M)
            t = sel.table.cpu()[:, :, answer_blocks]  # (B, H, M, nKV)
            idx = record_blocks.view(pos.shape[0], 1, -1, 1).expand(-1, t.shape[1], -1, 1)
            per_layer.append(t.gather(-1, idx).squeeze(-1))  # (B, H, M)
        kept.append(torch.stack(per_layer, 1))  # (B, layers, H, M)
    k = torch.cat(kept)
    return k.float().mean().item(), k.any(2).float().mean().item()


def summary_table(rows: list[dict], cell=None) -> str:
    """Exact match in % [95% interval] (or ``cell(row)``), one row per (method, select), one column per length."""
    cell = cell or (lambda r: f"{r['accuracy']:.1%} [{r['ci95_low']:.1%}, {r['ci95_high']:.1%}]")
    lengths = sorted({r["N"] for r in rows})
    keys = []
    for r in rows:
        if (r["method"], r["select"]) not in keys:
            keys.append((r["method"], r["select"]))
    lines = ["| method | select | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
             "| --- | --- | " + " | ".join("---" for _ in lengths) + " |"]  # fmt: skip
    for method, select in keys:
        cells = []
        for n in lengths:
            r = next((r for r in rows if (r["N"], r["method"], r["select"]) == (n, method, select)), None)
            cells.append("" if r is None else cell(r))
        lines.append(f"| {method} | {'-' if method == 'dense' else select} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(rows: list[dict], env: dict, name: str, out: str | None) -> None:
    cols = ["N", "method", "select", "accuracy", "ci95_low", "ci95_high", "correct", "prompts", "token_agreement",
            "answer_agreement", "key_accuracy", "density", "steps_per_batch", "record_block_kept_heads",
            "record_block_kept_layers"]  # fmt: skip
    agreement = ""  # results saved before the agreement columns existed have none
    if all("token_agreement" in r for r in rows):
        agreement = (
            "Agreement with the dense no-cache fixed-step answers on the same prompts, % of answer tokens "
            "(% of whole answers):\n\n"
            + summary_table(rows, lambda r: f"{r['token_agreement']:.1%} ({r['answer_agreement']:.1%})")
            + "\n\n"
        )
    table = (
        "Exact match, % [95% Wilson interval]:\n\n" + summary_table(rows) + "\n\n" + agreement + "Every cell, "
        "with the kept density and how often the answer's query block keeps the asked record's key block "
        "(share of (prompt, key, layer, head); share of (prompt, key, layer) with at least one head):\n\n"
        + markdown_table(rows, cols)
    )
    out_dir = write_results(name, env, rows, table, out)
    plot(rows, out_dir / f"{name}.png")
    print(table)


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--selects", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 1.0])
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--caches", nargs="*", default=[], choices=["prefix", "dual"],
                   help="add rows with a K/V cache: dense and sparsed (no cache rows are the default)")  # fmt: skip
    p.add_argument("--threshold", type=float, default=None,
                   help="add rows with confidence-threshold decoding at this threshold: dense and sparsed, "
                        "without a cache and with each of --caches")  # fmt: skip
    p.add_argument("--factor", type=float, default=None,
                   help="add rows with Fast-dLLM's factor rule at this factor: dense and sparsed, without a cache "
                        "and with each of --caches")  # fmt: skip
    p.add_argument("--keys", type=int, default=1, help="keys per question (answer: 5 tokens per key)")
    p.add_argument("--block-length", type=int, default=VALUE_LEN,
                   help="decoding block; the generation is 5 * --keys tokens rounded up to whole blocks")  # fmt: skip
    p.add_argument("--skip", type=float, default=0.2)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--prompts", type=int, default=256 if cuda else 8)
    p.add_argument("--batch", type=int, default=64 if cuda else 8)
    add_shipped_model_arguments(p, name="fidelity", seed=None, cuda=cuda)
    args = p.parse_args()
    if args.keys < 1 or args.block_length < 1:
        p.error(f"--keys and --block-length must be >= 1, got {args.keys} and {args.block_length}")
    if args.seed is None:
        args.seed = SINGLE_KEY_SEED if args.keys == 1 else MULTI_KEY_SEED
    if args.keys > 1 and args.name in ("fidelity", "fidelity_cpu_smoke"):
        args.name = args.name.replace("fidelity", f"fidelity_keys{args.keys}")
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        render(saved["rows"], saved["environment"], args.name, args.out)
        return
    device = torch.device("cuda" if cuda else "cpu")
    path, model = load_shipped_model(args, device)
    gen_length = generation_length(VALUE_LEN * args.keys, args.block_length)
    limit = model.config.max_position_embeddings
    if max(args.lengths) + gen_length > limit:
        p.error(f"--lengths up to {max(args.lengths)} + {gen_length} generated tokens exceed the model's {limit} "
                "positions")  # fmt: skip
    env = environment(device)
    env.update(model=str(path), dtype=args.dtype, prompts_per_cell=args.prompts, skip=args.skip,
               block_size=args.block_size, greedy=True, prompt_seed=f"{args.seed} + length", keys=args.keys,
               answer_tokens=VALUE_LEN * args.keys, gen_length=gen_length, decoding_block=args.block_length,
               fixed_steps=gen_length)  # fmt: skip
    print(json.dumps(env))
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    partial = out_dir / f"{args.name}.partial.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    partial.write_text("")

    cells = [("dense", 1.0, None, None, {})]
    for method in args.methods:
        for select in args.selects:
            if select == 1.0 and method != "sparsed":
                continue  # select 1.0 keeps every block whatever the rule
            cfg = SparseDConfig(skip=args.skip, select=select, block_size=args.block_size, min_sparse_len=0,
                                **METHODS[method])  # fmt: skip
            cells.append((method, select, cfg, None, {}))
    # The decoding rules: the fixed schedule ({}), then --threshold and --factor if given.
    rules = [{}, *({name: value} for name, value in (("threshold", args.threshold), ("factor", args.factor))
                   if value is not None)]  # fmt: skip
    for rule in rules:  # the K/V cache and decoding-rule rows: dense and SparseD, each with them
        for cache in [c for c in (None, *args.caches) if c is not None or rule]:
            tags = {"threshold": "thr", "factor": "fac"}
            suffix = "".join([f"+{cache}" if cache else "", *(f"+{tags[k]}{v}" for k, v in rule.items())])
            cells.append((f"dense{suffix}", 1.0, None, cache, rule))
            for select in args.selects:
                cfg = SparseDConfig(skip=args.skip, select=select, block_size=args.block_size, min_sparse_len=0)
                cells.append((f"sparsed{suffix}", select, cfg, cache, rule))
    rows: list[dict] = []
    bar = progress(len(args.lengths) * len(cells) * args.prompts, "answering", "prompt", not args.no_progress)
    for n in args.lengths:
        prompts = sample_prompts(n, args.prompts, n_keys=args.keys, seed=args.seed + n)
        reference = None  # the dense no-cache fixed-step answers (the first cell)
        for method, select, cfg, cache, rule in cells:
            torch.manual_seed(0)  # the random pattern
            t0 = time.perf_counter()
            ans = answer_prompts(model, prompts, sparsed=cfg, batch=args.batch, block_length=args.block_length,
                                 kv_cache=cache, **rule, on_batch=bar.update)  # fmt: skip
            reference = ans.generated if reference is None else reference
            k = ans.n_correct
            lo, hi = wilson_interval(k, args.prompts)
            per_key = (ans.generated == prompts.answers).view(args.prompts, args.keys, VALUE_LEN).all(-1)
            same = ans.generated == reference
            row = {"N": n, "method": method, "select": select, "accuracy": k / args.prompts, "ci95_low": lo,
                   "ci95_high": hi, "correct": k, "prompts": args.prompts,
                   "token_agreement": same.float().mean().item(),
                   "answer_agreement": same.all(-1).float().mean().item(),
                   "key_accuracy": [round(a, 4) for a in per_key.float().mean(0).tolist()],
                   "steps_per_batch": ans.forwards / -(-args.prompts // args.batch)}  # fmt: skip
            if ans.states:
                st = ans.states[0]
                row["density"] = ans.density()
                row["switch"] = st.switch
                selected = [st for st in ans.states if st.layers]  # threshold decoding may end before the switch
                if cfg.pattern == "topk" and len(selected) == len(ans.states):
                    head, layer = record_block_kept(selected, prompts.asked_pos, n, args.block_size)
                    row["record_block_kept_heads"], row["record_block_kept_layers"] = head, layer
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            with partial.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"N={n} {method:12s} select={select}: {k}/{args.prompts} = {k / args.prompts:.1%} "
                  f"[{lo:.1%}, {hi:.1%}] agree {row['token_agreement']:.3f} density {row.get('density', 1.0):.3f} "
                  f"record kept {row.get('record_block_kept_heads', float('nan')):.2f} ({row['seconds']} s)",
                  flush=True)  # fmt: skip
    bar.close()
    render(rows, env, args.name, args.out)
    partial.unlink()


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    lengths = sorted({r["N"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths) + 1, figsize=(4.6 * (len(lengths) + 1), 4.0), squeeze=False)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    color = {m: f"C{i}" for i, m in enumerate(["dense", *METHODS])}
    for ax, n in zip(axes[0], lengths, strict=False):
        sub = [r for r in rows if r["N"] == n]
        dense = next(r for r in sub if r["method"] == "dense")
        ax.axhspan(dense["ci95_low"], dense["ci95_high"], color="grey", alpha=0.25, label="dense (95% CI)")
        for m in methods:
            pts = sorted((r for r in sub if r["method"] == m), key=lambda r: r["select"])
            err = [[r["accuracy"] - r["ci95_low"] for r in pts], [r["ci95_high"] - r["accuracy"] for r in pts]]
            ax.errorbar([r["select"] for r in pts], [r["accuracy"] for r in pts], yerr=err, marker="o", capsize=3,
                        label=m, color=color[m])  # fmt: skip
        ax.set(xlabel="select (share of key blocks kept)", ylabel="exact match", title=f"prompt {n} tokens",
               ylim=(0, 1.02))  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    select = 0.3 if any(r["select"] == 0.3 for r in rows) else max(r["select"] for r in rows if r["method"] != "dense")
    for m in ["dense", *methods]:
        pts = sorted((r for r in rows if r["method"] == m and (m == "dense" or r["select"] == select)),
                     key=lambda r: r["N"])  # fmt: skip
        ax.plot([r["N"] for r in pts], [r["accuracy"] for r in pts], marker="o", label=m, color=color[m])
    ax.set(xlabel="prompt tokens", ylabel="exact match", title=f"select {select}", ylim=(0, 1.02))
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
