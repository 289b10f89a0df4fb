"""The samplers' argument rules, callable before a model loads.

`llada_generate` and `dream_generate` run these first; the CLI and the lm-eval model call them
as soon as they know the family (from the checkpoint's config), so a bad argument is reported
before minutes of weight loading, in the samplers' own words (`ArgumentValueError` /
`ArgumentTypeError` naming the argument).
"""

from __future__ import annotations

from typing import NamedTuple

from .._validate import ArgumentValueError, check_float, check_int
from ._threshold import check_schedule, confidence_rule
from .kv_cache import check_kv_cache

__all__ = [
    "DREAM_ALGS",
    "LLADA_REMASKING",
    "DreamArguments",
    "LLaDAArguments",
    "check_dream_arguments",
    "check_llada_arguments",
    "check_schedule",
]

LLADA_REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


class LLaDAArguments(NamedTuple):
    """`check_llada_arguments`' result: the values as the sampler uses them."""

    steps: int | None
    threshold: float | None
    gen_length: int
    block_length: int
    num_blocks: int
    temperature: float
    cfg_scale: float
    kv_cache: str | None
    factor: float | None = None


class DreamArguments(NamedTuple):
    """`check_dream_arguments`' result: the values as the sampler uses them."""

    steps: int | None
    threshold: float | None
    max_new_tokens: int
    block_length: int
    num_blocks: int
    alg_temp: float
    temperature: float
    top_p: float | None
    top_k: int | None
    eps: float
    kv_cache: str | None
    factor: float | None = None


def _check_blocks(length_name: str, length: int, block_length: int, steps: int | None) -> int:
    """The number of decoding blocks; the generation must be whole blocks and the steps split
    evenly over them."""
    if length % block_length != 0:
        raise ArgumentValueError(
            length_name,
            f"{length_name} must be divisible by block_length, got {length_name}={length}, block_length={block_length}",
        )
    num_blocks = length // block_length
    if steps is not None and steps % num_blocks != 0:
        raise ArgumentValueError(
            "steps",
            f"steps must be divisible by the number of blocks {length_name}/block_length = {num_blocks}, "
            f"got steps={steps}",
        )
    return num_blocks


def check_llada_arguments(
    *,
    gen_length: int,
    steps: int | None = None,
    block_length: int | None = None,
    threshold: float | None = None,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    kv_cache: str | None = None,
    factor: float | None = None,
) -> LLaDAArguments:
    """Every rule of `llada_generate`'s arguments that needs no model (see its docstring)."""
    steps, threshold, factor = check_schedule(steps, threshold, factor)
    gen_length = check_int("gen_length", gen_length, 1)
    block_length = gen_length if block_length is None else check_int("block_length", block_length, 1)
    num_blocks = _check_blocks("gen_length", gen_length, block_length, steps)
    temperature = check_float("temperature", temperature)
    cfg_scale = check_float("cfg_scale", cfg_scale)
    if remasking not in LLADA_REMASKING:
        raise ArgumentValueError("remasking", f"remasking must be one of {LLADA_REMASKING}, got {remasking!r}")
    rule = confidence_rule(threshold, factor)
    if rule is not None and remasking != "low_confidence":
        raise ArgumentValueError(
            rule, f"{rule} needs remasking='low_confidence' (a confidence to compare), got {remasking!r}"
        )
    kv_cache = check_kv_cache(kv_cache)
    if kv_cache is not None and cfg_scale > 0:
        raise ArgumentValueError(
            "kv_cache", f"kv_cache={kv_cache!r} does not support classifier-free guidance (cfg_scale={cfg_scale})"
        )
    return LLaDAArguments(
        steps, threshold, gen_length, block_length, num_blocks, temperature, cfg_scale, kv_cache, factor
    )


def check_dream_arguments(
    *,
    max_new_tokens: int,
    steps: int | None = None,
    block_length: int | None = None,
    threshold: float | None = None,
    alg: str = "origin",
    alg_temp: float | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    eps: float = 1e-3,
    kv_cache: str | None = None,
    factor: float | None = None,
) -> DreamArguments:
    """Every rule of `dream_generate`'s arguments that needs no model (see its docstring)."""
    steps, threshold, factor = check_schedule(steps, threshold, factor)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    if alg not in DREAM_ALGS:
        raise ArgumentValueError("alg", f"alg must be one of {DREAM_ALGS}, got {alg!r}")
    alg_temp = 0.0 if alg_temp is None else check_float("alg_temp", alg_temp)
    rule = confidence_rule(threshold, factor)
    if rule is not None and (alg != "maskgit_plus" or alg_temp > 0):
        raise ArgumentValueError(
            rule,
            f"{rule} needs alg='maskgit_plus' (the probability confidence) and alg_temp None or 0, "
            f"got alg={alg!r}, alg_temp={alg_temp}",
        )
    temperature = check_float("temperature", temperature)
    if top_p is not None:
        top_p = check_float("top_p", top_p)
        if not 0.0 < top_p <= 1.0:
            raise ArgumentValueError("top_p", f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None:
        top_k = check_int("top_k", top_k, 1)
    eps = check_float("eps", eps)
    if not 0.0 < eps < 1.0:
        raise ArgumentValueError("eps", f"eps must be in (0, 1), got {eps!r}")
    kv_cache = check_kv_cache(kv_cache)
    if kv_cache is not None and block_length is None:
        raise ArgumentValueError(
            "kv_cache",
            f"kv_cache={kv_cache!r} needs block_length: without blocks Dream decodes the whole generation at "
            "once, so no block is finished and nothing can be cached",
        )
    block_length = max_new_tokens if block_length is None else check_int("block_length", block_length, 1)
    num_blocks = _check_blocks("max_new_tokens", max_new_tokens, block_length, steps)
    return DreamArguments(
        steps,
        threshold,
        max_new_tokens,
        block_length,
        num_blocks,
        alg_temp,
        temperature,
        top_p,
        top_k,
        eps,
        kv_cache,
        factor,
    )
