"""The ``sparsed`` command's argument parser, kept free of torch and transformers.

``sparsed --help``, ``sparsed <command> --help`` and ``sparsed --version`` finish here without
importing the heavy libraries (importing ``sparsed_backend`` itself loads torch and transformers
and registers the backend). Once the arguments parse, `main` imports `sparsed_backend.cli`, which
checks every value and runs the command.
"""

from __future__ import annotations

import argparse
import os
import sys

from .flags import BlockSize, DeviceName, FlagType, Float, GridOffset, Int, ModelDir, PngOut

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
SparseD sparse attention for diffusion LMs: the demo, generation and an attention benchmark.

  sparsed demo                      # shipped retrieval model, dense vs sparsed, CPU, offline
  sparsed generate --model DIR --prompt "..." --select 0.3    # LLaDA, Dream or block diffusion (Qwen3)
  sparsed bench --length 8192       # attention alone: dense vs sparsed on this machine

A bad flag, path or device prints one line and exits with status 2.
"""

PROGRESS_HELP = (
    "no progress bars (they go to stderr, and only when it is a terminal); SPARSED_NO_PROGRESS=1 does the same"
)


def _version() -> str:
    """The installed distribution's version; in a source tree that was never installed
    (``PYTHONPATH=src``), the literal in ``sparsed_backend/_version.py``, read as text: importing
    ``sparsed_backend`` (even its ``_version`` submodule, which runs the package's ``__init__``)
    would load torch and transformers, which ``--version`` must not."""
    import ast
    from importlib import metadata, util

    try:
        return metadata.version("sparsed_backend")
    except metadata.PackageNotFoundError:
        pass
    spec = util.find_spec("sparsed_backend")  # locates a top-level package without running it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("sparsed --version: sparsed_backend is neither installed nor importable")
    path = os.path.join(list(spec.submodule_search_locations)[0], "_version.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__version__"]:
            return ast.literal_eval(node.value)
    raise RuntimeError(f"sparsed --version: expected a literal __version__ = '...' in {path}, found none")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage block), still exit status 2, and
    a `FlagType` check given as ``type=`` names the flag it checks in its messages."""

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if isinstance(action.type, FlagType):
            action.type = action.type.named(max(action.option_strings, key=len))
        return action

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: ...)" to every option with a real default whose help does not state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


SEED_MAX = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes
SUPPRESS = argparse.SUPPRESS
# blockdiff_generate's remasking rules (sampling.block_diffusion.BLOCKDIFF_REMASKING; not imported:
# that loads torch. tests/test_cli.py checks the copies agree).
BLOCKDIFF_REMASKING = ("low_confidence_static", "low_confidence_dynamic", "sequential")
# PrefixSparseConfig's scorers (attention.prefix_selection.PREFIX_SCORERS; the same check).
PREFIX_SCORERS = ("separate", "fused")

GENERATE_EPILOG = """\
The checkpoint's model_type picks the sampler: llada or Dream (SparseD with --attn sparsed), or
qwen3 with mask_token_id and block_size in its config (block diffusion, SDAR; sparse prefix
selection with --attn sparsed). A flag marked for one family is refused for the other.
"""

