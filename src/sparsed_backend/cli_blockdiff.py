"""``sparsed generate`` for a block-diffusion checkpoint (SDAR on transformers' Qwen3): which
flags belong to which sampler family, and the run through `blockdiff_generate`.

`sparsed_backend.cli.generate` reads the checkpoint's ``model_type``: ``qwen3`` comes here, and
LLaDA / Dream refuse the flags of `BLOCKDIFF_FLAGS`. Here the flags of `NOT_BLOCKDIFF_FLAGS`
are refused. The sampler and `PrefixSparseConfig` check every value they take; their errors
reach the user through `cli.LIBRARY_FLAGS`, as one line naming the flag.

Family-specific flags default to ``argparse.SUPPRESS`` in `sparsed_cli` (absent from the
namespace unless given), so "given" is "present", whatever the value.
"""

from __future__ import annotations

import argparse

import torch

from .cli import UsageError, _encode_prompt, _flags, _load_weights, _quiet_loading
from .sampling.block_diffusion import MASK_IMPLEMENTATIONS, blockdiff_generate

__all__ = ["BLOCKDIFF_FLAGS", "NOT_BLOCKDIFF_FLAGS", "generate_blockdiff", "refuse_flags"]

# Namespace attribute -> flag. Flags only blockdiff_generate takes:
BLOCKDIFF_FLAGS = {
    "denoising_steps": "--denoising-steps",
    "remasking": "--remasking",
    "prefix_budget": "--prefix-budget",
    "select_every": "--select-every",
    "scorer": "--scorer",
    "sparse_commit": "--sparse-commit",
    "cuda_graphs": "--cuda-graphs",
}
# Flags of the LLaDA / Dream samplers (and SparseD) that a block-diffusion checkpoint refuses.
NOT_BLOCKDIFF_FLAGS = {"steps": "--steps", "kv_cache": "--kv-cache", "skip": "--skip",
                       "prompt_end_offset": "--prompt-end-offset", "rope_scaling": "--rope-scaling",
                       "factor": "--factor"}  # fmt: skip
# blockdiff_generate's and PrefixSparseConfig's arguments that flags feed (keys of LIBRARY_FLAGS).
FED = ("gen_length", "block_length", "denoising_steps", "remasking", "threshold", "temperature", "select", "budget",
       "block_size", "select_every", "scorer", "sparse_commit", "cuda_graphs")  # fmt: skip
# PrefixSparseConfig fields a flag of the same name sets (with --attn sparsed only).
PREFIX_FIELDS = ("select", "block_size", "select_every", "scorer", "sparse_commit")


def refuse_flags(args: argparse.Namespace, flags: dict[str, str], family: str, model_type: str) -> None:
    """UsageError naming the first of ``flags`` given on the command line: it applies only to
    ``family`` checkpoints, not to this one of ``model_type``."""
    for dest, flag in flags.items():
        if hasattr(args, dest):
            raise UsageError(
                f"{flag} applies only to {family} checkpoints, got {flag} {getattr(args, dest)!r} with a "
                f"{model_type!r} checkpoint"
            )


def _prefix_config(args: argparse.Namespace):
    """The PrefixSparseConfig of --select or --prefix-budget, --block-size, --select-every,
    --scorer and --sparse-commit (it checks them)."""
    from .attention.prefix_selection import PrefixSparseConfig

    fields = {name: getattr(args, name) for name in PREFIX_FIELDS if hasattr(args, name)}
    if fields.get("block_size") == "auto":
        raise UsageError(
            "--block-size auto is SparseD's (LLaDA / Dream); a block-diffusion checkpoint takes an int number "
            "of prefix tokens per selected block, got --block-size auto"
        )
    if hasattr(args, "prefix_budget"):
        fields = {"select": None, **fields, "budget": args.prefix_budget}  # the budget replaces select
    with _flags("select", "budget", "block_size", "select_every", "scorer", "sparse_commit"):
        return PrefixSparseConfig(**fields)


def generate_blockdiff(args: argparse.Namespace, config, device: torch.device) -> int:
    """Generate from --prompt with a block-diffusion checkpoint and print the text."""
    refuse_flags(args, NOT_BLOCKDIFF_FLAGS, "LLaDA and Dream", config.model_type)
    if args.attn not in MASK_IMPLEMENTATIONS:
        raise UsageError(
            f"--attn must be one of {', '.join(MASK_IMPLEMENTATIONS)} for a block-diffusion checkpoint (the "
            f"sampler builds its block-causal mask for those), got --attn {args.attn!r}"
        )
    if getattr(config, "mask_token_id", None) is None:
        raise UsageError(f"--model must be a block-diffusion checkpoint, its config with a mask token id "
                         f"('mask_token_id'), got none in {args.model / 'config.json'}")  # fmt: skip
    block_length = args.block_length if args.block_length is not None else getattr(config, "block_size", None)
    if block_length is None:
        raise UsageError(f"--block-length is required with this checkpoint, got none and no 'block_size' in "
                         f"{args.model / 'config.json'}")  # fmt: skip
    threshold = args.threshold
    remasking = getattr(args, "remasking", "low_confidence_static" if threshold is None else "low_confidence_dynamic")
    sparsed = _prefix_config(args) if args.attn == "sparsed" else None
    given = [name for name in (*PREFIX_FIELDS, "prefix_budget") if hasattr(args, name)]
    if sparsed is None and given:
        flag = "--" + given[0].replace("_", "-")
        raise UsageError(f"{flag} is a setting of the sparse prefix selection: it needs --attn sparsed, got "
                         f"--attn {args.attn}")  # fmt: skip
    tok, ids = _encode_prompt(args, config)
    _quiet_loading(args)
    model = _load_weights(args.model, causal_lm=True, config=config, attn_implementation=args.attn,
                          dtype=getattr(torch, args.dtype))  # fmt: skip
    model.to(device)
    ids = ids.to(device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    with torch.inference_mode(), _flags(*FED):
        out = blockdiff_generate(
            model, ids, gen_length=args.gen_length, block_length=block_length,
            denoising_steps=getattr(args, "denoising_steps", block_length), remasking=remasking, threshold=threshold,
            temperature=args.temperature, generator=g, sparsed=sparsed, cuda_graphs=getattr(args, "cuda_graphs", False),
        )  # fmt: skip
    print(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return 0
