"""RoPE scaling for both model ports: transformers' scaling types, checked once, and the positions they allow.

A checkpoint asks for a scaling in its ``config.json`` as transformers 4.x configs spell it,

    "rope_theta": 1000000.0,
    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}

(``"type"`` is accepted for ``"rope_type"``), or as transformers 5 writes it, one
``rope_parameters`` dict that holds ``rope_theta`` too. The config classes turn the second
spelling into the first, so a config they save reloads identically and still loads with the
official remote code.

Types: ``default`` (plain RoPE), ``linear``, ``dynamic`` (dynamic NTK), ``yarn``, ``longrope``.
The inverse frequencies and YaRN's / LongRoPE's attention factor come from transformers'
``ROPE_INIT_FUNCTIONS``; dynamic NTK and LongRoPE's long/short switch follow transformers'
``dynamic_rope_update`` on every full forward. This module checks a scaling dict (once, when a
config is built), hands it to those functions, and states how many positions a model may use
(`position_limit`).

About 400 lines: the one check of a scaling dict, the one position-limit rule and the rotary
module that uses them share the key tables above; split, the rules would drift apart.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._compat import ROPE_INIT_FUNCTIONS, dynamic_rope_update, rope_init_config

__all__ = [
    "ROPE_TYPES",
    "RotaryEmbedding",
    "check_rope_scaling",
    "original_positions",
    "parse_rope_scaling",
    "position_limit",
    "position_limit_note",
    "rope_parameters",
    "rope_scaling_from_parameters",
    "scaling_type",
    "with_rope_scaling",
]

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope")

# Fields of each type besides rope_type / type: (required, optional). Matches what transformers'
# init functions read; "original_max_position_embeddings" defaults to max_position_embeddings.
_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": (
        ("factor",),
        (
            "original_max_position_embeddings",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "truncate",
        ),
    ),
    "longrope": (("long_factor", "short_factor"), ("factor", "original_max_position_embeddings", "attention_factor")),
}
# Accepted with every type: the type's two spellings, and the two fields transformers 5 puts in
# the same dict (checked against the config: rope_theta must agree, the rotary share must be 1).
_COMMON = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
# Scaling types the flag can set: LongRoPE needs per-dimension factors a flag cannot carry.
FLAG_TYPES = ("linear", "dynamic", "yarn")


# ------------------------------------------------------------------------------- the dict


def scaling_type(scaling: object) -> str:
    """The type a ``rope_scaling`` dict names (``rope_type``, else ``type``); "default" for None
    or a dict that names none. Unchecked: see `check_rope_scaling`."""
    if not isinstance(scaling, dict):
        return "default"
    kind = scaling.get("rope_type", scaling.get("type"))
    return "default" if kind is None else kind


def _number(name: str, key: str, value: object, kind: str, minimum: float, *, open_low: bool = False) -> None:
    """TypeError / ValueError unless ``value`` is a finite real number >= minimum (> with open_low)."""
    bound = f"> {minimum}" if open_low else f">= {minimum}"
    where = f"{name}[{key!r}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} must be a number {bound} for rope_type {kind!r}, got {value!r}")
    if not math.isfinite(value) or value < minimum or (open_low and value == minimum):
        raise ValueError(f"{where} must be a number {bound} for rope_type {kind!r}, got {value!r}")


def check_rope_scaling(config) -> None:
    """Check ``config.rope_scaling`` against ``config``; TypeError / ValueError naming the field,
    what was expected and what was received.

    A type transformers knows but this module does not implement (``llama3``, ...) passes here:
    the model refuses it when built (`check_supported`), as for every unimplemented setting.

    Args:
        config: a LLaDA or Dream config (``rope_scaling``, ``rope_theta``, ``hidden_size``,
            ``num_attention_heads``, ``original_max_position_embeddings`` when it has one).
    """
    name, scaling = "rope_scaling", config.rope_scaling
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise TypeError(f"{name} must be a dict or None, got {type(scaling).__name__} ({scaling!r})")
    if "rope_type" in scaling and "type" in scaling and scaling["rope_type"] != scaling["type"]:
        raise ValueError(
            f"{name}['rope_type'] and {name}['type'] must name the same type, got {scaling['rope_type']!r} and "
            f"{scaling['type']!r}"
        )
    if "rope_type" not in scaling and "type" not in scaling:
        raise ValueError(f"{name} must name its type in 'rope_type' (or 'type'), one of {ROPE_TYPES}, got {scaling!r}")
    kind = scaling_type(scaling)
    if kind not in ROPE_TYPES:
        if isinstance(kind, str) and kind in ROPE_INIT_FUNCTIONS:
            return  # known to transformers, not implemented here: check_supported says so
        raise ValueError(f"{name}['rope_type'] must be one of {ROPE_TYPES}, got {kind!r}")
    required, optional = _FIELDS[kind]
    missing = [key for key in required if key not in scaling]
    if missing:
        raise ValueError(f"{name} must hold {missing[0]!r} for rope_type {kind!r}, got {scaling!r}")
    unknown = sorted(set(scaling) - set(required) - set(optional) - set(_COMMON))
    if unknown:
        accepted = sorted({*required, *optional, "rope_type"})
        raise ValueError(f"{name} for rope_type {kind!r} accepts the fields {accepted}, got {unknown[0]!r}")

    theta = scaling.get("rope_theta", config.rope_theta)
    if theta != config.rope_theta:
        raise ValueError(f"{name}['rope_theta'] must equal rope_theta={config.rope_theta!r}, got {theta!r}")
    share = scaling.get("partial_rotary_factor", 1.0)
    if isinstance(share, bool) or share != 1:
        raise ValueError(f"{name}['partial_rotary_factor'] must be 1.0 (the ports rotate whole heads), got {share!r}")
    if "factor" in scaling:
        _number(name, "factor", scaling["factor"], kind, 1.0)
    _check_original(config, name, kind)
    for key in ("attention_factor", "beta_fast", "beta_slow"):
        if scaling.get(key) is not None:
            _number(name, key, scaling[key], kind, 0.0, open_low=True)
    for key in ("mscale", "mscale_all_dim"):
        if scaling.get(key) is not None:
            _number(name, key, scaling[key], kind, 0.0)
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1  # transformers' defaults
    if fast <= slow:
        raise ValueError(f"{name}['beta_fast'] must be greater than beta_slow={slow!r}, got {fast!r}")
    if "truncate" in scaling and not isinstance(scaling["truncate"], bool):
        raise TypeError(f"{name}['truncate'] must be a bool for rope_type {kind!r}, got {scaling['truncate']!r}")
    head_dim = config.hidden_size // config.num_attention_heads
    for key in ("long_factor", "short_factor"):
        if key in scaling:
            _check_factors(name, key, scaling[key], head_dim // 2)


def _check_original(config, name: str, kind: str) -> None:
    scaling = config.rope_scaling
    key = "original_max_position_embeddings"
    value = scaling.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}[{key!r}] must be an int >= 1 for rope_type {kind!r}, got {value!r}")
    top = getattr(config, key, None)  # Phi-3 puts it next to max_position_embeddings
    if top is not None and value is not None and top != value:
        raise ValueError(f"{name}[{key!r}] must equal the config's {key}={top!r}, got {value!r}")


def _check_factors(name: str, key: str, value: object, length: int) -> None:
    where = f"{name}[{key!r}]"
    expected = f"a list of {length} numbers > 0 (head_dim / 2) for rope_type 'longrope'"
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{where} must be {expected}, got {type(value).__name__} ({value!r})")
    if len(value) != length:
        raise ValueError(f"{where} must be {expected}, got {len(value)} numbers")
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf]
    if bad:
        raise ValueError(f"{where} must be {expected}, got {bad[0]!r} among them")


def rope_scaling_from_parameters(
    rope_parameters: object, rope_scaling: dict | None
) -> tuple[float | None, dict | None]:
    """A transformers 5 ``rope_parameters`` dict as (rope_theta, rope_scaling) in the checkpoints'
    spelling; rope_theta is None when the dict holds none. ValueError when ``rope_scaling`` is
    also given and differs."""
    if not isinstance(rope_parameters, dict):
        raise TypeError(f"rope_parameters must be a dict, got {type(rope_parameters).__name__} ({rope_parameters!r})")
    theta = rope_parameters.get("rope_theta")
    rest = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    if rest.get("partial_rotary_factor") == 1:
        rest.pop("partial_rotary_factor")
    scaling = None if set(rest) <= {"rope_type", "type"} and scaling_type(rest) == "default" else rest
    if rope_scaling is not None and scaling is not None and rope_scaling != scaling:
        raise ValueError(
            f"rope_scaling and rope_parameters must not disagree, got rope_scaling={rope_scaling!r} and "
            f"rope_parameters={rope_parameters!r}"
        )
    return theta, scaling if scaling is not None else rope_scaling


def original_positions(config) -> int | None:
    """The context length the model was trained on: the scaling's
    ``original_max_position_embeddings`` (or the config's own field of that name, as Phi-3
    writes it), else ``max_position_embeddings`` (transformers' convention for every type)."""
    scaling = getattr(config, "rope_scaling", None)
    value = scaling.get("original_max_position_embeddings") if isinstance(scaling, dict) else None
    if value is None:
        value = getattr(config, "original_max_position_embeddings", None)
    if value is None:
        value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def rope_parameters(config) -> dict:
    """``config``'s RoPE as transformers 5's ``rope_parameters``: what the init functions read."""
    scaling = config.rope_scaling or {}
    kind = scaling_type(scaling)
    params = {k: v for k, v in scaling.items() if k not in _COMMON}
    params.update(rope_type=kind, rope_theta=float(config.rope_theta))
    if kind in ("yarn", "longrope"):
        params["original_max_position_embeddings"] = original_positions(config)
    return params


# --------------------------------------------------------------------------- the position limit


def _scaled(config) -> tuple[str, float | None, int | None, int | None]:
    """(type, factor, original length, stated max_position_embeddings) of any config."""
    scaling = getattr(config, "rope_scaling", None)
    kind = scaling_type(scaling)
    factor = scaling.get("factor") if isinstance(scaling, dict) else None
    stated = getattr(config, "max_position_embeddings", None)
    stated = stated if isinstance(stated, int) and not isinstance(stated, bool) else None
    if kind not in ROPE_TYPES[1:] or not isinstance(factor, (int, float)) or isinstance(factor, bool):
        factor = None
    return kind, factor, original_positions(config), stated


def position_limit(config) -> int | None:
    """The positions a model may use (prompt plus generated tokens); None when the config states none.

    The rule: ``max_position_embeddings`` as the config states it, except when a RoPE scaling
    with a factor is on and ``max_position_embeddings`` still equals the original (trained)
    length; then the original length x factor. Why: YaRN and LongRoPE checkpoints usually raise
    ``max_position_embeddings`` themselves (Phi-3: 131072 over 4096 original), and then that
    stated window is what their authors validated; a config whose maximum is still the trained
    length (a scaling added to config.json by hand, as Qwen2.5's card says to, or by
    ``sparsed generate --rope-scaling``) would otherwise forbid every position the scaling was
    added for. Linear and dynamic scalings carry no original length: transformers treats
    ``max_position_embeddings`` as the original there, and so does this rule.
    """
    kind, factor, original, stated = _scaled(config)
    if stated is None:
        return None
    if factor is None or original != stated:
        return stated
    return int(original * factor)


def position_limit_note(config) -> str:
    """How `position_limit` came out, for error messages (no field names: the CLI prints it)."""
    kind, factor, original, stated = _scaled(config)
    if kind == "default":
        return "no RoPE scaling"
    if factor is None or original != stated:
        return f"as the config states, with {kind} RoPE scaling over {original:,} original positions"
    return f"{original:,} original positions x {kind} RoPE scaling factor {factor:g}"


# ------------------------------------------------------------------------- runtime overrides


def parse_rope_scaling(value: str) -> dict | None:
    """``TYPE:FACTOR`` (``yarn:4``, ``linear:2``, ``dynamic:2``) or ``none`` as a scaling dict (None
    for none), for `with_rope_scaling`.

    Raises ValueError whose message is what was expected; the caller adds the flag's name and
    the value it got (``--rope-scaling must be <message>, got 'x'``).
    """
    text = str(value).strip().lower()
    if text in ("none", "default"):
        return None
    expected = "none or TYPE:FACTOR with TYPE linear, dynamic or yarn and FACTOR a number >= 1 (e.g. yarn:4)"
    kind, sep, factor_text = text.partition(":")
    if kind == "longrope":
        raise ValueError(
            "TYPE:FACTOR with TYPE linear, dynamic or yarn (longrope takes per-dimension factors, which only a "
            "config.json can give)"
        )
    if not sep or kind not in FLAG_TYPES:
        raise ValueError(expected)
    try:
        factor = float(factor_text)
    except ValueError:
        raise ValueError(expected) from None
    if not math.isfinite(factor) or factor < 1:
        raise ValueError(expected)
    return {"rope_type": kind, "factor": int(factor) if factor.is_integer() else factor}


def with_rope_scaling(config, scaling: dict | None):
    """A copy of ``config`` whose RoPE scaling is ``scaling`` instead of the checkpoint's (None: plain RoPE).

    The new scaling starts from the original (trained) length, `original_positions`: it becomes
    ``max_position_embeddings`` (and YaRN's ``original_max_position_embeddings``), so by
    `position_limit` the model may then use original x factor positions (plain RoPE: the
    original length). The copy is built from ``config.to_dict()``, so the config class checks
    it as it checks a loaded one.
    """
    original = original_positions(config)
    values = config.to_dict()
    values.pop("original_max_position_embeddings", None)  # a top-level one is folded in below
    if original is not None:
        values[config.attribute_map.get("max_position_embeddings", "max_position_embeddings")] = original
    if scaling is not None:
        scaling = dict(scaling)
        if scaling_type(scaling) in ("yarn", "longrope") and original is not None:
            scaling["original_max_position_embeddings"] = original
    values["rope_scaling"] = scaling
    return type(config).from_dict(values)


# ---------------------------------------------------------------------------- the module


class RotaryEmbedding(nn.Module):
    """cos/sin (B, L, D) for the given positions, in the rotate-half layout, from transformers'
    RoPE init functions.

    Follows transformers' rotary modules, so that its machinery applies unchanged: non-persistent
    ``inv_freq`` / ``original_inv_freq`` buffers (transformers' ``_init_weights`` fills them when
    a checkpoint is loaded on the meta device), ``rope_type``, ``attention_scaling`` (YaRN and
    LongRoPE multiply cos and sin by it), and a forward under ``dynamic_rope_update``. Its
    ``config`` is a bare one built for the init functions (`rope_init_config`), not the model's.

    Two changes: the buffers stay float32 when the model is cast (``model.to(torch.bfloat16)``
    would otherwise round the frequencies, and RoPE angles grow with the position), and `frozen`
    gives cos/sin without the dynamic update, for cached windows (below).
    """

    output_in_input_dtype = False  # subclasses: cos/sin in x.dtype (Dream) or float32 (LLaDA)

    def __init__(self, config) -> None:
        super().__init__()
        params = rope_parameters(config)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rope_type = params["rope_type"]
        self.config = rope_init_config(params, head_dim, config.max_position_embeddings)
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        init_fn = (
            self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
        inv_freq, self.attention_scaling = init_fn(self.config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, seq_len=None) -> tuple[torch.Tensor, float]:
        """Plain RoPE: ``1 / theta ** (2i / D)``, float32 (D/2,), attention factor 1.0. The name
        and signature are those transformers' ``_init_weights`` looks for."""
        theta = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32)
        return 1.0 / (theta ** (exponent / dim)), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, hidden) (its device and dtype only), position_ids (B, L) -> cos, sin (B, L, D).

        Dynamic NTK recomputes the frequencies from ``max(position_ids) + 1`` first (grown past
        the longest length seen, reset below the original one); LongRoPE picks its long or short
        factors the same way."""
        return self.frozen(x, position_ids)

    @torch.no_grad()
    def frozen(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin with the current frequencies, no dynamic update. A cached window
        (``kv_cache.window``) runs on a slice of the positions, so its ``max(position_ids)`` is not
        the sequence's; its queries must use the frequencies the cached keys got at the refresh."""
        device = position_ids.device
        with torch.autocast(device_type=device.type, enabled=False):
            inv_freq = self.inv_freq.to(device=device, dtype=torch.float32)
            freqs = position_ids[..., None].float() * inv_freq  # (B, L, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, L, D)
            cos, sin = emb.cos(), emb.sin()
            if self.attention_scaling != 1.0:
                cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        if self.output_in_input_dtype:
            return cos.to(x.dtype), sin.to(x.dtype)
        return cos, sin

    def _apply(self, fn, recurse: bool = True):
        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.dtype == torch.float32 and out.is_floating_point() and out.dtype != torch.float32:
                # a cast: keep the float32 values, follow only the device (meta holds no values)
                return out.float() if t.is_meta else t.to(out.device)
            return out

        return super()._apply(keep_float32, recurse)
