"""K/V caching for block-wise diffusion sampling: Fast-dLLM's prefix and dual cache.

A semi-autoregressive sampler decodes one block of tokens at a time. At the first step of a
block (a *refresh*) the model runs on the whole sequence and every layer's K/V are kept. At the
block's other steps the model runs only on a *window* of positions:

- ``"prefix"``: the window is the current block and everything after it; the prompt and the
  finished blocks come from the cache.
- ``"dual"``: the window is the current block alone; the prompt, the finished blocks and the
  still-masked blocks after it all come from the cache.

With SparseD the switch step is a refresh too (block selection needs every query row), so the
sparse schedule is the one without a cache; the later windows use the selected blocks of
their rows. A window then starts at a multiple of the SparseD block size (a few finished
positions before the block are recomputed), so its query blocks are the selection's.

Inside a window the fresh K/V overwrite the cached ones in place, and attention reads the
cache over the whole sequence. The approximation: cached positions keep the K/V of the last
refresh although the tokens they attend to have changed since.

Why not transformers' Cache classes: ``DynamicCache`` appends by concatenation (a copy of the
whole prefix at every step and layer) and cannot put fresh K/V in the middle of the sequence,
which the dual cache needs; ``StaticCache`` writes at an append cursor kept on the device, and
moving that cursor back to the block start means writing its internals. A window rewritten in
place is the operation both kinds need, so this class offers exactly that, with the same
``update(key, value, layer_idx)`` call the attention modules of transformers models make.
"""

from __future__ import annotations

import torch

from .._validate import ArgumentValueError

__all__ = ["KV_CACHE_KINDS", "KV_CACHE_MODES", "BlockKVCache", "check_kv_cache", "window_attention_mask"]

KV_CACHE_KINDS = ("prefix", "dual")  # the values of every sampler's kv_cache argument
KV_CACHE_MODES = KV_CACHE_KINDS  # the earlier name, kept for imports; "mode" now means only the step kind


def check_kv_cache(kv_cache: object) -> str | None:
    """``kv_cache`` if it is None or one of KV_CACHE_KINDS; else a ValueError naming the choices."""
    if kv_cache is not None and kv_cache not in KV_CACHE_KINDS:
        raise ArgumentValueError("kv_cache", f"kv_cache must be None, 'prefix' or 'dual', got {kv_cache!r}")
    return kv_cache


class BlockKVCache:
    """Every layer's K/V over the whole sequence, refreshed by full forwards, reused in windows.

    The sampler calls :meth:`refresh` before a full forward and :meth:`set_window` before a
    forward on positions ``[start, stop)`` only; the model's attention modules call
    :meth:`update` with the K/V they computed.
    """

    def __init__(self, kind: str) -> None:
        if check_kv_cache(kind) is None:
            raise ValueError("BlockKVCache needs a kind, 'prefix' or 'dual', got None")
        self.kind = kind
        self.window: tuple[int, int] | None = None
        self.length: int | None = None  # sequence length of the last refresh
        self.refreshes = 0  # full forwards stored so far
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def refresh(self) -> None:
        """The next forward runs on the whole sequence; its K/V replace the cache."""
        self.window = None

    def set_window(self, start: int, stop: int) -> None:
        """The next forwards run on positions ``[start, stop)`` against the cached K/V."""
        if self.length is None:
            raise ValueError("set_window before any refresh: the first forward must run on the whole sequence")
        if not 0 <= start < stop <= self.length:
            raise ArgumentValueError(
                "window", f"window must satisfy 0 <= start < stop <= {self.length}, got [{start}, {stop})"
            )
        self.window = (start, stop)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (refresh) or splice in (window) one layer's K/V (B, Hkv, n, D); returns the
        layer's K/V over the whole sequence, (B, Hkv, S, D)."""
        if self.window is None:
            self._keys[layer_idx], self._values[layer_idx] = key, value
            self.length = key.shape[2]
            self.refreshes += layer_idx == 0
            return key, value
        start, stop = self.window
        if key.shape[2] != stop - start:
            raise ValueError(
                f"layer {layer_idx}: window [{start}, {stop}) but the forward gave {key.shape[2]} positions"
            )
        if layer_idx not in self._keys:
            raise ValueError(f"layer {layer_idx} has no cached K/V: the last refresh did not run it")
        keys, values = self._keys[layer_idx], self._values[layer_idx]
        keys[:, :, start:stop] = key
        values[:, :, start:stop] = value
        return keys, values

    def memory_bytes(self) -> int:
        """Device bytes held by the cached K/V."""
        return sum(t.numel() * t.element_size() for t in (*self._keys.values(), *self._values.values()))


def window_attention_mask(
    attention_mask: torch.Tensor | None, implementation: str, dtype: torch.dtype
) -> torch.Tensor | None:
    """The key padding mask of a windowed forward: queries are the window, keys the sequence.

    Args:
        attention_mask: (B, S) 1 for real tokens, 0 for padding, over the whole sequence; or None.
        implementation: the model's attention implementation.
    Returns:
        None without padding; (B, 1, 1, S) bool for "sdpa" and "sparsed"; (B, 1, 1, S) additive
        for "eager". Other implementations raise (their masks are built for square inputs).
    """
    if implementation not in ("sdpa", "sparsed", "eager"):
        raise NotImplementedError(
            f"kv_cache supports the 'sdpa', 'eager' and 'sparsed' attention implementations, got {implementation!r}"
        )
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"with kv_cache the attention_mask must be 2D (batch, seq), got {tuple(attention_mask.shape)}")
    keep = attention_mask.bool()[:, None, None, :]
    if implementation == "eager":
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    return keep
