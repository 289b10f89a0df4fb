"""Scoring the switch step with an earlier full forward's log-sum-exp: how far the selection moves.

    python benchmarks/switch_lse_reuse.py                      # CPU, the shipped models
    python benchmarks/switch_lse_reuse.py --lengths 1024 --prompts 8

The switch step's block importance is each row's softmax mass per key block, normalised by the
row's log-sum-exp, which today comes from the switch step's own dense pass; the scoring then
sweeps the keys a second time (1.65 dense forwards at 64k). With the normaliser known before
the pass, a fused kernel could sum the block masses in the dense pass itself (issue 21's
cheaper switch). This script measures what taking it from the last full forward before the
switch does to the selection, against the exact rule, on the shipped models (fp32, greedy):

- ``no cache``: the single-key model, one step per answer token; the switch is step 1 and the
  log-sum-exp comes from step 0 (one token earlier);
- ``dual cache``: the two-key model (two blocks of 5), ``kv_cache="dual"``; the switch is the
  second block's refresh, the log-sum-exp from the first block's refresh (5 tokens earlier).

Per cell: ``kept_agree``, the share of the exact rule's kept (batch, head, query block, key
block) entries that the reused log-sum-exp keeps too (both keep the same count per row);
``rows_equal``, the share of (batch, head, query block) rows whose kept blocks are identical;
the worst layer's ``kept_agree``; ``lse_shift_median`` / ``_max``, how far a row's log-sum-exp
moved between the two forwards (nats; 0 would make the reuse exact); and exact match with each rule
(substituted in the switch step of the same generation) on the same fresh prompts (seeds
130000 + length, used nowhere else). Both rules normalise by a given log-sum-exp, as the fused
CUDA scorer does. Nothing here is timed: the fused kernel does not exist yet.
"""

from __future__ import annotations

import argparse
import contextlib
from types import SimpleNamespace

import torch

from common import environment, load_shipped_model, markdown_table, write_results
from sparsed_backend import SparseDConfig
from sparsed_backend.attention import backend, switch_step
from sparsed_backend.demo.evaluate import answer_prompts, generation_length, wilson_interval
from sparsed_backend.demo.task import VALUE_LEN, sample_prompts

SEED = 130000  # fresh: see fidelity.py's docstring for the seeds other benchmarks use


def full_forward_lse(query: torch.Tensor, key: torch.Tensor, scale: float, key_valid) -> torch.Tensor:
    """(B, Hq, L) float32 natural-log log-sum-exp of each row of a dense bidirectional pass."""
    k = key.repeat_interleave(query.shape[1] // key.shape[1], 1).double()
    scores = torch.einsum("bhld,bhsd->bhls", query.double(), k) * scale
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :], -torch.inf)
    return torch.logsumexp(scores, -1).float()


class Recorder:
    """Inside ``watching()``: each layer's log-sum-exp of the last full dense forward, and each
    switch step's inputs with that log-sum-exp (of its own batch). The switch step selects with
    a given log-sum-exp, as the fused CUDA scorer does (the CPU scorer then normalises by it
    too): its own exact one, or with ``reuse`` the recorded one."""

    def __init__(self, n_layers: int, reuse: bool) -> None:
        self.n_layers, self.reuse = n_layers, reuse
        self.calls, self.lse, self.switch = 0, {}, []

    @contextlib.contextmanager
    def watching(self):
        dense, run_switch, with_lse = backend.dense_attention, backend.run_switch_step, switch_step.dense_with_lse
        recorder = self

        def recording_dense(query, key, value, scale, key_valid=None):
            if query.shape[2] == key.shape[2]:  # a full forward (a window has fewer rows)
                recorder.lse[recorder.calls % recorder.n_layers] = full_forward_lse(query, key, scale, key_valid)
                recorder.calls += 1
            return dense(query, key, value, scale, key_valid)

        def recording_switch(query, key, value, scale, config, *, gen_start=None, key_valid=None):
            layer = len(recorder.switch) % recorder.n_layers
            # with this batch's log-sum-exp: a later batch overwrites recorder.lse
            recorder.switch.append((recorder.lse[layer], query, key, scale, config, gen_start, key_valid))
            return run_switch(query, key, value, scale, config, gen_start=gen_start, key_valid=key_valid)

        def reused_lse(query, key, value, scaling, key_valid=None, kernel="cudnn"):
            out, _ = with_lse(query, key, value, scaling, key_valid, kernel)
            recorded = recorder.switch[-1][0]  # the switch step just recorded
            return out, recorded if recorder.reuse else full_forward_lse(query, key, scaling, key_valid)

        backend.dense_attention, backend.run_switch_step = recording_dense, recording_switch
        switch_step.dense_with_lse = reused_lse
        try:
            yield self
        finally:
            backend.dense_attention, backend.run_switch_step = dense, run_switch
            switch_step.dense_with_lse = with_lse


