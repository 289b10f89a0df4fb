"""A preallocated K/V cache for block diffusion (SDAR): the committed prefix, written in place.

A block-diffusion sampler keeps the K/V of the prompt and of every finished block, and runs
the model on one block at a time against them. Two kinds of forward:

- *commit* (the prompt's prefill, and each block once it holds no mask): the forward's K/V are
  written at the current length and the length advances past them;
- *denoise* (each denoising step of the current block): the K/V are written just after the
  committed prefix, in scratch space the next commit overwrites, and the length stays.

Either way the attention reads a view of the prefix and the new positions, so no step copies
the cache (``DynamicCache`` concatenates the whole prefix at every call and layer; SDAR's own
sampler does the same with ``torch.cat`` at every denoising step).

transformers API used (checked on 5.25 with Qwen3; not yet run on 5.17): the attention modules
call ``cache.update(key_states, value_states, layer_idx, ...)`` with (B, Hkv, n, D) tensors and
use the (K, V) it returns (5.25 passes ``kwargs=...``; 4.52 passed ``cache_kwargs``
positionally; both are accepted and ignored). 5.25's models take the cache as ``cache=`` and
still accept ``past_key_values=`` (the older name) with a deprecation warning until 5.40;
``cache_keyword`` picks the name a model's forward has. Given a 4D attention mask (returned
as-is by ``masking_utils``) and explicit ``position_ids``, Qwen3 asks the cache nothing else, so
this is a plain object, not a ``transformers.Cache`` subclass (whose bookkeeping assumes
append-only layers).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .._validate import ArgumentTypeError, ArgumentValueError, check_int

__all__ = ["BlockDiffusionKVCache", "cache_keyword"]

FORWARD_KINDS = ("commit", "denoise")  # what `prepare` announces
CACHE_MODES = FORWARD_KINDS  # the earlier name, kept for imports; "mode" now means only the step kind


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` takes a cache: "cache" (transformers >= 5.2x) or
    "past_key_values" (earlier)."""
    params = inspect.signature(model.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(f"{type(model).__name__}.forward takes neither 'cache' nor 'past_key_values'")


class BlockDiffusionKVCache:
    """Every layer's K/V for ``max_length`` positions, allocated once.

    Args:
        num_layers: decoder layers (``config.num_hidden_layers``).
        batch_size, num_kv_heads, max_length, head_dim: the capacity, (B, Hkv, T, D) per layer.
        dtype, device: of the K/V the model computes.

    Attributes:
        keys, values: (L, B, Hkv, T, D) the storage; its data pointer never changes.
        length: committed positions (the prompt's prefill and the finished blocks).
        commits, denoises: forwards of each kind run so far.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_length: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_layers = check_int("num_layers", num_layers, 1)
        check_int("batch_size", batch_size, 1)
        check_int("num_kv_heads", num_kv_heads, 1)
        self.max_length = check_int("max_length", max_length, 1)
        check_int("head_dim", head_dim, 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ArgumentTypeError("dtype", f"dtype must be a floating torch.dtype, got {dtype!r}")
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)  # (L, B, Hkv, T, D)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.commits = 0
        self.denoises = 0
        self._forward: str | None = None
        self._new = 0  # positions the prepared forward writes

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_length: int) -> BlockDiffusionKVCache:
        """A cache sized from ``model.config`` (layers, kv heads, head_dim) and the model's first
        parameter (dtype, device)."""
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        param = next(model.parameters())
        return cls(
            config.num_hidden_layers,
            batch_size,
            kv_heads,
            max_length,
            head_dim,
            dtype=param.dtype,
            device=param.device,
        )

    def prepare(self, forward: str, new_positions: int) -> None:
        """Announce the next forward: ``forward`` "commit" or "denoise", over ``new_positions``
        positions written at ``[length, length + new_positions)``.

        Raises ValueError before the model runs if those positions pass ``max_length``.
        """
        if forward not in FORWARD_KINDS:
            raise ArgumentValueError("forward", f"forward must be 'commit' or 'denoise', got {forward!r}")
        check_int("new_positions", new_positions, 1)
        if self.length + new_positions > self.max_length:
            raise ArgumentValueError(
                "max_length",
                f"the cache holds max_length={self.max_length} positions: {self.length} committed + "
                f"{new_positions} new would need {self.length + new_positions}; build it with a larger max_length",
            )
        self._forward, self._new = forward, new_positions

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new K/V (B, Hkv, n, D) after the committed prefix; return the views
        (B, Hkv, length + n, D) of prefix and new positions. After the last layer of a commit,
        ``length`` advances by n."""
        if self._forward is None:
            raise RuntimeError("BlockDiffusionKVCache.update before prepare(forward, new_positions): nothing announced")
        start, stop = self.length, self.length + self._new
        if key_states.shape[2] != self._new:
            raise ValueError(
                f"layer {layer_idx}: prepare announced {self._new} new positions, "
                f"the forward gave {key_states.shape[2]}"
            )
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:, :, start:stop] = key_states
        values[:, :, start:stop] = value_states
        if layer_idx == self.num_layers - 1:
            self.written()
        return keys[:, :, :stop], values[:, :, :stop]

    def written(self) -> None:
        """Close the prepared forward, whose K/V are now at ``[length, length + n)``: a commit
        advances ``length``. `update` calls it after the last layer; a captured CUDA graph that
        wrote every layer itself (`decode_graphs`) calls it after its replay."""
        if self._forward is None:
            raise RuntimeError("BlockDiffusionKVCache.written before prepare(forward, new_positions)")
        if self._forward == "commit":
            self.length, self.commits = self.length + self._new, self.commits + 1
        else:
            self.denoises += 1
        self._forward = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Committed positions (transformers' name)."""
        return self.length

    def memory_bytes(self) -> int:
        """Bytes held by the preallocated K/V."""
        return 2 * self.keys.numel() * self.keys.element_size()
