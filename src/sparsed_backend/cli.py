"""The ``sparsed`` command: demo (the main job), generate, bench.

sparsed demo                  # shipped retrieval model, dense vs sparsed, CPU, offline
sparsed generate --model DIR --prompt "..." --select 0.3
sparsed bench --length 8192   # attention alone: dense vs sparse on this machine
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from .config import SparseDConfig

DEMO_MODEL = "retrieval_llada"


def shipped_model_path() -> Path:
    """Directory of the small retrieval LLaDA that ships inside the package."""
    path = Path(str(resources.files("sparsed_backend") / "assets" / DEMO_MODEL))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the shipped demo model is missing at {path}; reinstall sparsed_backend "
            "(package data) or train it with training/train_retrieval.py"
        )
    return path


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


def _draw_blocks(state, layer: int, heads: list[int], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture (pip install 'sparsed_backend[demo]')")
        return None
    table = state.layers[layer].table[0].float().cpu()  # (H, nQ, nKV)
    fig, axes = plt.subplots(1, len(heads), figsize=(3.2 * len(heads), 3.4), squeeze=False)
    for ax, h in zip(axes[0], heads, strict=True):
        ax.imshow(table[h], cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"layer {layer} head {h}: {table[h].mean():.0%} kept", fontsize=9)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def demo(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    from .demo import exact_match, make_batch
    from .generation import llada_generate

    torch.manual_seed(args.seed)
    path = Path(args.model) if args.model else shipped_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="sparsed", dtype=torch.float32).eval()
    prompts, answers = make_batch(random.Random(args.seed), args.length, args.prompts)
    ids = tok(prompts, return_tensors="pt")["input_ids"]
    gen = len(answers[0])
    steps = args.steps or gen
    cfg = SparseDConfig(skip=args.skip, select=args.select, block_size=args.block_size, min_sparse_len=0)
    print(
        f"model {path.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{model.config.n_layers} layers x {model.config.n_heads} heads | {args.prompts} prompts of "
        f"{ids.shape[1]} tokens | {steps} denoising steps for {gen} answer tokens"
    )
    print(f"SparseD: skip={cfg.skip} select={cfg.select} block_size={cfg.block_size}")

    results, timers = {}, {}
    runs = [("dense", None), ("sparsed", cfg)]
    with torch.inference_mode(), tqdm(total=len(runs) * len(prompts), desc="answering", unit="prompt") as bar:
        for name, sparsed in runs:
            timer = StepTimer(model)
            outs, state = [], None
            for i in range(0, len(prompts), args.batch):
                out = llada_generate(
                    model, ids[i : i + args.batch], steps=steps, gen_length=gen, block_length=gen,
                    sparsed=sparsed, return_dict_in_generate=True,
                )  # fmt: skip
                outs += tok.batch_decode(out.sequences[:, ids.shape[1] :], skip_special_tokens=True)
                state = out.sparsed_state
                bar.update(min(args.batch, len(prompts) - i))
            timer.remove()
            results[name], timers[name] = (outs, state), timer

    print()
    print(f"{'#':>3}  {'answer':8s}{'dense':10s}{'sparsed':10s}")
    for i, ans in enumerate(answers):
        d, s = results["dense"][0][i], results["sparsed"][0][i]
        print(f"{i:>3}  {ans:8s}{d:6s}{'ok' if d == ans else '--':4s}{s:6s}{'ok' if s == ans else '--':4s}")
    acc = {n: sum(exact_match(p, a) for p, a in zip(results[n][0], answers, strict=True)) / len(answers)
           for n in results}  # fmt: skip
    state = results["sparsed"][1]
    print()
    agree = sum(d == s for d, s in zip(results["dense"][0], results["sparsed"][0], strict=True))
    print(
        f"exact match: dense {acc['dense']:.0%} | sparsed {acc['sparsed']:.0%} | "
        f"sparsed gives the dense answer on {agree}/{len(answers)} prompts"
    )
    print(
        f"switch step: {state.switch} of {state.steps} (steps before it dense) | "
        f"kept key blocks (density): {state.density():.1%} | mask state {state.memory_bytes() / 2**10:.0f} KiB"
    )
    t = timers["sparsed"]
    print(
        f"mean step time (batch {args.batch}, CPU): dense {timers['dense'].mean('dense') * 1e3:.0f} ms | "
        f"switch {t.mean('switch') * 1e3:.0f} ms | sparse {t.mean('sparse') * 1e3:.0f} ms"
        "  (first sparse step of a shape includes torch.compile)"
    )
    layer = model.config.n_layers - 1 if args.layer is None else args.layer
    picture = _draw_blocks(
        state, layer, list(range(min(4, model.config.n_heads))), Path(args.out),
        f"SparseD blocks kept (black) for prompt 0, select={cfg.select}, block={cfg.block_size} tokens",
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
    from .attention import _select, dense_attention, sparse_attention
    from .state import SparseDState

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, args.heads, args.length, args.head_dim, device=device, dtype=dtype) for _ in range(3))
    scale = args.head_dim**-0.5
    cfg = SparseDConfig(skip=0.0, select=args.select, block_size=args.block_size, min_sparse_len=0)
    sel = _select(SparseDState(cfg, steps=2), q, k, scale, None)

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
    d.add_argument("--prompts", type=int, default=8)
    d.add_argument("--length", type=int, default=1024, help="prompt length in tokens (characters)")
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--steps", type=int, default=None, help="denoising steps (default: one per answer token)")
    d.add_argument("--skip", type=float, default=0.2)
    d.add_argument("--select", type=float, default=0.3)
    d.add_argument("--block-size", type=int, default=64)
    d.add_argument("--layer", type=int, default=None, help="layer to draw (default: the last)")
    d.add_argument("--seed", type=int, default=1234)
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