def agreement(recorder: Recorder) -> dict[str, float]:
    """The row fields comparing the reused log-sum-exp's selection with the exact one, over every
    recorded switch step: ``kept_agree``, ``rows_equal``, ``worst_layer`` (the lowest layer's
    ``kept_agree``) and ``lse_shift_max`` / ``lse_shift_median`` (|reused - exact| log-sum-exp
    of a row). The exact rule here is the layer's own switch step; the recorded log-sum-exp is
    from the last full forward before it."""
    rows = equal = 0
    shifts = []
    per_layer: dict[int, list[int]] = {}  # layer -> [exact's kept blocks, of them kept by the reuse too]
    for i, (recorded, query, key, scale, config, gen_start, key_valid) in enumerate(recorder.switch):
        layer = i % recorder.n_layers
        where = {"gen_start": gen_start, "key_valid": key_valid}
        exact_lse = full_forward_lse(query, key, scale, key_valid)
        real = torch.isfinite(exact_lse)  # rows with an attendable key
        shifts.append((recorded - exact_lse)[real].abs().flatten())
        exact = switch_step.select_layer(query, key, scale, config, lse=exact_lse, **where).table
        reused = switch_step.select_layer(query, key, scale, config, lse=recorded, **where).table
        rows, equal = rows + exact[..., 0].numel(), equal + (exact == reused).all(-1).sum().item()
        counts = per_layer.setdefault(layer, [0, 0])
        counts[0], counts[1] = counts[0] + exact.sum().item(), counts[1] + (exact & reused).sum().item()
    kept, agree = (sum(c[i] for c in per_layer.values()) for i in (0, 1))
    moved = torch.cat(shifts)
    return {
        "kept_agree": agree / kept,
        "rows_equal": equal / rows,
        "worst_layer": min(b / a for a, b in per_layer.values() if a),
        "lse_shift_max": moved.max().item(),
        "lse_shift_median": moved.median().item(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--select", type=float, default=0.3)
    p.add_argument("--name", default="switch_lse_reuse_cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cpu")
    env = environment(device)
    env.update(select=args.select, prompts=args.prompts, seed=f"{SEED} + length", dtype="float32")
    rows = []
    regimes = (("no cache", 1, None), ("dual cache", 2, "dual"))
    for regime, keys, cache in regimes:
        _, model = load_shipped_model(SimpleNamespace(model=None, keys=keys, dtype="float32"), device)
        n_layers = model.config.num_hidden_layers
        for n in args.lengths:
            prompts = sample_prompts(n, args.prompts, n_keys=keys, seed=SEED + n)
            gen = generation_length(prompts.answers.shape[1], VALUE_LEN)
            config = SparseDConfig(select=args.select)
            row = {"regime": regime, "length": n, "prompts": args.prompts, "gen": gen}
            for rule, reuse in (("exact", False), ("reused", True)):
                recorder = Recorder(n_layers, reuse)
                with recorder.watching():
                    answers = answer_prompts(model, prompts, sparsed=config, batch=args.batch, kv_cache=cache)
                correct = int(answers.correct.sum())
                low, high = wilson_interval(correct, args.prompts)
                row[f"{rule}_match"] = f"{100 * correct / args.prompts:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
                if rule == "exact":
                    row.update(agreement(recorder))
            rows.append(row)
            print(row, flush=True)
    cols = ["regime", "length", "prompts", "gen", "lse_shift_median", "lse_shift_max", "kept_agree", "rows_equal",
            "worst_layer", "exact_match", "reused_match"]  # fmt: skip
    table = markdown_table(rows, cols)
    write_results(args.name, env, rows, table, args.out)
    print(table)


if __name__ == "__main__":
    main()
