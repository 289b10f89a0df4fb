"""lm-eval on prompts of varied lengths: ``sparsed_retrieval_mixed``, dense vs SparseD.

    python benchmarks/eval_mixed.py                                   # GPU: 300 prompts, batch 8
    python benchmarks/eval_mixed.py --limit 4 --device cpu --out /tmp/eval_mixed   # CPU smoke

The fixed-length retrieval tasks give every batch the same shape; real evaluations do not.
Here every prompt has its own length (1,024-4,096 tokens, `harness.task_data`), so a batch is
left padded to its longest prompt and each batch is a new shape for FlexAttention, which may
compile again. For each attention (``dense``, then ``sparsed``) this runs lm-eval's
``simple_evaluate`` on the shipped retrieval model with the ``sparsed-dlm`` model and records:

- exact match and its standard error, as lm-eval computes them, and exact match per third of
  the length range (from the per-sample results);
- wall time of the evaluation (model loading timed apart), per prompt too;
- dynamo's counters before and after (``_compat.compile_counters``): new ``unique_graphs`` is
  the number of graphs compiled during the run, FlexAttention's among them;
- peak CUDA memory.

Settings are the fidelity benchmark's: LLaDA sampler, greedy, 5 steps for the 5 answer tokens,
one block; SparseD with ``min_sparse_len=0`` so it is sparse at every length (on CUDA the
default keeps sequences under 2,048 tokens dense). Both runs share one process, dense first:
the SparseD run's compile count is its own (dense attention compiles nothing), but torch's
caches warmed by the dense run are not cleared.

Tasks are found with a ``TaskManager`` on the package's task directory, as ``sparsed-eval``
does, without lm-eval's ~15k built-in tasks (``include_defaults=False``: indexing them costs
seconds and none is used). Output, in ``--out``: ``eval_mixed_<attn>.json`` (lm-eval's results
dict, serialised as lm-eval's CLI does, ``config.model_args`` filled in), ``eval_mixed_<attn>_samples.jsonl``
(doc id, prompt tokens, response, exact match per prompt) and the summary ``eval_mixed.json`` /
``eval_mixed.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import RESULTS, environment, markdown_table, write_results
from sparsed_backend._compat import compile_counters
from sparsed_backend.demo import model_path
from sparsed_backend.harness import tasks_dir
from sparsed_backend.harness.task_data import MIXED_RANGE

TASK = "sparsed_retrieval_mixed"
ATTNS = ("dense", "sparsed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attn", nargs="+", choices=ATTNS, default=list(ATTNS), help="attentions to run, in order")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per sampler call (default 8)")
    p.add_argument("--limit", type=int, default=None, help="first N prompts only (smoke runs); default all 300")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (bfloat16 on CUDA, float32 on CPU), ...")
    p.add_argument("--select", type=float, default=0.3, help="SparseD: share of key blocks kept")
    p.add_argument("--skip", type=float, default=0.2, help="SparseD: share of steps kept dense")
    p.add_argument("--block-size", type=int, default=128, help="SparseD: tokens per block")
    p.add_argument("--prompt-end-offset", default="middle",
                   help="SparseD: where the prompt ends in a selection block (middle, none or an int)")  # fmt: skip
    p.add_argument("--steps", type=int, default=5, help="denoising steps (5: one per answer token)")
    p.add_argument("--gen-length", type=int, default=5, help="tokens generated per prompt (the answer is 5)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output directory (default {RESULTS})")
    p.add_argument("--name", default="eval_mixed", help="file name stem of the outputs")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size: expected an int >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit: expected an int >= 1, got {args.limit}")
    return args


def model_args(attn: str, args: argparse.Namespace, device: str) -> dict:
    """``sparsed-dlm`` model args (spelled as in `harness.model.DiffusionLM`)."""
    kw = {"pretrained": str(model_path()), "attn": attn, "steps": args.steps, "gen_length": args.gen_length,
          "dtype": args.dtype, "device": device, "batch_size": args.batch_size}  # fmt: skip
    if attn == "sparsed":
        kw |= {"select": args.select, "skip": args.skip, "block_size": args.block_size, "min_sparse_len": 0,
               "prompt_end_offset": args.prompt_end_offset}  # fmt: skip
    return kw


def dynamo_stats() -> dict[str, int]:
    return dict(compile_counters().get("stats", {}))


def by_length(samples: list[dict]) -> dict[str, float | None]:
    """Exact match per third of the length range: the thirds' edges, then the shares."""
    low, high = MIXED_RANGE
    edges = [low + round(i * (high + 1 - low) / 3) for i in range(4)]
    out = {}
    for a, b in zip(edges, edges[1:], strict=False):
        hits = [s["exact_match"] for s in samples if a <= s["prompt_tokens"] < b]
        out[f"{a}-{b - 1}"] = sum(hits) / len(hits) if hits else None
    return out


