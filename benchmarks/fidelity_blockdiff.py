"""Fidelity of sparse prefix selection on a block-diffusion retrieval model: exact match per length.

    python benchmarks/fidelity_blockdiff.py --model DIR                       # GPU: 256 prompts per cell
    PYTHONPATH=src python training/train_retrieval.py --smoke --arch qwen3-blockdiff --export /tmp/bd
    python benchmarks/fidelity_blockdiff.py --model /tmp/bd --lengths 64 --prompts 4 --records 4   # CPU smoke

DIR is a block-diffusion model trained on the retrieval task (`training/train_retrieval.py --arch
qwen3-blockdiff`, a Qwen3ForCausalLM whose config carries ``mask_token_id`` and ``block_size``).
Every cell answers the same fresh prompts (``sample_prompts(seed=--seed + length)``; the default
120000 + n is used by no training run or other benchmark) with `blockdiff_generate`, greedy, one
token per step, blocks of the model's ``block_size``. Methods:

- ``dense``: exact attention throughout ("sdpa");
- ``topk``: sparse prefix selection, each head's heaviest ``select`` share of prefix blocks;
- ``local`` / ``random``: the same number of blocks, nearest the decoded block / drawn at random.

``--select-every`` runs each sparse method at every listed ``PrefixSparseConfig.select_every``
(1: a selection per block; r: per r blocks, the blocks between reading the positions since), and
``--commits`` with exact commits (``exact``) and/or sparse ones (``sparse``:
``PrefixSparseConfig.sparse_commit``, the stored K/V of decoded blocks read the kept blocks).

Each row gives exact match with its 95% Wilson interval, the kept share of prefix blocks, and
how many answers equal the dense answers on the same prompts.
"""

from __future__ import annotations

import argparse
import json

import torch

import sparsed_backend  # noqa: F401  (registers the "sparsed" attention)
from common import environment, markdown_table, write_results
from sparsed_backend.attention.prefix_selection import PrefixSparseConfig
from sparsed_backend.demo.evaluate import answer_blockdiff_prompts, wilson_interval
from sparsed_backend.demo.task import sample_prompts

FRESH_SEED = 120000  # no training run or benchmark drew prompts from 120000 + n


def main() -> None:
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a trained block-diffusion model directory")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 1500, 2048, 3000, 4096])
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--records", type=int, default=64, help="records per prompt (the model's training)")
    p.add_argument("--selects", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--methods", nargs="+", choices=["topk", "local", "random"], default=["topk", "local", "random"])
    p.add_argument("--prefix-block", type=int, default=128, help="prefix tokens per selectable block")
    p.add_argument("--per-kv-head", action="store_true")
    p.add_argument("--select-every", type=int, nargs="+", default=[1], help="blocks per selection")
    p.add_argument("--commits", nargs="+", choices=["exact", "sparse"], default=["exact"],
                   help="how each decoded block's K/V are stored (PrefixSparseConfig.sparse_commit)")  # fmt: skip
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=FRESH_SEED, help="prompts of length n use seed + n")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--name", default="fidelity_blockdiff" if cuda else "fidelity_blockdiff_cpu_smoke")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    model = AutoModelForCausalLM.from_pretrained(
        args.model, attn_implementation="sdpa", dtype=getattr(torch, args.dtype)
    )
    model = model.to(device).eval()
    block = model.config.block_size
    env = environment(device)
    env.update(model=args.model, block_size=block, prefix_block=args.prefix_block, per_kv_head=args.per_kv_head,
               prompts=args.prompts, seed=f"{args.seed} + n", dtype=args.dtype)  # fmt: skip
    print(json.dumps(env), flush=True)
    rows = []
    for n in args.lengths:
        prompts = sample_prompts(n, args.prompts, n_records=args.records, seed=args.seed + n)
        model.set_attn_implementation("sdpa")
        dense = answer_blockdiff_prompts(model, prompts, batch=args.batch).generated
        cells = [("dense", None, None)]
        for select in args.selects:
            for method in args.methods:
                for every in args.select_every:
                    for commit in args.commits:
                        fields = {"select": select, "block_size": args.prefix_block, "per_kv_head": args.per_kv_head,
                                  "pattern": method, "select_every": every}  # fmt: skip
                        config = PrefixSparseConfig(**fields, sparse_commit=commit == "sparse")
                        cells.append((method, select, config))
        for method, select, cfg in cells:
            if cfg is None:
                out, share = dense, None
            else:
                model.set_attn_implementation("sparsed")
                ans = answer_blockdiff_prompts(model, prompts, sparsed=cfg, batch=args.batch)
                out, share = ans.generated, ans.density()
            correct = int((out == prompts.answers).all(-1).sum())
            lo, hi = wilson_interval(correct, args.prompts)
            every = None if cfg is None else cfg.select_every
            commit = None if cfg is None else ("sparse" if cfg.sparse_commit else "exact")
            row = {"N": n, "method": method, "select": select, "select_every": every, "commit": commit,
                   "exact_match": 100 * correct / args.prompts,
                   "ci95": f"[{100 * lo:.1f}, {100 * hi:.1f}]", "kept_share": share,
                   "same_as_dense": 100 * float((out == dense).all(-1).float().mean())}  # fmt: skip
            rows.append(row)
            print(f"  N={n:5d} {method:6s} select={select} every={every} commit={commit} {row['exact_match']:5.1f}% "
                  f"{row['ci95']}", flush=True)  # fmt: skip
    cols = ["N", "method", "select", "select_every", "commit", "exact_match", "ci95", "kept_share", "same_as_dense"]
    table = markdown_table(rows, cols)
    write_results(args.name, env, rows, table, args.out)
    print(table)


if __name__ == "__main__":
    main()
