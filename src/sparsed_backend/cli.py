"""The ``sparsed`` command: demo (the main job), generate, bench.

sparsed demo                  # shipped retrieval model, dense vs sparsed, CPU, offline
sparsed generate --model DIR --prompt "..." --select 0.3
sparsed bench --length 8192   # attention alone: dense vs sparse on this machine
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from .config import SparseDConfig


class StepTimer:
    """Forward hooks that record each model forward's wall time and SparseD mode."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.records: list[tuple[str, float]] = []
        self._t0 = 0.0
        self._mode = "dense"
        self._hooks = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module, args, kwargs):
        state = kwargs.get("sparsed_state")
        self._mode = "dense" if state is None else state.mode
        self._t0 = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        self.records.append((self._mode, time.perf_counter() - self._t0))

    def mean(self, mode: str) -> float:
        times = [t for m, t in self.records if m == mode]
        return sum(times) / len(times) if times else float("nan")

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _draw_blocks(state, layer: int, heads: list[int], path: Path, title: str, marks: tuple[int, int]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture (pip install 'sparsed_backend[demo]')")
        return None
    table = state.layers[layer].table[0].float().cpu()  # (H, nQ, nKV)
    answer_block, record_block = marks
    fig, axes = plt.subplots(1, len(heads), figsize=(3.2 * len(heads), 3.6), squeeze=False)
    for ax, h in zip(axes[0], heads, strict=True):
        ax.imshow(table[h], cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.scatter([record_block], [answer_block], marker="o", s=40, facecolors="none", edgecolors="red")
        ax.set_title(f"layer {layer} head {h}: {table[h].mean():.0%} kept", fontsize=9)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _check_range(flag: str, value, low, high=None) -> None:
    if value < low or (high is not None and value > high):
        want = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{flag} must be {want}, got {value}")


def demo(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModel

    from .demo import model_path
    from .demo.evaluate import answer_prompts, wilson_interval
    from .demo.task import N_KEYS, VALUE_LEN, min_prompt_tokens, sample_prompts
    from .demo.tokenizer import build_tokenizer

    path = Path(args.model) if args.model else model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model: no config.json in {path}")
    _check_range("--prompts", args.prompts, 1)
    _check_range("--batch", args.batch, 1)
    _check_range("--steps", args.steps, 1, VALUE_LEN)
    _check_range("--records", args.records, 1, N_KEYS)
    config = AutoConfig.from_pretrained(path)
    _check_range("--length", args.length, min_prompt_tokens(args.records), int(config.max_sequence_length))
    layer = config.n_layers - 1 if args.layer is None else args.layer
    _check_range("--layer", layer, 0, config.n_layers - 1)
    cfg = SparseDConfig(skip=args.skip, select=args.select, block_size=args.block_size, min_sparse_len=0,
                        keep_diagonal=args.keep_diagonal)  # fmt: skip
    model = AutoModel.from_pretrained(path, attn_implementation="sparsed", dtype=torch.float32).eval()
    torch.manual_seed(args.seed)
    prompts = sample_prompts(args.length, args.prompts, n_records=args.records, seed=args.seed)
    tok = build_tokenizer()
    print(
        f"model {path.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{model.config.n_layers} layers x {model.config.n_heads} heads | {args.prompts} prompts "
        f"(seed {args.seed}), {args.records} records each | {args.steps} denoising steps for {VALUE_LEN} answer tokens"
    )
    print(f"SparseD: skip={cfg.skip} select={cfg.select} block_size={cfg.block_size}"
          + (" keep_diagonal=True" if cfg.keep_diagonal else ""))  # fmt: skip

    results, timers = {}, {}
    runs = [("dense", None), ("sparsed", cfg)]
    with tqdm(total=len(runs) * args.prompts, desc="answering", unit="prompt") as bar:
        for name, sparsed in runs:
            timer = StepTimer(model)
            results[name] = answer_prompts(model, prompts, sparsed=sparsed, batch=args.batch, steps=args.steps,
                                           on_batch=bar.update)  # fmt: skip
            timer.remove()
            timers[name] = timer

    dense, sparse = results["dense"], results["sparsed"]
    print()
    print(f"{'#':>3}  {'record at':>9}  {'answer':8s}{'dense':10s}{'sparsed':10s}")
    for i in range(args.prompts):
        cells = [tok.decode(prompts.answers[i])]
        for r in (dense, sparse):
            cells.append(f"{tok.decode(r.generated[i])} {'ok' if r.correct[i] else '--'}")
        print(f"{i:>3}  {int(prompts.record_pos[i]):>9}  {cells[0]:8s}{cells[1]:10s}{cells[2]:10s}")
    n = args.prompts
    state = sparse.states[0]
    print()
    print(f"prompt tokens: {args.length}")
    print(f"exact match: dense {dense.n_correct / n:.0%} | sparsed {sparse.n_correct / n:.0%}")
    print(f"switch step: {state.switch} of {state.steps}")
    agree = int((dense.generated == sparse.generated).all(-1).sum())
    (dlo, dhi), (slo, shi) = wilson_interval(dense.n_correct, n), wilson_interval(sparse.n_correct, n)
    print(
        f"95% intervals over {n} prompts: dense [{dlo:.0%}, {dhi:.0%}] | sparsed [{slo:.0%}, {shi:.0%}] | "
        f"sparsed gives the dense answer on {agree}/{n}"
    )
    density = sparse.density()
    print(
        f"steps before the switch run dense | kept key blocks (density): {density:.1%} | "
        f"mask state {state.memory_bytes() / 2**10:.0f} KiB per batch"
    )
    t = timers["sparsed"]
    print(
        f"mean step time (batch {min(args.batch, n)}, {next(model.parameters()).device}): dense "
        f"{timers['dense'].mean('dense') * 1e3:.0f} ms | switch {t.mean('switch') * 1e3:.0f} ms | sparse "
        f"{t.mean('sparse') * 1e3:.0f} ms  (the first sparse step of a shape includes torch.compile)"
    )
    marks = (args.length // cfg.block_size, int(prompts.record_pos[0]) // cfg.block_size)
    picture = _draw_blocks(
        state, layer, list(range(min(4, model.config.n_heads))), Path(args.out),
        f"SparseD blocks kept (black), prompt 0, select={cfg.select}, block={cfg.block_size}; "
        "red: answer's query block x record's key block", marks,
    )  # fmt: skip
    if picture:
        print(f"selected blocks of layer {layer}: {picture}")
    return 0


def generate(args: argparse.Namespace) -> int:
    from transformers import AutoModel, AutoTokenizer

    from .generation import dream_generate, llada_generate

    tok = AutoTokenizer.from_pretrained(args.model)
    dtype = getattr(torch, args.dtype)
    model = AutoModel.from_pretrained(args.model, attn_implementation=args.attn, dtype=dtype).eval()
    model.to(args.device)
    ids = tok(args.prompt, return_tensors="pt")["input_ids"].to(args.device)
    sparsed = None
    if args.attn == "sparsed" and args.select is not None:
        sparsed = SparseDConfig(skip=args.skip, select=args.select, block_size=args.block_size)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    with torch.inference_mode():
        if model.config.model_type == "Dream":
            out = dream_generate(model, ids, steps=args.steps, max_new_tokens=args.gen_length,
                                 temperature=args.temperature, generator=g, sparsed=sparsed)  # fmt: skip
        else:
            out = llada_generate(model, ids, steps=args.steps, gen_length=args.gen_length,
                                 block_length=args.block_length, temperature=args.temperature,
                                 generator=g, sparsed=sparsed)  # fmt: skip
    print(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return 0


def bench(args: argparse.Namespace) -> int:
    from .attention import dense_attention, sparse_attention
    from .switch_step import select_layer

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, args.heads, args.length, args.head_dim, device=device, dtype=dtype) for _ in range(3))
    scale = args.head_dim**-0.5
    cfg = SparseDConfig(skip=0.0, select=args.select, block_size=args.block_size, min_sparse_len=0)
    sel = select_layer(q, k, scale, cfg)

    def clock(fn):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.repeats * 1e3

    dense_ms = clock(lambda: dense_attention(q, k, v, scale))
    sparse_ms = clock(lambda: sparse_attention(q, k, v, sel.block_mask, scale))
    print(
        f"{device} {dtype} N={args.length} heads={args.heads} d={args.head_dim}: dense {dense_ms:.2f} ms | "
        f"sparsed select={args.select} (density {float(sel.density):.2f}) {sparse_ms:.2f} ms | "
        f"speedup {dense_ms / sparse_ms:.2f}x"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sparsed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="answer retrieval prompts with dense and sparsed attention (CPU, offline)")
    d.add_argument("--prompts", type=int, default=8, help="fresh prompts to answer (default 8)")
    d.add_argument("--length", type=int, default=2048, help="prompt length in tokens, BOS included (default 2048)")
    d.add_argument("--records", type=int, default=64, help="records per prompt (default 64, as trained)")
    d.add_argument("--batch", type=int, default=8, help="prompts per sampler call (default 8)")
    d.add_argument("--steps", type=int, default=5, help="denoising steps, 1-5 (default 5: one per answer token)")
    d.add_argument("--skip", type=float, default=0.2)
    d.add_argument("--select", type=float, default=0.3)
    d.add_argument("--block-size", type=int, default=128)
    d.add_argument("--keep-diagonal", action="store_true", help="every query block keeps its own key block")
    d.add_argument("--layer", type=int, default=None, help="layer to draw (default: the last)")
    d.add_argument(
        "--seed",
        type=int,
        default=1234,
        help="draws the prompts on the CPU (training drew from CUDA generators: every seed is fresh)",
    )
    d.add_argument("--model", default=None, help="model directory (default: the shipped one)")
    d.add_argument("--out", default="sparsed_demo_blocks.png", help="PNG of the selected blocks")
    d.set_defaults(fn=demo)

    g = sub.add_parser("generate", help="generate with a LLaDA or Dream checkpoint directory")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--attn", default="sparsed", choices=["sparsed", "sdpa", "eager", "flex_attention"])
    g.add_argument("--steps", type=int, default=128)
    g.add_argument("--gen-length", type=int, default=128)
    g.add_argument("--block-length", type=int, default=None)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--skip", type=float, default=0.2)
    g.add_argument("--select", type=float, default=0.3, help="SparseD select ratio (sparsed only)")
    g.add_argument("--block-size", type=int, default=128)
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=generate)

    b = sub.add_parser("bench", help="attention alone: dense vs sparsed on this machine")
    b.add_argument("--length", type=int, default=8192 if torch.cuda.is_available() else 1024)
    b.add_argument("--heads", type=int, default=32 if torch.cuda.is_available() else 4)
    b.add_argument("--head-dim", type=int, default=128 if torch.cuda.is_available() else 64)
    b.add_argument("--select", type=float, default=0.3)
    b.add_argument("--block-size", type=int, default=128)
    b.add_argument("--repeats", type=int, default=10)
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.set_defaults(fn=bench)

    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"sparsed {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