# --prompt-end-offset, for every command that runs SparseD in a sampler (SparseDConfig.prompt_end_offset).
GRID_FLAG = {
    "type": GridOffset(),
    "default": "middle",
    "metavar": "{none,middle,N}",
    "help": "SparseD: where the prompt ends inside a block of the selection grid (none: the paper's grid)",
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand. Each flag's own rule is checked here, by its ``type=``
    (`sparsed_cli.flags`); rules that need torch, the model or the library later, by
    `sparsed_backend.cli`."""
    p = _Parser(prog="sparsed", description=DESCRIPTION, formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,generate,bench}")

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_, description=help_, formatter_class=_HelpFormatter)
        s.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)
        return s

    d = command("demo", "answer retrieval prompts with dense and sparsed attention (CPU, offline)")
    d.add_argument("--prompts", type=Int(1), default=8, help="fresh prompts to answer")
    d.add_argument("--length", type=int, default=2048, help="prompt length in tokens, BOS included")
    d.add_argument("--records", type=int, default=64, help="records per prompt (64 as trained)")
    d.add_argument("--batch", type=Int(1), default=8, help="prompts per sampler call")
    d.add_argument("--steps", type=int, default=5, help="denoising steps, 1-5 (5: one per answer token)")
    d.add_argument("--skip", type=float, default=0.2, help="SparseD: share of steps kept dense, in [0, 1]")
    d.add_argument("--select", type=float, default=0.3, help="SparseD: share of key blocks kept, in (0, 1]")
    d.add_argument("--block-size", type=BlockSize(), default="auto",
                   help="SparseD: tokens per block, a multiple of 16, or auto (16-128 by sequence length)")  # fmt: skip
    d.add_argument("--prompt-end-offset", **GRID_FLAG)
    d.add_argument("--keep-diagonal", action="store_true", help="every query block keeps its own key block")
    d.add_argument("--layer", type=int, default=None, help="layer to draw (default: the last)")
    d.add_argument(
        "--seed", type=Int(0, SEED_MAX), default=1234, help="draws the prompts (on the CPU: no training seed repeats)"
    )
    d.add_argument("--model", type=ModelDir(), default=None, help="model directory (default: the shipped one)")
    d.add_argument("--out", type=PngOut(), default="sparsed_demo_blocks.png", help="PNG of the selected blocks")

    g = command("generate", "generate with a LLaDA, Dream or block-diffusion (Qwen3, SDAR) checkpoint directory")
    g.epilog = GENERATE_EPILOG
    g.add_argument(
        "--model", type=ModelDir(), required=True, help="checkpoint directory (config.json, weights, tokenizer)"
    )
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--attn", default="sparsed", choices=["sparsed", "sdpa", "eager", "flex_attention"],
                   help="attention implementation (block diffusion: sparsed, sdpa or eager)")  # fmt: skip
    # Flags whose absence matters (the family's own default applies, or a flag of the other
    # family was given) default to SUPPRESS: absent from the namespace unless given.
    g.add_argument("--steps", type=Int(1), default=SUPPRESS,
                   help="LLaDA / Dream: model forwards of a fixed schedule (default: 128 without "
                        "--threshold)")  # fmt: skip
    g.add_argument("--threshold", type=Float(0, 1, open_low=True), default=None,
                   help="confidence-threshold decoding: each step unmasks every token at least this confident "
                        "(and at least one), instead of --steps (block diffusion: with --remasking "
                        "low_confidence_dynamic, its default then)")  # fmt: skip
    g.add_argument("--factor", type=Float(0, open_low=True), default=SUPPRESS,
                   help="LLaDA / Dream: Fast-dLLM's factor rule instead of --steps or --threshold: each "
                        "step unmasks the n most confident tokens, n the largest with (n + 1)(1 - c_n) <= "
                        "factor")  # fmt: skip
    g.add_argument("--gen-length", type=Int(1), default=128, help="tokens to generate")
    g.add_argument("--block-length", type=Int(1), default=None,
                   help="tokens per semi-autoregressive block (default: --gen-length; block diffusion: the "
                        "checkpoint's block_size)")  # fmt: skip
    g.add_argument("--kv-cache", default=SUPPRESS, choices=["none", "prefix", "dual"],
                   help="LLaDA / Dream: block K/V cache, a refresh at each block's first step "
                        "(default: none)")  # fmt: skip
    g.add_argument("--temperature", type=Float(0.0), default=0.0, help="sampling temperature, 0 is greedy")
    g.add_argument("--skip", type=float, default=SUPPRESS,
                   help="LLaDA / Dream, SparseD: share of steps kept dense, in [0, 1] (default: 0.2)")  # fmt: skip
    g.add_argument("--select", type=float, default=SUPPRESS,
                   help="with --attn sparsed: share of key blocks kept (SparseD), or of prefix blocks kept (block "
                        "diffusion), in (0, 1] (default: 0.3)")  # fmt: skip
    g.add_argument("--block-size", type=BlockSize(), default=SUPPRESS,
                   help="with --attn sparsed: tokens per block of the selection, a multiple of 16 or auto for "
                        "SparseD (default: auto, 16-128 by sequence length); block diffusion: prefix tokens per "
                        "selected block (default: 128)")  # fmt: skip
    g.add_argument("--prompt-end-offset", **{**GRID_FLAG, "default": SUPPRESS,
                   "help": f"LLaDA / Dream, {GRID_FLAG['help']} (default: middle)"})  # fmt: skip
    g.add_argument("--rope-scaling", default=SUPPRESS, metavar="{none,TYPE:FACTOR}",
                   help="LLaDA / Dream: RoPE scaling instead of the checkpoint's: linear, dynamic or yarn with a "
                        "factor (e.g. yarn:4 allows 4x the trained positions), or none (default: the checkpoint's "
                        "own)")  # fmt: skip
    g.add_argument("--denoising-steps", type=Int(1), default=SUPPRESS,
                   help="block diffusion: denoising steps per block (default: --block-length)")  # fmt: skip
    g.add_argument("--remasking", default=SUPPRESS, choices=BLOCKDIFF_REMASKING,
                   help="block diffusion: which masked tokens a step decodes (default: low_confidence_static, "
                        "low_confidence_dynamic with --threshold)")  # fmt: skip
    g.add_argument("--prefix-budget", type=Int(1), default=SUPPRESS,
                   help="block diffusion with --attn sparsed: prefix tokens kept per head, instead of "
                        "--select")  # fmt: skip
    g.add_argument("--select-every", type=Int(1), default=SUPPRESS,
                   help="block diffusion with --attn sparsed: select afresh on every Nth block; the blocks between "
                        "reuse its prefix blocks plus the positions since (default: 1, every block)")  # fmt: skip
    g.add_argument("--scorer", default=SUPPRESS, choices=PREFIX_SCORERS,
                   help="block diffusion with --attn sparsed: how a block's first step scores the prefix; fused "
                        "needs CUDA and the Triton decode kernel (default: separate)")  # fmt: skip
    g.add_argument("--sparse-commit", action="store_true", default=SUPPRESS,
                   help="block diffusion with --attn sparsed: each decoded block's commit reads the kept prefix "
                        "blocks too (its stored K/V approximate) instead of every key")  # fmt: skip
    g.add_argument("--cuda-graphs", nargs="?", const="piecewise", choices=("piecewise", "whole"), default=SUPPRESS,
                   help="block diffusion on CUDA: run the decoding forwards through CUDA graphs, around the "
                        "attention (piecewise, the default) or each forward whole with the Triton decode kernel "
                        "(whole); less launch time, the same attention")  # fmt: skip
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="model dtype")
    g.add_argument(
        "--device", type=DeviceName(), default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N"
    )
    g.add_argument("--seed", type=Int(0, SEED_MAX), default=0, help="seeds the sampling noise")

    b = command("bench", "attention alone: dense vs sparsed on this machine")
    b.add_argument("--length", type=Int(1), default=None, help="sequence length (default: 8192 on CUDA, 1024 on CPU)")
    b.add_argument("--heads", type=Int(1), default=None, help="attention heads (default: 32 on CUDA, 4 on CPU)")
    b.add_argument("--head-dim", type=Int(1), default=None, help="head dimension (default: 128 on CUDA, 64 on CPU)")
    b.add_argument("--select", type=float, default=0.3, help="SparseD: share of key blocks kept, in (0, 1]")
    b.add_argument("--block-size", type=BlockSize(), default="auto",
                   help="SparseD: tokens per block, a multiple of 16, or auto (16-128 by --length)")  # fmt: skip
    b.add_argument("--repeats", type=Int(1), default=10, help="timed calls of each kernel")
    b.add_argument(
        "--device", type=DeviceName(), default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse, then run the command. A user error (`sparsed_backend.cli.UsageError`) prints one
    line and returns 2; anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; set before transformers loads
    from sparsed_backend import cli  # torch, transformers

    try:
        return cli.COMMANDS[args.command](args)
    except cli.UsageError as err:
        print(f"sparsed {args.command}: error: {err}", file=sys.stderr)
        return 2
