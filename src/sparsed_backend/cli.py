"""The ``sparsed`` commands: demo (the main job), generate (block diffusion: `cli_blockdiff`), bench.

The parser and the entry point ``main`` live in `sparsed_cli` (no torch there, so ``--help``
is instant); it checks each flag's own rule with its argparse ``type=`` and then calls
`COMMANDS` here. This module never imports `sparsed_cli`. What needs torch, the model or the
library is checked here before any work starts: a bad value raises `UsageError`, which
`sparsed_cli.main` prints as one line naming the flag (what was expected, what was received)
before exiting with status 2. Library errors about an argument (`ArgumentValueError` /
`ArgumentTypeError`, which name it in ``.argument``) become a UsageError through one table,
`LIBRARY_FLAGS`; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ._progress import progress, progress_wanted
from ._validate import ArgumentTypeError, ArgumentValueError, check_int
from .attention.config import SparseDConfig
from .models.rope import parse_rope_scaling, position_limit, position_limit_note, with_rope_scaling
from .timing import StepTimer, median_seconds

__all__ = ["COMMANDS", "LIBRARY_FLAGS", "UsageError"]


class UsageError(Exception):
    """A user error on the command line: printed as one line, exit status 2, no traceback."""


# The one table from argument names as the library spells them to the flags that feed them.
LIBRARY_FLAGS = {
    # SparseDConfig
    "skip": "--skip",
    "select": "--select",
    "block_size": "--block-size",
    "prompt_end_offset": "--prompt-end-offset",
    # llada_generate / dream_generate
    "steps": "--steps",
    "threshold": "--threshold",
    "factor": "--factor",
    "gen_length": "--gen-length",
    "max_new_tokens": "--gen-length",
    "block_length": "--block-length",
    "temperature": "--temperature",
    "kv_cache": "--kv-cache",
    # blockdiff_generate and PrefixSparseConfig (select and block_size as above)
    "denoising_steps": "--denoising-steps",
    "remasking": "--remasking",
    "budget": "--prefix-budget",
    "select_every": "--select-every",
    "scorer": "--scorer",
    "sparse_commit": "--sparse-commit",
    "cuda_graphs": "--cuda-graphs",
    # the demo's sample_prompts
    "seed": "--seed",
}
SPARSED_ARGUMENTS = ("skip", "select", "block_size", "prompt_end_offset")


def _with_flags(message: str, arguments: tuple[str, ...]) -> str:
    """``message`` with every whole word that is one of ``arguments`` replaced by its flag.

    A word is a run of letters, digits and underscores; one that touches a hyphen is part of a
    flag already (``--steps``) and stays.
    """
    out, i = [], 0
    while i < len(message):
        j = i
        while j < len(message) and (message[j].isalnum() or message[j] == "_"):
            j += 1
        if j == i:
            out.append(message[i])
            i += 1
            continue
        word = message[i:j]
        in_flag = message[i - 1 : i] == "-" or message[j : j + 1] == "-"
        out.append(LIBRARY_FLAGS[word] if word in arguments and not in_flag else word)
        i = j
    return "".join(out)


@contextmanager
def _flags(*arguments: str) -> Iterator[None]:
    """Turn a library error about one of ``arguments`` (keys of `LIBRARY_FLAGS`) into a UsageError.

    An `ArgumentValueError` / `ArgumentTypeError` whose ``argument`` is one of ``arguments`` (or
    is a flag itself, as this module's own `check_int` calls pass) is a user error: its first
    line is printed with each of ``arguments`` named by its flag. Any other exception, an
    argument error about an argument this call site does not feed from a flag included, is a
    bug and keeps its traceback.
    """
    unknown = [a for a in arguments if a not in LIBRARY_FLAGS]
    assert not unknown, f"arguments missing from LIBRARY_FLAGS: {unknown}"
    try:
        yield
    except (ArgumentValueError, ArgumentTypeError) as err:
        if err.argument not in arguments and not err.argument.startswith("--"):
            raise
        raise UsageError(_with_flags(str(err).split("\n", 1)[0], arguments)) from None


DEFAULT_STEPS = 128  # `sparsed generate` without --steps or --threshold


def _sparsed_config(args: argparse.Namespace, **fixed) -> SparseDConfig:
    """The SparseDConfig of --skip, --select, --block-size and --prompt-end-offset, those the
    command has and the user gave (SparseDConfig's defaults for the rest; it checks them, before
    any model loads). ``prompt_end_offset`` may be None, "middle" or an int (sparsed_cli.flags)."""
    kwargs = {name: getattr(args, name) for name in SPARSED_ARGUMENTS if hasattr(args, name)}
    with _flags(*SPARSED_ARGUMENTS):
        return SparseDConfig(**kwargs, **fixed)


def _device(value: str) -> torch.device:
    """--device (auto, cpu, cuda or cuda:N, as `sparsed_cli.flags.DeviceName` passed it): CUDA
    only where such a device is visible."""
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(value)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        why = "no CUDA device is visible" if torch.version.cuda else f"torch {torch.__version__} is built without CUDA"
        raise UsageError(f"--device must be auto, cpu or an available CUDA device, got {value!r} ({why})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device must be cuda:0 to cuda:{torch.cuda.device_count() - 1} here, got {value!r}")
    return device


def _model_config(path: Path, model_types: tuple[str, ...]):
    from transformers import AutoConfig

    from .models import register_models

    register_models()  # the CLI always loads through the local ports, whatever SPARSED_REGISTER_MODELS says
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:  # unreadable JSON, an unknown model_type
        raise UsageError(f"--model: cannot read {path / 'config.json'}: {str(err).splitlines()[0]}") from None
    if config.model_type not in model_types:
        want = " or ".join(repr(t) for t in model_types)
        raise UsageError(f"--model must be a checkpoint of model_type {want}, got model_type {config.model_type!r}")
    return config


def _load_weights(path: Path, causal_lm: bool = False, **kwargs) -> torch.nn.Module:
    """``AutoModel.from_pretrained(path, **kwargs)`` (AutoModelForCausalLM with ``causal_lm``:
    Qwen3's LM head class) in eval mode; missing or unreadable weights are a UsageError naming
    --model."""
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoModelForCausalLM

    if not any(Path(path).glob("*.safetensors")) and not any(Path(path).glob("*.bin")):
        raise UsageError(f"--model must hold the weights (*.safetensors), got none in {path}")
    try:
        return (AutoModelForCausalLM if causal_lm else AutoModel).from_pretrained(path, **kwargs).eval()
    except (OSError, SafetensorError) as err:  # a truncated or corrupt weights file
        raise UsageError(f"--model: cannot load the weights in {path}: {str(err).splitlines()[0]}") from None


def _quiet_loading(args: argparse.Namespace) -> None:
    """transformers' own bars (loading weights) follow the same switch as ours."""
    if not progress_wanted(not args.no_progress):
        from transformers.utils import logging

        logging.disable_progress_bar()


def _rope_scaling(config, value: str | None):
    """--rope-scaling: ``config`` with the scaling it names instead of the checkpoint's (None: unchanged)."""
    if value is None:
        return config
    try:
        scaling = parse_rope_scaling(value)
    except ValueError as err:
        raise UsageError(f"--rope-scaling must be {err}, got {value!r}") from None
    try:
        return with_rope_scaling(config, scaling)
    except (TypeError, ValueError) as err:  # a checkpoint config the new scaling cannot go with
        raise UsageError(f"--rope-scaling {value}: {str(err).splitlines()[0]}") from None


def demo(args: argparse.Namespace) -> int:
    from .demo import model_path
    from .demo.evaluate import answer_prompts, wilson_interval
    from .demo.picture import draw_blocks
    from .demo.task import N_KEYS, VALUE_LEN, min_prompt_tokens, sample_prompts
    from .demo.tokenizer import build_tokenizer

    path = args.model or model_path()  # --model and --out checked by the parser (sparsed_cli.flags)
    with _flags():
        check_int("--steps", args.steps, 1, VALUE_LEN)
        check_int("--records", args.records, 1, N_KEYS)
    cfg = _sparsed_config(args, min_sparse_len=0, keep_diagonal=args.keep_diagonal)
    out = args.out
    config = _model_config(path, ("llada",))
    limit = position_limit(config)
    longest = limit - VALUE_LEN
    low = min_prompt_tokens(args.records)
    if not low <= args.length <= longest:
        raise UsageError(
            f"--length must be in [{low}, {longest}], got {args.length} ({args.records} records need {low} tokens; the "
            f"model's {limit:,} positions hold at most {longest:,} prompt tokens before the {VALUE_LEN} answer tokens)"
        )
    layer = config.n_layers - 1 if args.layer is None else args.layer
    with _flags():
        check_int("--layer", layer, 0, config.n_layers - 1)
    _quiet_loading(args)
    model = _load_weights(path, attn_implementation="sparsed", dtype=torch.float32)
    torch.manual_seed(args.seed)
    with _flags("seed"):
        prompts = sample_prompts(args.length, args.prompts, n_records=args.records, seed=args.seed)
    tok = build_tokenizer()
    print(
        f"model {path.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{model.config.n_layers} layers x {model.config.n_heads} heads | {args.prompts} prompts "
        f"(seed {args.seed}), {args.records} records each | {args.steps} denoising steps for {VALUE_LEN} answer tokens"
    )
    diagonal = " keep_diagonal=True" if cfg.keep_diagonal else ""
    sized = cfg.for_length(args.length + VALUE_LEN)  # the block size the selection uses
    auto = " (auto)" if cfg.block_size == "auto" else ""
    print(f"SparseD: skip={cfg.skip} select={cfg.select} block_size={sized.block_size}{auto} "
          f"prompt_end_offset={cfg.prompt_end_offset!r}{diagonal}")  # fmt: skip

    results, timers = {}, {}
    runs = [("dense", None), ("sparsed", cfg)]
    with progress(len(runs) * args.prompts, "answering", "prompt", not args.no_progress) as bar:
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
    bs, front = sized.block_size, sized.grid_front(args.length)  # position p is in grid block (p + front) // bs
    marks = ((args.length + front) // bs, (int(prompts.record_pos[0]) + front) // bs)
    picture = draw_blocks(
        state, layer, list(range(min(4, model.config.n_heads))), out,
        f"SparseD blocks kept (black), prompt 0, select={cfg.select}, block={bs}; "
        "red: answer's query block x record's key block", marks,
    )  # fmt: skip
    if picture:
        print(f"selected blocks of layer {layer}: {picture}")
    return 0


def _encode_prompt(args: argparse.Namespace, config):
    """The checkpoint's tokenizer and --prompt's ids (1, P), checked: text the tokenizer knows,
    no mask token, prompt and --gen-length within the model's positions."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        why = str(err).splitlines()[0]
        raise UsageError(f"--model: no tokenizer could be loaded from {args.model}: {why}") from None
    if not args.prompt.strip():
        raise UsageError("--prompt must hold some text, got an empty prompt")
    ids = tok(args.prompt, return_tensors="pt", verbose=False)["input_ids"]
    if ids.shape[1] == 0:
        raise UsageError("--prompt must hold at least one token, got an empty prompt")
    unknown = int((ids == tok.unk_token_id).sum()) if tok.unk_token_id is not None else 0
    if unknown:
        raise UsageError(
            f"--prompt must be text the model's tokenizer can encode, got {unknown} of {ids.shape[1]} tokens "
            f"unknown ({tok.unk_token}); the shipped demo model reads only its retrieval symbols (sparsed demo)"
        )
    limit = position_limit(config)
    if limit is not None and ids.shape[1] + args.gen_length > limit:
        raise UsageError(
            f"--prompt ({ids.shape[1]:,} tokens) and --gen-length ({args.gen_length:,}) make "
            f"{ids.shape[1] + args.gen_length:,} tokens, more than the model's maximum of {limit:,} positions "
            f"({position_limit_note(config)})"
        )
    mask_id = getattr(config, "mask_token_id", None)
    if mask_id is not None and bool((ids == mask_id).any()):
        raise UsageError(f"--prompt must not contain the mask token (id {mask_id}), got a prompt that does")
    return tok, ids


def generate(args: argparse.Namespace) -> int:
    from .cli_blockdiff import BLOCKDIFF_FLAGS, generate_blockdiff, refuse_flags
    from .sampling.arguments import check_dream_arguments, check_llada_arguments
    from .sampling.generation import dream_generate, llada_generate

    device = _device(args.device)
    path = args.model
    config = _model_config(path, ("llada", "Dream", "qwen3"))
    if config.model_type == "qwen3":
        return generate_blockdiff(args, config, device)
    refuse_flags(args, BLOCKDIFF_FLAGS, "block-diffusion (Qwen3)", config.model_type)
    config = _rope_scaling(config, getattr(args, "rope_scaling", None))
    dream = config.model_type == "Dream"
    steps = getattr(args, "steps", None)
    factor = getattr(args, "factor", None)
    if args.threshold is not None and steps is not None:
        raise UsageError(
            f"--steps and --threshold exclude each other: threshold decoding takes as many steps as each block "
            f"needs, got --steps {steps} and --threshold {args.threshold}"
        )
    if factor is not None and steps is not None:
        raise UsageError(
            f"--steps and --factor exclude each other: factor decoding takes as many steps as each block needs, "
            f"got --steps {steps} and --factor {factor}"
        )
    if factor is not None and args.threshold is not None:
        raise UsageError(
            f"--threshold and --factor are two parallel decoding rules: give one, got --threshold {args.threshold} "
            f"and --factor {factor}"
        )
    if args.threshold is None and factor is None and steps is None:
        steps = DEFAULT_STEPS
    kv_cache = None if getattr(args, "kv_cache", "none") == "none" else args.kv_cache
    if kv_cache is not None and args.attn not in ("sparsed", "sdpa", "eager"):
        raise UsageError(f"--kv-cache {kv_cache} runs with --attn sparsed, sdpa or eager, got --attn {args.attn!r}")
    fed = ("steps", "temperature", "threshold", "factor", "block_length", "kv_cache", *SPARSED_ARGUMENTS,
           "max_new_tokens" if dream else "gen_length")  # fmt: skip
    dynamic = args.threshold is not None or factor is not None
    alg = {"alg": "maskgit_plus"} if dream and dynamic else {}  # the probability confidence
    schedule = {"steps": steps, "block_length": args.block_length, "threshold": args.threshold, "factor": factor,
                "temperature": args.temperature, "kv_cache": kv_cache}  # fmt: skip
    with _flags(*fed):  # the samplers' own rules, before the tokenizer and the weights load
        if dream:
            check_dream_arguments(max_new_tokens=args.gen_length, **alg, **schedule)
        else:
            check_llada_arguments(gen_length=args.gen_length, **schedule)
    sparsed = _sparsed_config(args) if args.attn == "sparsed" else None
    tok, ids = _encode_prompt(args, config)
    dtype = getattr(torch, args.dtype)
    _quiet_loading(args)
    model = _load_weights(path, config=config, attn_implementation=args.attn, dtype=dtype)
    model.to(device)
    ids = ids.to(device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    # Threshold decoding takes at most one step per generated token.
    bar = progress(steps or args.gen_length, "denoising", "step", not args.no_progress)
    with bar, torch.inference_mode(), _flags(*fed):

        def step_done(*_) -> None:  # returns None: a forward hook's return value would replace the output
            bar.update(1)

        hook = model.register_forward_hook(step_done)
        try:
            common = {"steps": steps, "block_length": args.block_length, "temperature": args.temperature,
                      "generator": g, "sparsed": sparsed, "kv_cache": kv_cache,
                      "threshold": args.threshold, "factor": factor}  # fmt: skip
            if dream:
                out = dream_generate(model, ids, max_new_tokens=args.gen_length, **alg, **common)
            else:
                out = llada_generate(model, ids, gen_length=args.gen_length, **common)
        finally:
            hook.remove()
    print(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return 0


def bench(args: argparse.Namespace) -> int:
    from .attention.backend import dense_attention, sparse_attention
    from .attention.switch_step import select_layer

    cuda = _device(args.device).type == "cuda"
    for name, on_cuda, on_cpu in (("length", 8192, 1024), ("heads", 32, 4), ("head_dim", 128, 64)):
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    _sparsed_config(args, skip=0.0, min_sparse_len=0)  # checks --select and --block-size
    device = _device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, args.heads, args.length, args.head_dim, device=device, dtype=dtype) for _ in range(3))
    scale = args.head_dim**-0.5
    cfg = SparseDConfig(skip=0.0, select=args.select, block_size=args.block_size, min_sparse_len=0)
    sel = select_layer(q, k, scale, cfg)

    def clock(fn, bar) -> float:  # milliseconds; the bar moves outside the clock
        return median_seconds(fn, device, args.repeats, warmup=1, after=lambda: bar.update(1)) * 1e3

    with progress(2 * (args.repeats + 1), "timing", "call", not args.no_progress) as bar:
        dense_ms = clock(lambda: dense_attention(q, k, v, scale), bar)
        sparse_ms = clock(lambda: sparse_attention(q, k, v, sel.block_mask, scale), bar)
    print(
        f"{device} {dtype} N={args.length} heads={args.heads} d={args.head_dim}: dense {dense_ms:.2f} ms | "
        f"sparsed select={args.select} (density {float(sel.density):.2f}) {sparse_ms:.2f} ms | "
        f"speedup {dense_ms / sparse_ms:.2f}x"
    )
    return 0


COMMANDS = {"demo": demo, "generate": generate, "bench": bench}
