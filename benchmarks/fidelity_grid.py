"""Exact match against where the prompt ends on the block grid (prompt length mod block size).

    python benchmarks/fidelity_grid.py --out DIR                                  # GPU: the full sweep
    python benchmarks/fidelity_grid.py --prompts 4 --lengths 1024 --residues 0,6  # CPU smoke size

For every base length (``--lengths``) and residue r (``--residues``) the prompt length is the one
nearest the base with ``length % block_size == r`` (offsets -64 .. +63 at block 128: residue 0 of
base 1024 is 1024, residue 127 is 1023, residue 6 is 1030, residue 64 is 960). Every cell answers
the same fresh prompts of that length (``sample_prompts(seed=--seed + length)``; seeds 40000 + n:
training used 5000 + n and its own generator streams, fidelity.py 9000 + n, the lm-eval task
20000 + n) with the LLaDA sampler, one answer token per step (5 steps; skip 0.2 puts the switch on
step 1). All prompts of a cell have one length, so a batch needs no padding. Methods (``--methods``):

- ``dense``: no SparseD;
- ``paper``: the reference's selection on the reference's grid
  (``SparseDConfig(rule="paper", prompt_end_offset=None)``; every rule below keeps that grid);
- ``prompt_end``: every query block keeps the key block holding the prompt's last token, within the
  paper rule's own per-row count (``rule="prompt_end"``);
- ``prompt_end_gen``: the same, but query blocks before the generation region give up a generation
  block rather than a prompt block (``rule="prompt_end_gen"``);
- ``sink``: the same as ``prompt_end`` with key block 0 (``rule="sink"``);
- ``paper+diag`` / ``prompt_end+diag``: the same with ``keep_diagonal=True`` (each query block keeps
  its own key block too, within the same count);
- ``shift``: the paper rule on prompts left-padded so that they end ``--shift-to`` tokens into a
  block (the block grid moved against the prompt; padded keys are never attended);
- ``offset64``: the same grid move as the backend option ``SparseDConfig(prompt_end_offset=64)``
  (the model runs unpadded; only the selection and the sparse calls see the moved grid, so 4k
  cells fit the model's positions);
- ``middle``: the moved grid of ``SparseDConfig(prompt_end_offset="middle")`` at ``--block-size``
  (the prompt ends block_size // 2 tokens into a block: the same as ``offset64`` at block 128);
- ``default``: ``SparseDConfig()``'s own defaults: the ``middle`` grid with ``block_size="auto"``
  (16-128 tokens by sequence length; ``--block-size`` then only sets the residues' grid). Results
  files written before block_size="auto" existed label the ``middle`` method "default";
- ``default+diag`` / ``default+prompt_end`` / ``default+prompt_end_gen`` / ``default+sink``: the
  defaults with ``keep_diagonal=True`` or that ``rule`` (each kept within the same per-row count);
- ``middle16`` / ``middle32`` / ``middle64``: the moved grid with blocks of that size, whatever
  ``--block-size`` (which then only sets the residues' grid);

Each row reports exact match with its 95% Wilson interval and the mean kept share of attendable
key blocks (``density``; SparseD counts every kept block, forced ones included). The summary gives,
per method, its worst gap to dense and to the paper rule over all cells.

Runtime, estimated from ``fidelity.json`` (H100, 256 prompts per cell, batch 128): a cell takes about
0.2 / 0.4 / 1.0 s at 1k / 2k / 4k tokens, and every new prompt length compiles FlexAttention once
(about 3 s; the sparse methods of one length share it, and ``shift`` pads almost every length of
a base to one length, so it adds about one compilation per base). The default sweep (3 bases x 26
residues = 78 lengths, all 8 methods) is then about 78 x 3 s of compilation plus 26 x 8 x 1.6 s of
cells: about 9 minutes. ``--methods dense paper prompt_end shift`` takes about 6. Measured on
one H200 (``fidelity_grid_all_*.md``, each cell's ``seconds`` column, compilation included): all
128 residues of one base, dense and default, took 296 s at 2k and 450 s at 4k with five such
processes sharing the GPU.
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
from sparsed_backend.demo.evaluate import Answers, answer_prompts, wilson_interval
from sparsed_backend.demo.task import (
    EOS_ID,
    VALUE_LEN,
    RetrievalPrompts,
    exact_match,
    min_prompt_tokens,
    sample_prompts,
)

# Method -> SparseDConfig fields on top of select / skip / block size (None: dense attention).
METHODS: dict[str, dict | None] = {
    "dense": None,
    "paper": {"rule": "paper", "prompt_end_offset": None},
    "prompt_end": {"rule": "prompt_end", "prompt_end_offset": None},
    "prompt_end_gen": {"rule": "prompt_end_gen", "prompt_end_offset": None},
    "sink": {"rule": "sink", "prompt_end_offset": None},
    "paper+diag": {"rule": "paper", "keep_diagonal": True, "prompt_end_offset": None},
    "prompt_end+diag": {"rule": "prompt_end", "keep_diagonal": True, "prompt_end_offset": None},
    "shift": {"rule": "paper", "prompt_end_offset": None},
    "offset64": {"prompt_end_offset": 64},
    "middle": {"prompt_end_offset": "middle"},
    "default": {"block_size": "auto"},
    "default+diag": {"block_size": "auto", "keep_diagonal": True},
    "default+prompt_end": {"block_size": "auto", "rule": "prompt_end"},
    "default+prompt_end_gen": {"block_size": "auto", "rule": "prompt_end_gen"},
    "default+sink": {"block_size": "auto", "rule": "sink"},
    **{f"middle{size}": {"block_size": size, "prompt_end_offset": "middle"} for size in (16, 32, 64)},
}
DEFAULT_RESIDUES = "0,1-8,60-68,120-127"


def parse_residues(text: str, block_size: int) -> list[int]:
    """'0,1-8,120-127' -> [0, 1, ..., 8, 120, ..., 127]; each residue in [0, block_size)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"--residues must be a comma list of ints or ranges a-b, got {text!r}") from None
        if not 0 <= a <= b < block_size:
            raise ValueError(f"--residues must lie in [0, {block_size}) with a <= b in a-b, got {part.strip()!r}")
        out += [r for r in range(a, b + 1) if r not in out]
    return out