def run_one(attn: str, args: argparse.Namespace, device: str, task_manager) -> tuple[dict, dict, list[dict]]:
    """Load, evaluate, measure: (summary row, lm-eval results dict, per-sample rows)."""
    from lm_eval import simple_evaluate

    from sparsed_backend.harness.model import DiffusionLM

    kw = model_args(attn, args, device)
    t0 = time.perf_counter()
    lm = DiffusionLM(**kw)
    load_s = time.perf_counter() - t0
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
        torch.cuda.reset_peak_memory_stats(lm.device)
    before = dynamo_stats()
    t0 = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=[TASK], task_manager=task_manager, limit=args.limit,
                              log_samples=True, batch_size=args.batch_size, device=device)  # fmt: skip
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
    wall_s = time.perf_counter() - t0
    after = dynamo_stats()
    # An LM instance leaves lm-eval's record of the model blank; say what ran.
    results["config"]["model"] = "sparsed-dlm"
    results["config"]["model_args"] = kw
    samples = [
        {"doc_id": s["doc_id"], "prompt_tokens": s["doc"]["prompt_tokens"], "target": s["target"],
         "response": s["filtered_resps"][0], "exact_match": s["exact_match"]}
        for s in results.pop("samples")[TASK]
    ]  # fmt: skip
    metrics = results["results"][TASK]
    n = len(samples)
    row = {
        "attn": attn,
        "prompts": n,
        "exact_match": metrics["exact_match,none"],
        "exact_match_stderr": metrics["exact_match_stderr,none"],
        **{f"em_{k}": v for k, v in by_length(samples).items()},
        "mean_prompt_tokens": sum(s["prompt_tokens"] for s in samples) / n,
        "wall_s": wall_s,
        "s_per_prompt": wall_s / n,
        "load_s": load_s,
        "unique_graphs": after.get("unique_graphs", 0) - before.get("unique_graphs", 0),
        "calls_captured": after.get("calls_captured", 0) - before.get("calls_captured", 0),
        "peak_mib": torch.cuda.max_memory_allocated(lm.device) / 2**20 if lm.device.type == "cuda" else None,
        "model_args": ",".join(f"{k}={v}" for k, v in kw.items() if k != "pretrained"),
    }
    del lm
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row, results, samples


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device: expected cpu where CUDA is not available, got {device!r}")
    task_manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for attn in args.attn:
        print(f"== {attn}: {TASK}, batch {args.batch_size}, limit {args.limit}, {device}", flush=True)
        row, results, samples = run_one(attn, args, device, task_manager)
        stem = args.out / f"{args.name}_{attn}"
        Path(f"{stem}.json").write_text(
            json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
        )
        with open(f"{stem}_samples.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        rows.append(row)
        print(
            f"   exact match {row['exact_match']:.3f} ± {row['exact_match_stderr']:.3f} over {row['prompts']} prompts; "
            f"{row['wall_s']:.1f} s ({row['s_per_prompt']:.2f} s/prompt), {row['unique_graphs']} graphs compiled",
            flush=True,
        )
    env = environment(torch.device(device)) | {"task": TASK, "batch_size": args.batch_size, "limit": args.limit}
    columns = ["attn", "prompts", "exact_match", "exact_match_stderr", *[k for k in rows[0] if k.startswith("em_")],
               "wall_s", "s_per_prompt", "load_s", "unique_graphs", "calls_captured", "peak_mib"]  # fmt: skip
    out = write_results(args.name, env, rows, markdown_table(rows, columns), args.out)
    print(f"wrote {out / (args.name + '.json')}, {out / (args.name + '.md')} and the per-attn results")


if __name__ == "__main__":
    main()
