"""Accuracy against where the prompt ends on the 128-token grid, every residue, per block size.

    python benchmarks/fidelity_grid_summary.py     # reads and writes benchmarks/results

Reads the per-cell rows of the full-grid sweeps (`fidelity_grid.py`, 256 fresh prompts per cell,
one H200; their commands are in each results file):

- ``fidelity_grid_all_{1k,2k,4k}``: dense and the moved grid at 128-token blocks, every residue
  mod 128 around 1,024 / 2,048 / 4,096 prompt tokens (method "default" in those files: the moved
  grid at ``--block-size 128``, the default before ``block_size="auto"``);
- ``fidelity_grid_all_{1k,2k}_tiles64``: the moved grid at 64-token blocks on the same lengths;
- ``fidelity_grid_all_1k_tiles32_{a,b}``: the moved grid at 32-token blocks on the same lengths;
- ``fidelity_grid_rules_1k``: at 1k, the moved grid at 16-token blocks (method ``middle16``), and
  the then default (32-token blocks at 1k) with each rule that keeps one block within the same
  per-row count (``default+diag``, ``default+prompt_end``, ...);
- ``fidelity_grid``: the paper's rule on the reference's grid, 26 residues per base (earlier run).

Writes ``fidelity_grid_auto.md`` and ``.png``: per base and block size, the worst gap to dense, how
many residues fall more than 2 points below dense, the total of correct answers and the mean kept
density; and the rows that ``block_size="auto"`` picks (`auto_block_size` of the prompt plus the
answer tokens), which are those runs' rows: the resolved config is the explicit one.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import pyplot
from sparsed_backend.attention.config import auto_block_size
from sparsed_backend.demo.task import VALUE_LEN

RESULTS = Path(__file__).resolve().parent / "results"
BASES = {1024: "1k", 2048: "2k", 4096: "4k"}
SOURCES = {  # (base, block size) -> (result file, method) holding the moved grid's rows
    (1024, 128): [("fidelity_grid_all_1k", "default")],
    (2048, 128): [("fidelity_grid_all_2k", "default")],
    (4096, 128): [("fidelity_grid_all_4k", "default")],
    (1024, 64): [("fidelity_grid_all_1k_tiles64", "default")],
    (2048, 64): [("fidelity_grid_all_2k_tiles64", "default")],
    (1024, 32): [("fidelity_grid_all_1k_tiles32_a", "default"), ("fidelity_grid_all_1k_tiles32_b", "default")],
    (1024, 16): [("fidelity_grid_rules_1k", "middle16")],
}
SIZES = (128, 64, 32, 16)
RULE_ROWS = ("default", "default+diag", "default+prompt_end", "default+prompt_end_gen", "default+sink")


def rows_of(name: str) -> list[dict]:
    return json.loads((RESULTS / f"{name}.json").read_text())["rows"]


def main() -> None:
    dense: dict[int, dict] = {}
    moved: dict[tuple[int, int], dict[int, dict]] = {}
    for (base, size), sources in SOURCES.items():
        cells = {}
        for name, method in sources:
            for r in rows_of(name):
                if r["method"] == "dense":
                    dense[r["N"]] = r
                elif r["method"] == method:
                    cells[r["N"]] = r
        moved[(base, size)] = cells
    rules = {m: {r["N"]: r for r in rows_of("fidelity_grid_rules_1k") if r["method"] == m} for m in RULE_ROWS}
    paper = {r["N"]: r for r in rows_of("fidelity_grid") if r["method"] == "paper"}

    def stats(cells: dict[int, dict]) -> str:
        gaps = {n: 100 * (dense[n]["accuracy"] - r["accuracy"]) for n, r in cells.items()}
        worst = max(gaps, key=gaps.get)
        over = sum(g > 2.0 for g in gaps.values())
        correct = sum(r["correct"] for r in cells.values())
        prompts = sum(r["prompts"] for r in cells.values())
        base_correct = sum(dense[n]["correct"] for n in cells)
        dens = sum(r["density"] for r in cells.values()) / len(cells)
        return (f"{len(cells)} | {gaps[worst]:.1f} ({worst}) | {over} | {correct:,} / {prompts:,} "
                f"(dense {base_correct:,}) | {dens:.3f}")  # fmt: skip

    lines = [
        "# SparseD's block size against where the prompt ends (every residue of the 128-token grid)",
        "",
        "Shipped retrieval model, one H200, bf16, 256 fresh prompts per cell (seed 40000 + length), select 0.3, "
        "skip 0.2, min_sparse_len 0, the moved grid (the prompt ends half a block into a block). "
        "Written by `benchmarks/fidelity_grid_summary.py` from the files it names; each file holds its command.",
        "",
        "| base | block size | cells | worst points below dense (length) | residues > 2 points below dense "
        "| correct answers | mean kept density |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (base, size), cells in sorted(moved.items(), key=lambda item: (item[0][0], -item[0][1])):
        lines.append(f"| {BASES[base]} | {size} | {stats(cells)} |")
    lines += ["", "`block_size=\"auto\"` (the default) on the same lengths: the size `auto_block_size(prompt + "
              f"{VALUE_LEN} answer tokens)` gives, and that size's row:", "",
              "| base | sizes picked | cells | worst points below dense (length) | residues > 2 points below dense "
              "| correct answers | mean kept density | paper rule's mean density (its 26 residues) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    auto: dict[int, dict[int, dict]] = {}
    for base in BASES:
        lengths = sorted({n for (b, _), cells in moved.items() if b == base for n in cells})
        picked = {n: auto_block_size(n + VALUE_LEN) for n in lengths}
        cells = {n: moved[(base, s)][n] for n, s in picked.items() if n in moved.get((base, s), {})}
        auto[base] = cells
        pd = [r["density"] for n, r in paper.items() if lengths[0] <= n <= lengths[-1]]
        sizes = ", ".join(str(s) for s in sorted(set(picked.values())))
        lines.append(f"| {BASES[base]} | {sizes} | {stats(cells)} | {sum(pd) / len(pd):.3f} |")
    lines += ["", "At 1k, 32-token blocks (the size `auto_block_size` gave there before 16 was measured) with a block "
              "every query block keeps, taken out of the same per-row count (`fidelity_grid_rules_1k`): no rule closes "
              "the gap that 16-token blocks close.", "",
              "| method | cells | worst points below dense (length) | residues > 2 points below dense "
              "| correct answers | mean kept density |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for method, cells in rules.items():
        lines.append(f"| {method.replace('default', '32-token blocks')} | {stats(cells)} |")
    lines += ["", "Exact match per prompt length, % (dense; 128 / 64 / 32 / 16-token blocks on the moved grid; the "
              "paper's rule on the reference grid where measured):", "",
              "| N | N mod 128 | dense | 128 | 64 | 32 | 16 | paper |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip

    def pct(table: dict[int, dict], n: int) -> str:
        return f"{100 * table[n]['accuracy']:.1f}" if n in table else ""

    for base in BASES:
        for n in sorted(auto[base]):
            cols = [pct(moved.get((base, s), {}), n) for s in SIZES]
            lines.append(f"| {n} | {n % 128} | {pct(dense, n)} | {' | '.join(cols)} | {pct(paper, n)} |")
    (RESULTS / "fidelity_grid_auto.md").write_text("\n".join(lines) + "\n")

    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for ax, base in zip(axes, BASES, strict=True):
        ns = sorted(auto[base])
        ax.plot(ns, [100 * dense[n]["accuracy"] for n in ns], "k-", label="dense", lw=1)
        for size, style in zip(SIZES, ("C0-", "C1-", "C2-", "C4-"), strict=True):
            cells = moved.get((base, size))
            if cells:
                xs = sorted(cells)
                ax.plot(xs, [100 * cells[n]["accuracy"] for n in xs], style, lw=0.8, label=f"moved grid, {size}")
        xs = sorted(n for n in paper if ns[0] <= n <= ns[-1])
        ax.plot(xs, [100 * paper[n]["accuracy"] for n in xs], "C3o", ms=3, label="paper rule (reference grid)")
        ax.plot(ns, [100 * auto[base][n]["accuracy"] for n in ns], "m.", ms=3, label="auto (default)")
        ax.set_title(f"around {base} prompt tokens")
        ax.set_xlabel("prompt tokens")
        ax.set_ylim(40, 101)
    axes[0].set_ylabel("exact match, %")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(RESULTS / "fidelity_grid_auto.png", dpi=110)


if __name__ == "__main__":
    main()
