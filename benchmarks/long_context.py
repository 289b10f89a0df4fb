"""The shipped retrieval model past the length it was trained to, with each RoPE scaling.

The shipped model was trained on prompts of up to 4,096 tokens (4,206 positions). This runs
fresh retrieval prompts of ``--lengths`` tokens (default 4,096, 6,144, 8,192 and 16,384) through
the model loaded with each ``--scalings`` entry, dense and with SparseD (``--select``, the
default grid), and reports exact match with its 95% Wilson interval:

- ``none``: no scaling; the position limit is raised by hand (``max_sequence_length``) so that
  the model runs on positions it never saw, as a user editing config.json would;
- ``linear:F``, ``dynamic:F``, ``yarn:F``: the scaling ``{"rope_type": ..., "factor": F}`` applied
  from the trained length (`models.rope.with_rope_scaling`, what ``--rope-scaling`` does); the
  scaled position limit then covers ``F x 4206`` positions;
- ``ntk:F``: NTK-aware scaling by theta alone, ``rope_theta x F ** (d / (d - 2))`` (d the head
  dimension), with the limit raised by hand as for ``none``.

Prompt seeds are 70000 + length (never used in training, which drew 5000 + n, nor by the other
benchmarks). Every cell of one scaling shares its loaded model.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModel

from common import environment, markdown_table, pyplot, write_results
from sparsed_backend import SparseDConfig
from sparsed_backend._progress import progress
from sparsed_backend.demo import model_path
from sparsed_backend.demo.evaluate import answer_prompts, wilson_interval
from sparsed_backend.demo.task import VALUE_LEN, sample_prompts
from sparsed_backend.models.rope import with_rope_scaling

TYPES = ("none", "linear", "dynamic", "yarn", "ntk")


def parse_scaling(text: str) -> tuple[str, float]:
    """'yarn:4' -> ('yarn', 4.0); 'none' -> ('none', 1.0)."""
    kind, _, factor = text.partition(":")
    if kind not in TYPES or (kind == "none") != (factor == ""):
        raise argparse.ArgumentTypeError(f"expected none or TYPE:FACTOR with TYPE in {TYPES[1:]}, got {text!r}")
    try:
        value = float(factor) if factor else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number after ':', got {text!r}") from None
    if value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a factor >= 1, got {text!r}")
    return kind, value


def scaled_config(path, kind: str, factor: float, longest: int):
    """The shipped model's config with one scaling, able to hold ``longest`` positions."""
    cfg = AutoConfig.from_pretrained(path)
    trained = cfg.max_sequence_length
    if kind in ("linear", "dynamic", "yarn"):
        return with_rope_scaling(cfg, {"rope_type": kind, "factor": factor})  # from the trained length
    if kind == "ntk":
        head_dim = cfg.d_model // cfg.n_heads
        cfg.rope_theta = cfg.rope_theta * factor ** (head_dim / (head_dim - 2))
    if kind in ("none", "ntk"):  # no scaled limit: raised by hand, as a user would
        cfg.max_sequence_length = max(trained, longest)
    return cfg


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 6144, 8192, 16384] if cuda else [4096, 6144])
    default_scalings = [parse_scaling(s) for s in ("none", "linear:4", "dynamic:4", "yarn:4", "ntk:4")]
    p.add_argument("--scalings", type=parse_scaling, nargs="+", default=default_scalings)
    p.add_argument("--select", type=float, default=0.3)
    p.add_argument("--prompts", type=int, default=256 if cuda else 4)
    p.add_argument("--batch", type=int, default=32 if cuda else 4)
    p.add_argument("--seed", type=int, default=70000, help="prompts of length n use seed + n")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--name", default="long_context" if cuda else "long_context_cpu_smoke")
    p.add_argument("--out", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    path = model_path()
    env = environment(device)
    env.update(model=str(path), dtype=args.dtype, prompts_per_cell=args.prompts, select=args.select,
               prompt_seed=f"{args.seed} + length", trained_prompt_tokens=4096)  # fmt: skip
    print(json.dumps(env))
    sparsed = SparseDConfig(select=args.select, min_sparse_len=0)
    rows = []
    cells = len(args.scalings) * len(args.lengths) * 2
    with progress(cells * args.prompts, "answering", "prompt", not args.no_progress) as bar:
        for kind, factor in args.scalings:
            cfg = scaled_config(path, kind, factor, max(args.lengths) + VALUE_LEN)
            model = AutoModel.from_pretrained(path, config=cfg, attn_implementation="sparsed",
                                              dtype=getattr(torch, args.dtype)).to(device).eval()  # fmt: skip
            label = kind if kind == "none" else f"{kind}:{factor:g}"
            for n in args.lengths:
                prompts = sample_prompts(n, args.prompts, seed=args.seed + n)
                for method, config in (("dense", None), (f"sparsed {args.select}", sparsed)):
                    t0 = time.perf_counter()
                    ans = answer_prompts(model, prompts, sparsed=config, batch=args.batch, on_batch=bar.update)
                    k = ans.n_correct
                    lo, hi = wilson_interval(k, args.prompts)
                    row = {"scaling": label, "N": n, "method": method, "accuracy": k / args.prompts,
                           "ci95_low": lo, "ci95_high": hi, "correct": k, "prompts": args.prompts,
                           "density": ans.density(), "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
                    rows.append(row)
                    print(f"{label:10s} N={n:6d} {method:12s} {k}/{args.prompts} [{lo:.1%}, {hi:.1%}]", flush=True)
            del model
            if cuda:
                torch.cuda.empty_cache()
    table = summary(rows, args.lengths)
    out_dir = write_results(args.name, env, rows, table + "\n\n" + markdown_table(rows, list(rows[0])), args.out)
    plot(rows, args.lengths, out_dir / f"{args.name}.png")
    print(table)


def summary(rows: list[dict], lengths: list[int]) -> str:
    """Exact match % [95% interval]: one row per (scaling, method), one column per length."""
    keys = list(dict.fromkeys((r["scaling"], r["method"]) for r in rows))
    lines = ["| scaling | method | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |",
             "| --- | --- | " + " | ".join("---" for _ in lengths) + " |"]  # fmt: skip
    for scaling, method in keys:
        cells = []
        for n in lengths:
            r = next(r for r in rows if (r["scaling"], r["method"], r["N"]) == (scaling, method, n))
            cells.append(f"{r['accuracy']:.1%} [{r['ci95_low']:.1%}, {r['ci95_high']:.1%}]")
        lines.append(f"| {scaling} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], lengths: list[int], path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, method in zip(axes, dict.fromkeys(r["method"] for r in rows), strict=False):
        for i, scaling in enumerate(dict.fromkeys(r["scaling"] for r in rows)):
            pts = sorted((r for r in rows if (r["scaling"], r["method"]) == (scaling, method)), key=lambda r: r["N"])
            ax.plot([r["N"] for r in pts], [r["accuracy"] for r in pts], marker="o", label=scaling, color=f"C{i}")
        ax.axvline(4096, color="grey", ls="--", lw=1)
        ax.set(xscale="log", xlabel="prompt tokens (trained up to 4,096)", title=method, ylim=(0, 1.02))
        ax.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact match")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