def length_at(base: int, residue: int, block_size: int) -> int:
    """The length nearest ``base`` that is ``residue`` mod ``block_size`` (offset in [-bs/2, bs/2))."""
    off = (residue - base) % block_size
    return base + off - (block_size if off >= block_size // 2 else 0)


def shifted(prompts: RetrievalPrompts, block_size: int, shift_to: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad every prompt so that it ends ``shift_to`` tokens into a block: (ids, attention mask)."""
    B, n = prompts.input_ids.shape
    pad = (shift_to - n) % block_size
    ids = torch.cat([torch.full((B, pad), EOS_ID, dtype=torch.long), prompts.input_ids], 1)
    mask = torch.cat([torch.zeros(B, pad, dtype=torch.long), torch.ones(B, n, dtype=torch.long)], 1)
    return ids, mask


@torch.inference_mode()
def answer_shifted(model, prompts: RetrievalPrompts, cfg: SparseDConfig, batch: int, shift_to: int) -> Answers:
    """`answer_prompts` on left-padded prompts (the sampler takes the padding mask)."""
    from sparsed_backend.sampling.generation import llada_generate

    device = next(model.parameters()).device
    ids, mask = shifted(prompts, cfg.block_size, shift_to)
    outs, states = [], []
    for i in range(0, ids.shape[0], batch):
        rows = slice(i, i + batch)
        out = llada_generate(model, ids[rows].to(device), mask[rows].to(device), steps=VALUE_LEN, gen_length=VALUE_LEN,
                             block_length=VALUE_LEN, sparsed=cfg, return_dict_in_generate=True)  # fmt: skip
        outs.append(out.sequences[:, ids.shape[1] :].cpu())
        states.append(out.sparsed_state)
    generated = torch.cat(outs)
    return Answers(generated, exact_match(generated, prompts.answers.cpu()), states)


def summary(rows: list[dict]) -> str:
    """Per method: worst accuracy, worst gap to dense and to the paper rule (same length), density."""
    by = {(r["N"], r["method"]): r for r in rows}
    lines = ["| method | cells | worst exact match (length) | max points below dense | max points below paper "
             "| mean density | paper's mean density on the same cells |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for m in dict.fromkeys(r["method"] for r in rows):
        cells = [r for r in rows if r["method"] == m]
        worst = min(cells, key=lambda r: r["accuracy"])

        def gap(ref: str, cells=cells) -> str:
            d = [100 * (by[(r["N"], ref)]["accuracy"] - r["accuracy"]) for r in cells if (r["N"], ref) in by]
            return f"{max(d):.1f}" if d else "-"

        paper_d = [by[(r["N"], "paper")]["density"] for r in cells if (r["N"], "paper") in by]
        lines.append(
            f"| {m} | {len(cells)} | {worst['accuracy']:.1%} ({worst['N']}) | {gap('dense')} | {gap('paper')} | "
            f"{sum(r['density'] for r in cells) / len(cells):.3f} | "
            f"{sum(paper_d) / len(paper_d) if paper_d else float('nan'):.3f} |"
        )
    return "\n".join(lines)


def grid_table(rows: list[dict]) -> str:
    """One table per base: a row per length, a column per method, 'accuracy [interval]'."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for base in sorted({r["base"] for r in rows}):
        sub = [r for r in rows if r["base"] == base]
        out += [f"Base {base}: exact match, % [95% Wilson interval]\n", "| N | residue | " + " | ".join(methods) + " |",
                "| --- | --- | " + " | ".join("---" for _ in methods) + " |"]  # fmt: skip
        for n in sorted({r["N"] for r in sub}):
            cell = {r["method"]: r for r in sub if r["N"] == n}
            txt = [
                f"{100 * c['accuracy']:.1f} [{100 * c['ci95_low']:.1f}, {100 * c['ci95_high']:.1f}]" if c else ""
                for c in (cell.get(m) for m in methods)
            ]
            out.append(f"| {n} | {cell[next(iter(cell))]['residue']} | " + " | ".join(txt) + " |")
        out.append("")
    return "\n".join(out)


def render(rows: list[dict], env: dict, name: str, out: str | None) -> None:
    cols = ["N", "base", "residue", "method", "accuracy", "ci95_low", "ci95_high", "correct", "prompts", "density",
            "seconds"]  # fmt: skip
    table = (
        "Per method over all cells (points = percentage points of exact match; density = kept share of "
        "attendable key blocks):\n\n" + summary(rows) + "\n\n" + grid_table(rows) + "\nEvery cell:\n\n"
        + markdown_table(rows, cols)
    )  # fmt: skip
    out_dir = write_results(name, env, rows, table, out)
    plot(rows, out_dir / f"{name}.png")
    print(table)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    bases = sorted({r["base"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(len(bases), 1, figsize=(11, 3.4 * len(bases)), squeeze=False)
    for ax, base in zip(axes[:, 0], bases, strict=True):
        for i, m in enumerate(methods):
            pts = sorted((r for r in rows if r["base"] == base and r["method"] == m), key=lambda r: r["N"])
            x = [r["N"] - base for r in pts]
            err = [[r["accuracy"] - r["ci95_low"] for r in pts], [r["ci95_high"] - r["accuracy"] for r in pts]]
            ax.errorbar(x, [r["accuracy"] for r in pts], yerr=err, marker="o", ms=3, capsize=2, lw=1,
                        label=m, color=f"C{i}")  # fmt: skip
        ax.axvline(0, color="grey", lw=0.8, ls=":")
        ax.set(xlabel=f"prompt length - {base} (residue mod block = offset mod block)", ylabel="exact match",
               title=f"prompts near {base} tokens", ylim=(0, 1.02))  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=len(methods))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="base lengths")
    p.add_argument("--residues", default=DEFAULT_RESIDUES, help="prompt length mod block size: '0,1-8,120-127'")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--select", type=float, default=0.3)
    p.add_argument("--skip", type=float, default=0.2)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--shift-to", type=int, default=64, help="'shift': pad prompts to end this far into a block")
    p.add_argument("--prompts", type=int, default=256 if cuda else 4)
    p.add_argument("--batch", type=int, default=256 if cuda else 4)
    add_shipped_model_arguments(p, name="fidelity_grid", seed=40000, cuda=cuda)
    args = p.parse_args()
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        render(saved["rows"], saved["environment"], args.name, args.out)
        return
    for flag in ("prompts", "batch"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.shift_to < args.block_size:
        p.error(f"--shift-to must be in [0, {args.block_size}), got {args.shift_to}")
    try:
        residues = parse_residues(args.residues, args.block_size)
        SparseDConfig(skip=args.skip, select=args.select, block_size=args.block_size)
    except (TypeError, ValueError) as err:
        p.error(str(err))
    device = torch.device("cuda" if cuda else "cpu")
    path, model = load_shipped_model(args, device)
    longest = model.config.max_position_embeddings - VALUE_LEN - (args.block_size if "shift" in args.methods else 0)
    lengths = sorted({length_at(b, r, args.block_size) for b in args.lengths for r in residues})
    bad = [n for n in lengths if not min_prompt_tokens(64) <= n <= longest]
    if bad:
        why = ""
        if "shift" in args.methods:
            why = f" (`shift` pads up to {args.block_size - 1} tokens: leave it out of --methods for these)"
        p.error(f"--lengths/--residues give prompt lengths {bad} outside [{min_prompt_tokens(64)}, {longest}]{why}")
    env = environment(device)
    env.update(model=str(path), dtype=args.dtype, prompts_per_cell=args.prompts, select=args.select, skip=args.skip,
               block_size=args.block_size, min_sparse_len=0, greedy=True, prompt_seed=f"{args.seed} + length",
               residues=residues, length_rule="nearest the base with that residue, offsets [-bs/2, bs/2)",
               shift_to=args.shift_to)  # fmt: skip
    print(json.dumps(env))
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / f"{args.name}.partial.jsonl"
    partial.write_text("")

    cells = [(b, length_at(b, r, args.block_size), r) for b in args.lengths for r in residues]
    rows: list[dict] = []
    bar = progress(len(cells) * len(args.methods) * args.prompts, "answering", "prompt", not args.no_progress)
    for base, n, residue in cells:
        prompts = sample_prompts(n, args.prompts, seed=args.seed + n)
        for method in args.methods:
            fields = METHODS[method]
            cfg = None
            if fields is not None:
                cfg = SparseDConfig(**{"skip": args.skip, "select": args.select, "block_size": args.block_size,
                                       "min_sparse_len": 0, **fields})  # fmt: skip
            t0 = time.perf_counter()
            if method == "shift":
                ans = answer_shifted(model, prompts, cfg, args.batch, args.shift_to)
                bar.update(args.prompts)
            else:
                ans = answer_prompts(model, prompts, sparsed=cfg, batch=args.batch, on_batch=bar.update)
            k = ans.n_correct
            lo, hi = wilson_interval(k, args.prompts)
            row = {"N": n, "base": base, "residue": residue, "method": method, "accuracy": k / args.prompts,
                   "ci95_low": lo, "ci95_high": hi, "correct": k, "prompts": args.prompts,
                   "density": ans.density(), "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
            rows.append(row)
            with partial.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"N={n} (r {residue}) {method:16s} {k}/{args.prompts} = {k / args.prompts:.1%} "
                  f"[{lo:.1%}, {hi:.1%}] density {row['density']:.3f} ({row['seconds']} s)", flush=True)  # fmt: skip
    bar.close()
    render(rows, env, args.name, args.out)
    partial.unlink()


if __name__ == "__main__":
    main()
