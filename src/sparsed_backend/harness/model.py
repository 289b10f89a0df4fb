"""``sparsed-dlm``: an lm-evaluation-harness model for LLaDA, Dream and block-diffusion (SDAR on Qwen3)
checkpoints, dense or sparse.

    sparsed-eval --model sparsed-dlm --model_args pretrained=PATH,attn=sparsed,select=0.3 --tasks ...

Importing this module imports ``lm_eval.models`` first (once an outside model is registered,
lm-eval no longer loads its own registry on demand, and ``--model hf`` would fail), then
registers `DiffusionLM` under ``sparsed-dlm``.

- ``generate_until`` runs the project's samplers (`llada_generate`, `dream_generate`,
  `blockdiff_generate` for a Qwen3 block-diffusion checkpoint) on left-padded batches, with SparseD
  (or sparse prefix selection for block diffusion) when ``attn=sparsed``.
- ``loglikelihood`` is the Monte Carlo masked estimate of `harness.likelihood`, always with dense
  attention (see `DiffusionLM.loglikelihood`).
- ``loglikelihood_rolling`` raises NotImplementedError.

A request longer than the model's position limit is left-truncated (`DiffusionLM._fit`), as
lm-eval's HF model does, with a one-time warning per request type; it never aborts the run.

Over 400 lines: one lm-eval model class, whose model args, loading and request types share its
state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import lm_eval.models  # noqa: F401  (must come before our registration: see the module docstring)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .. import SparseDConfig
from .._validate import ArgumentTypeError, ArgumentValueError, check_int
from .._warn import warn_once
from ..attention.prefix_selection import PrefixSparseConfig
from ..models.rope import parse_rope_scaling, position_limit, position_limit_note, with_rope_scaling
from ..sampling.arguments import check_dream_arguments, check_llada_arguments
from ..sampling.block_diffusion import blockdiff_generate
from ..sampling.generation import check_cache_with_sparsed, dream_generate, llada_generate
from . import MODEL_NAME
from .likelihood import masked_loglikelihood

__all__ = ["DiffusionLM"]

log = logging.getLogger(__name__)

FAMILIES = {"llada": "llada", "Dream": "dream", "qwen3": "blockdiff"}  # config.model_type -> sampler family
# Model args of the LLaDA / Dream samplers that a block-diffusion checkpoint (blockdiff_generate) refuses.
NOT_BLOCKDIFF = ("skip", "min_sparse_len", "keep_diagonal", "prompt_end_offset", "steps", "alg", "alg_temp",
                 "kv_cache", "rope_scaling", "factor", "mc_samples")  # fmt: skip
BLOCKDIFF_SPARSE = ("select", "prefix_budget", "block_size", "per_kv_head", "pattern", "select_every", "scorer",
                    "sparse_commit")  # fmt: skip
# Model args only blockdiff_generate takes, refused for a LLaDA / Dream checkpoint.
ONLY_BLOCKDIFF = ("denoising_steps", "prefix_budget", "per_kv_head", "select_every", "scorer", "sparse_commit",
                  "cuda_graphs")  # fmt: skip
ATTN = ("dense", "sparsed")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------ argument parsing
#
# lm-eval (>= 0.4.13, `lm_eval.utils.simple_parse_args_string`) hands model args over typed:
# true/false -> bool, none -> None, digits -> int, other numbers -> float, the rest as text. So
# values are checked here only by the rules the harness itself owns; SparseDConfig,
# PrefixSparseConfig and the samplers check their own arguments, and `_model_args` names the
# model arg in their errors.

# Values given as text that the library spells otherwise (from a YAML --config, or Python).
TEXT_VALUES = {"prompt_end_offset": {"none": None, "middle": "middle"}, "kv_cache": {"none": None}}
# Library argument names that are not the model arg's; every other library argument the harness
# feeds has the model arg's name.
LIBRARY_NAMES = {"max_new_tokens": "gen_length", "budget": "prefix_budget"}


class ModelArgError(ValueError):
    """A user error in ``--model_args``: `sparsed-eval` prints it as one line (exit status 2)."""


def _fail(name: str, expected: str, value: object) -> ModelArgError:
    return ModelArgError(f"model arg {name}: expected {expected}, got {value!r}")


@contextmanager
def _model_args(known: set[str]) -> Iterator[None]:
    """Turn the library's error about an argument fed from a model arg in ``known`` into a
    ModelArgError naming that model arg; any other exception is a bug and keeps its traceback."""
    try:
        yield
    except (ArgumentValueError, ArgumentTypeError) as err:
        name = LIBRARY_NAMES.get(err.argument, err.argument)
        if name not in known:
            raise
        via = f" (the library's {err.argument})" if name != err.argument else ""
        raise ModelArgError(f"model arg {name}{via}: {str(err).splitlines()[0]}") from None


def _spelled(kw: dict) -> dict:
    """``kw`` with the text spellings of `TEXT_VALUES` replaced (any case). ``rope_scaling=none``
    arrives as None from lm-eval: it means no scaling (absent: the checkpoint's own)."""
    kw = dict(kw)
    for name, table in TEXT_VALUES.items():
        value = kw.get(name)
        if isinstance(value, str) and value.strip().lower() in table:
            kw[name] = table[value.strip().lower()]
    if "rope_scaling" in kw and kw["rope_scaling"] is None:
        kw["rope_scaling"] = "none"
    return kw


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _fail(name, f"one of {choices}", value)
    return value


def _device(value: object) -> torch.device:
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise _fail("device", "a torch device such as 'cpu' or 'cuda:0'", value) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        # lm-eval's CLI passes device='cuda:0' to every model unless told otherwise.
        warn_once(
            "harness-no-cuda",
            f"sparsed-dlm: device {value!r} asked for but CUDA is not available; running on the CPU "
            "(pass --device cpu to choose it)",
        )
        return torch.device("cpu")
    return device


def _dtype(value: object, device: torch.device) -> torch.dtype:
    if value in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[_choice("dtype", value, ("auto", *DTYPES))]


@register_model(MODEL_NAME)
class DiffusionLM(LM):
    """LLaDA or Dream (detected from ``config.model_type``) behind lm-eval's LM interface.

    Model args (``--model_args key=value,...``, typed by lm-eval: ``none`` is None, ``true`` True,
    numbers are numbers; ``prompt_end_offset`` and ``kv_cache`` also take the text ``none``).
    A bad value raises ModelArgError naming it: the harness's own args and those of SparseDConfig,
    PrefixSparseConfig, the steps/threshold schedule and the cache kind at construction, the
    sampler's other args (block divisibility, remasking, alg, top_p, ...) at the first
    ``generate_until``.

    Args:
        pretrained: checkpoint directory (or Hub id) of a LLaDA or Dream model.
        tokenizer: tokenizer directory; default ``pretrained``.
        attn: ``dense`` (transformers' sdpa) or ``sparsed`` (SparseD during generation).
        skip, select, block_size, min_sparse_len, keep_diagonal, prompt_end_offset: `SparseDConfig`
            fields; only with ``attn=sparsed`` (defaults: SparseDConfig's).
        gen_length: tokens the sampler generates per request (default 128); less than the
            model's position limit (`models.rope.position_limit`: ``max_position_embeddings``, or
            original x factor under a RoPE scaling), since the prompt needs a position too.
        rope_scaling: ``none`` or ``TYPE:FACTOR`` (``linear``, ``dynamic``, ``yarn``; e.g.
            ``yarn:4``) instead of the checkpoint's RoPE scaling; default: the checkpoint's own.
        steps: denoising steps (default ``gen_length``); not with ``threshold``.
        threshold: confidence-threshold decoding instead of a fixed step count (the samplers'
            ``threshold``); Dream's ``alg`` then defaults to ``maskgit_plus``.
        factor: Fast-dLLM's factor rule instead (the samplers' ``factor``), the same way.
        block_length: semi-autoregressive block; LLaDA default ``gen_length``, Dream default
            none (Dream's own sampler, no blocks).
        kv_cache: ``none`` (default), ``prefix`` or ``dual``: the samplers' block-wise K/V cache
            (Dream needs ``block_length`` with it).
        remasking: LLaDA only, ``low_confidence`` (default) or ``random``.
        alg, alg_temp, top_p, top_k: Dream only (default ``alg=entropy``, as Dream's own example).
        temperature: sampling temperature (default 0: greedy).
        mc_samples: Monte Carlo samples per loglikelihood request (default 128).
        seed: seeds the masks of loglikelihood and the sampling noise (default 0).
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16``, ``float16``.
        device: ``cpu``, ``cuda``, ``cuda:N``; lm-eval's CLI passes ``cuda:0`` unless told
            otherwise, which runs on the CPU (with a warning) where CUDA is missing. None: CUDA if
            available, else CPU.
        batch_size: prompts per sampler call and rows per likelihood forward (an int; default 1).
        max_batch_size: lm-eval passes it; only meaningful with ``batch_size=auto``, unsupported.

    A block-diffusion checkpoint (``model_type`` qwen3, e.g. SDAR; `blockdiff_generate`, loaded with
    AutoModelForCausalLM; ``generate_until`` only) takes ``block_length`` (default the config's
    ``block_size``), ``denoising_steps`` (default ``block_length``), ``remasking``
    (``low_confidence_static``, ``low_confidence_dynamic`` with ``threshold``, ``sequential``),
    ``temperature``, ``top_k``, ``top_p``, and with ``attn=sparsed`` the sparse prefix selection's
    ``select`` (default 0.3) or ``prefix_budget`` (tokens), ``block_size`` (prefix tokens per block,
    default 128), ``per_kv_head``, ``pattern``, ``select_every``, ``scorer`` and ``sparse_commit``
    (`prefix_selection.PrefixSparseConfig`), and
    ``cuda_graphs`` (True or "piecewise": the decoding forwards through CUDA graphs around the
    attention; "whole": each forward one graph through the Triton decode kernel; CUDA only).
    """

    def __init__(self, pretrained: str | None = None, **kwargs) -> None:
        super().__init__()
        if not isinstance(pretrained, str) or not pretrained:
            raise _fail("pretrained", "a checkpoint path or Hub id", pretrained)
        known = self._known = {
            "tokenizer", "attn", "skip", "select", "block_size", "min_sparse_len", "keep_diagonal",
            "prompt_end_offset", "gen_length",
            "steps", "threshold", "block_length", "remasking", "alg", "alg_temp", "top_p", "top_k", "temperature",
            "mc_samples", "seed", "dtype", "device", "batch_size", "max_batch_size", "kv_cache", "rope_scaling",
            "denoising_steps", "prefix_budget", "per_kv_head", "pattern", "cuda_graphs", "factor", "select_every",
            "scorer", "sparse_commit",
        }  # fmt: skip
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ModelArgError(f"unknown model args {unknown}; sparsed-dlm takes pretrained and {sorted(known)}")
        kwargs = _spelled(kwargs)
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(pretrained)
        except (OSError, ValueError) as err:  # no such directory or Hub id, an unreadable config
            raise _fail("pretrained", "a checkpoint directory (or Hub id)", f"{pretrained}: {err}") from None
        self.family = FAMILIES.get(getattr(config, "model_type", None))
        if self.family is None:
            raise _fail("pretrained", f"a checkpoint with model_type in {tuple(FAMILIES)}", config.model_type)
        if self.family == "blockdiff":
            self._parse_blockdiff(kwargs, getattr(config, "block_size", None))
        else:
            self._parse(kwargs)
        if kwargs.get("rope_scaling") is not None:
            try:
                scaling = parse_rope_scaling(kwargs["rope_scaling"])
            except ValueError as err:
                raise _fail("rope_scaling", str(err), kwargs["rope_scaling"]) from None
            config = with_rope_scaling(config, scaling)
        # The sampler's own check reads the same limit (position_limit); the truncation below
        # must agree with it exactly.
        self.max_length = position_limit(config)
        self._limit_note = position_limit_note(config)
        if isinstance(self.max_length, int) and self.gen_length >= self.max_length:
            raise _fail(
                "gen_length",
                f"an int < the model's position limit {self.max_length} ({self._limit_note}; the prompt needs a "
                "position)",
                self.gen_length,
            )
        self._device = _device(kwargs.get("device"))
        self.dtype = _dtype(kwargs.get("dtype", "auto"), self._device)
        self._load(pretrained, kwargs.get("tokenizer", pretrained), config)

    # -------------------------------------------------------------------------------- setup

    def _parse(self, kw: dict) -> None:
        """Model args of a LLaDA or Dream checkpoint, checked before the model loads by the code
        that owns each rule: SparseDConfig its fields, `check_llada_arguments` /
        `check_dream_arguments` the sampler's (the samplers run the same checks)."""
        wrong = [k for k in ONLY_BLOCKDIFF if k in kw]
        if wrong:
            raise ModelArgError(f"model args {wrong} apply to block-diffusion (Qwen3) checkpoints only")
        self.attn = _choice("attn", kw.get("attn", "dense"), ATTN)
        sparse_keys = ("skip", "select", "block_size", "min_sparse_len", "keep_diagonal", "prompt_end_offset",
                       "pattern")  # fmt: skip
        self.sparsed = None
        if self.attn == "sparsed":
            fields = {k: kw[k] for k in sparse_keys if k in kw}
            with _model_args(self._known):
                try:
                    self.sparsed = SparseDConfig(**fields)
                except TypeError as err:
                    if isinstance(err, ArgumentTypeError):
                        raise
                    # SparseDConfig refuses a non-bool keep_diagonal with a plain TypeError (no
                    # .argument); only user-given fields reach it here.
                    raise ModelArgError(f"model args: {err}") from None
        else:
            given = [k for k in sparse_keys if k in kw]
            if given:
                raise ModelArgError(f"model args {given} are SparseD settings: they need attn=sparsed, got attn=dense")
        other = "dream" if self.family == "llada" else "llada"
        own_keys = {"llada": ("remasking",), "dream": ("alg", "alg_temp", "top_p", "top_k")}
        wrong = [k for k in own_keys[other] if k in kw]
        if wrong:
            raise ModelArgError(f"model args {wrong} belong to the {other} sampler; this checkpoint is {self.family}")
        with _model_args(self._known):  # the samplers' own rules, before the model loads
            self.gen_length = check_int("gen_length", kw.get("gen_length", 128), 1)  # the harness reserves it
            threshold, factor = kw.get("threshold"), kw.get("factor")
            dynamic = threshold is not None or factor is not None  # a confidence rule, not a step count
            steps = kw.get("steps", None if dynamic else self.gen_length)
            self.temperature = kw.get("temperature", 0.0)
            self.block_length = kw.get("block_length", self.gen_length if self.family == "llada" else None)
            schedule = {"steps": steps, "threshold": threshold, "factor": factor, "block_length": self.block_length,
                        "temperature": self.temperature, "kv_cache": kw.get("kv_cache")}  # fmt: skip
            if self.family == "llada":
                self.remasking = kw.get("remasking", "low_confidence")
                checked = check_llada_arguments(gen_length=self.gen_length, remasking=self.remasking, **schedule)
            else:
                # Dream's own example decodes by entropy; threshold decoding compares the drawn
                # token's probability, maskgit_plus's confidence.
                self.alg = kw.get("alg", "maskgit_plus" if dynamic else "entropy")
                self.alg_temp, self.top_p, self.top_k = kw.get("alg_temp", 0.0), kw.get("top_p"), kw.get("top_k")
                checked = check_dream_arguments(
                    max_new_tokens=self.gen_length, alg=self.alg, alg_temp=self.alg_temp, top_p=self.top_p,
                    top_k=self.top_k, **schedule,
                )  # fmt: skip
            self.steps, self.threshold, self.kv_cache = checked.steps, checked.threshold, checked.kv_cache
            self.factor = checked.factor
            check_cache_with_sparsed(self.kv_cache, self.sparsed)
        self._parse_common(kw)

    def _parse_blockdiff(self, kw: dict, config_block: int | None) -> None:
        """Model args of a block-diffusion checkpoint (SDAR on Qwen3, `blockdiff_generate`).
        PrefixSparseConfig checks its fields here; blockdiff_generate checks the rest (remasking
        with threshold, temperature, top_k, top_p) at the first generate_until call."""
        wrong = [k for k in NOT_BLOCKDIFF if k in kw]
        if wrong:
            raise ModelArgError(
                f"model args {wrong} belong to the LLaDA / Dream samplers; this checkpoint is a block-diffusion "
                "Qwen3 (blockdiff_generate: block_length, denoising_steps, remasking, threshold, top_k, top_p)"
            )
        self.attn = _choice("attn", kw.get("attn", "dense"), ATTN)
        self.sparsed = None
        if self.attn == "sparsed":
            fields = {k: kw[k] for k in BLOCKDIFF_SPARSE if k in kw and k != "prefix_budget"}
            if "prefix_budget" in kw:
                fields = {"select": None, **fields, "budget": kw["prefix_budget"]}  # the budget replaces select
            with _model_args(self._known):
                self.sparsed = PrefixSparseConfig(**fields)
        else:
            given = [k for k in BLOCKDIFF_SPARSE if k in kw]
            if given:
                raise ModelArgError(f"model args {given} are sparse prefix settings: they need attn=sparsed")
        block = kw.get("block_length", config_block)
        if block is None:
            raise _fail("block_length", "an int >= 1 (the checkpoint's config has no block_size)", None)
        with _model_args(self._known):
            self.gen_length = check_int("gen_length", kw.get("gen_length", 128), 1)  # the harness reserves it
        self.block_length = block
        self.denoising_steps = kw.get("denoising_steps", self.block_length)
        self.threshold = kw.get("threshold")
        dynamic = self.threshold is not None  # SDAR's threshold rule
        self.remasking = kw.get("remasking", "low_confidence_dynamic" if dynamic else "low_confidence_static")
        self.temperature, self.top_k, self.top_p = kw.get("temperature", 0.0), kw.get("top_k", 0), kw.get("top_p", 1.0)
        self.cuda_graphs = kw.get("cuda_graphs", False)  # blockdiff_generate checks it
        self._parse_common(kw)

    def _parse_common(self, kw: dict) -> None:
        """The model args every family shares: likelihood samples, seed, batch size."""
        batch_size = kw.get("batch_size", 1)
        if isinstance(batch_size, str):  # lm-eval's --batch_size flag is text ("8", "auto", "auto:4")
            if batch_size.startswith("auto"):
                raise _fail("batch_size", "an int >= 1 (automatic batch sizes are not supported)", batch_size)
            if batch_size.strip().isdigit():
                batch_size = int(batch_size)
        with _model_args(self._known):
            self.mc_samples = check_int("mc_samples", kw.get("mc_samples", 128), 1)
            self.seed = check_int("seed", kw.get("seed", 0), 0)
            self.batch_size = check_int("batch_size", batch_size, 1)
        if kw.get("max_batch_size") is not None:
            warn_once("harness-max-batch", "sparsed-dlm: max_batch_size only applies to batch_size=auto; ignored")

    def _load(self, pretrained: str, tokenizer: str, config) -> None:
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        impl = "sparsed" if self.attn == "sparsed" else "sdpa"
        auto = AutoModelForCausalLM if self.family == "blockdiff" else AutoModel  # Qwen3's LM head class
        model = auto.from_pretrained(pretrained, config=config, attn_implementation=impl, dtype=self.dtype)
        self.model = model.to(self._device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.mask_id = getattr(self.model.config, "mask_token_id", None)
        if self.mask_id is None:
            raise _fail("pretrained", "a config with mask_token_id set", None)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        if self.pad_id is None or self.pad_id == self.mask_id:
            raise ValueError(
                f"the tokenizer needs a pad or eos token other than the mask token (id {self.mask_id}), "
                f"got {self.pad_id!r}"
            )
        log.info(
            "sparsed-dlm: %s (%s) attn=%s sparsed=%s on %s %s",
            pretrained, self.family, self.attn, self.sparsed, self._device, self.dtype,
        )  # fmt: skip

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        # Model args win over lm-eval's CLI defaults (device='cuda:0', batch_size=1).
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "").replace("/", "__")

    # ---------------------------------------------------------------------------- tokenizing

    def _encode_context(self, context: str) -> list[int]:
        """Context ids with the tokenizer's special tokens (the demo and LLaDA tokenizers add BOS).

        An empty context becomes the BOS (or EOS) token alone: every model forward needs one."""
        ids = self.tokenizer(context)["input_ids"]
        if not ids:
            prefix = self.tokenizer.bos_token_id
            ids = [prefix if prefix is not None else self.tokenizer.eos_token_id]
        return ids

    def _fit(
        self, kind: str, pairs: list[tuple[list[int], list[int]]], reserve: int
    ) -> list[tuple[list[int], list[int]]]:
        """Left-truncate requests that do not fit the model's position limit, as lm-eval's HF model
        does, and warn once per request type by how much.

        The samplers refuse a canvas past the position limit (RoPE on positions the model
        never saw), which would abort the whole evaluation on one long document; lm-eval's own
        models drop the oldest context tokens instead, so scores stay comparable with theirs.
        Each pair is (context, continuation); ``reserve`` positions after them stay free (the
        generation canvas, ``gen_length``; 0 for likelihood). The context loses its left end
        first; when the continuation alone does not fit, it keeps its right end and the context
        keeps its last token (every forward needs one context token: Dream reads the first
        continuation token's logits there).
        """
        if not isinstance(self.max_length, int):
            return pairs
        room = self.max_length - reserve  # >= 1: checked against gen_length at construction
        out, cut_ctx, cut_cont = [], [], []
        for ctx, cont in pairs:
            cont_kept = cont[len(cont) - min(len(cont), room - 1) :]
            ctx_kept = ctx[len(ctx) - min(len(ctx), room - len(cont_kept)) :]
            out.append((ctx_kept, cont_kept))
            if len(ctx_kept) < len(ctx) or len(cont_kept) < len(cont):
                cut_ctx.append(len(ctx) - len(ctx_kept))
                cut_cont.append(len(cont) - len(cont_kept))
        if cut_ctx:
            after = f"gen_length {reserve} kept for the generation" if reserve else "continuation included"
            message = (
                f"sparsed-dlm: {len(cut_ctx)} of {len(pairs)} {kind} requests exceed the model's position limit "
                f"{self.max_length} ({self._limit_note}; {after}); left-truncated as lm-eval's HF model does: "
                f"{sum(cut_ctx)} context tokens cut in all, {min(cut_ctx)} to {max(cut_ctx)} per request"
            )
            if any(cut_cont):
                message += (
                    f"; {sum(1 for c in cut_cont if c)} continuation(s) alone exceed the limit and keep their right "
                    f"end: {sum(cut_cont)} continuation tokens cut"
                )
            log.info(message)  # every call; the warning below only the first time per request type
            warn_once(f"harness-truncated-{kind}", message)
        return out

    # ---------------------------------------------------------------------------- generation

    def _gen_settings(self, gen_kwargs: dict) -> tuple[list[str], int]:
        """Stop strings and the token budget of one request; warns once about what is not applied."""
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None)
        until = [] if until is None else [until] if isinstance(until, str) else list(until)
        max_gen = gen_kwargs.pop("max_gen_toks", None)
        max_gen = self.gen_length if max_gen is None else check_int("max_gen_toks", max_gen, 1)  # the task's
        if max_gen > self.gen_length:
            warn_once(
                f"harness-max-gen-{max_gen}",
                f"sparsed-dlm: the task asks for up to max_gen_toks={max_gen} tokens but the sampler generates "
                f"gen_length={self.gen_length}; raise gen_length to give it more",
            )
        greedy = self.temperature == 0.0
        for key, value in gen_kwargs.items():
            consistent = (key == "do_sample" and value is (not greedy)) or (
                key == "temperature" and isinstance(value, (int, float)) and float(value) == self.temperature
            )
            if not consistent:
                warn_once(
                    f"harness-gen-{key}-{value}",
                    f"sparsed-dlm: the task's generation kwarg {key}={value!r} is not applied; the model args "
                    f"decide sampling (temperature={self.temperature})",
                )
        return until, min(max_gen, self.gen_length)

    def _sample(self, ids: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """(B, P) left-padded prompts -> (B, gen_length) generated ids. The sampler checks the
        model args it takes; an error about one of them is a ModelArgError naming it."""
        with _model_args(self._known):
            return self._run_sampler(ids, mask, generator)[:, ids.shape[1] :]

    def _run_sampler(self, ids: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        if self.family == "blockdiff":
            out = blockdiff_generate(
                self.model, ids, mask, gen_length=self.gen_length, block_length=self.block_length,
                denoising_steps=self.denoising_steps, remasking=self.remasking, threshold=self.threshold,
                temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, mask_id=self.mask_id,
                generator=generator, sparsed=self.sparsed, cuda_graphs=self.cuda_graphs,
            )  # fmt: skip
        elif self.family == "llada":
            out = llada_generate(
                self.model, ids, mask, steps=self.steps, gen_length=self.gen_length,
                block_length=self.block_length, temperature=self.temperature, remasking=self.remasking,
                mask_id=self.mask_id, generator=generator, sparsed=self.sparsed, kv_cache=self.kv_cache,
                threshold=self.threshold, factor=self.factor,
            )  # fmt: skip
        else:
            out = dream_generate(
                self.model, ids, mask, steps=self.steps, max_new_tokens=self.gen_length, alg=self.alg,
                alg_temp=self.alg_temp, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                mask_token_id=self.mask_id, generator=generator, sparsed=self.sparsed,
                block_length=self.block_length, kv_cache=self.kv_cache, threshold=self.threshold, factor=self.factor,
            )  # fmt: skip
        return out

    def _decode(self, ids: list[int], until: list[str]) -> str:
        """Generated ids -> text: cut at the first EOS token, drop special tokens, cut at the
        earliest stop string."""
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in until:
            if stop:
                text = text.split(stop, 1)[0]
        return text

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Sample ``gen_length`` tokens per request (batched, left padded), keep the first
        ``min(max_gen_toks, gen_length)`` of them, cut at EOS and at the stop strings.

        A context longer than the position limit minus ``gen_length`` keeps its last tokens
        (`_fit`), so the sampler's canvas fits."""
        settings = [self._gen_settings(req.args[1]) for req in requests]
        contexts = [(self._encode_context(req.args[0]), []) for req in requests]
        fitted = self._fit("generate_until", contexts, reserve=self.gen_length)
        items = [(ids, until, budget) for (ids, _), (until, budget) in zip(fitted, settings, strict=True)]
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        results: list[str | None] = [None] * len(items)
        generator = torch.Generator(device=self._device).manual_seed(self.seed)
        bar = tqdm(total=len(items), disable=disable_tqdm or self.rank != 0, desc="sparsed-dlm generate")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(items[i][0]) for i in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for b, i in enumerate(chunk):
                n = len(items[i][0])
                ids[b, width - n :] = torch.tensor(items[i][0])
                mask[b, width - n :] = 1
            generated = self._sample(ids.to(self._device), mask.to(self._device), generator).cpu()
            for b, i in enumerate(chunk):
                _, until, budget = items[i]
                text = self._decode(generated[b, :budget].tolist(), until)
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(chunk))
        bar.close()
        return results

    # ---------------------------------------------------------------------------- likelihood

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids: the whole text is encoded once and split after the
        context's token count, so a token spanning the boundary is not counted twice; trailing
        spaces of the context move to the continuation (lm-eval's convention)."""
        stripped = len(context) - len(context.rstrip(" "))
        if stripped:
            context, continuation = context[:-stripped], context[-stripped:] + continuation
        ctx = self._encode_context(context)
        cont = self._encode_context(context + continuation)[len(ctx) :]
        if not cont:
            raise ValueError(f"the continuation {continuation!r} encodes to no tokens after the context")
        return ctx, cont

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Monte Carlo masked estimate of log p(continuation | context) (`harness.likelihood`),
        ``mc_samples`` samples per request, and whether greedy decoding of the fully masked
        continuation (one forward, argmax per position) gives it exactly.

        Attention is dense here even with ``attn=sparsed``: SparseD is a schedule over the
        denoising steps of a generation whose early steps run dense, and a likelihood forward
        is a single step (a one-time warning says so).

        Context plus continuation longer than the position limit is left-truncated
        (`_fit`): the context loses its oldest tokens, and a continuation that alone does not fit
        keeps its right end, which is then all that is scored."""
        if self.family == "blockdiff":
            raise NotImplementedError(
                "sparsed-dlm: loglikelihood is not implemented for block-diffusion checkpoints (the masked "
                "estimate here is LLaDA's and Dream's); use generate_until tasks"
            )
        if self.sparsed is not None:
            warn_once(
                "harness-ll-dense",
                "sparsed-dlm: loglikelihood runs dense attention (a single forward is a dense step of "
                "SparseD's schedule); attn=sparsed only changes generate_until",
            )
        pairs = self._fit("loglikelihood", [self._split(*req.args) for req in requests], reserve=0)
        out = masked_loglikelihood(
            self.model, pairs, mask_id=self.mask_id, pad_id=self.pad_id, mc_samples=self.mc_samples,
            batch_size=self.batch_size, seed=self.seed, shifted=self.family == "dream", device=self._device,
        )  # fmt: skip
        for req, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "sparsed-dlm does not implement loglikelihood_rolling (perplexity tasks): a masked diffusion LM "
            "has no left-to-right token likelihood to roll over a document; use generate_until or "
            "loglikelihood (multiple-choice) tasks"
        )
