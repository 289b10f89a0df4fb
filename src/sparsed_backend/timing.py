"""How every time and memory number of the benchmarks and the ``sparsed`` CLI is measured.

One home for the methods, so that two tables never time the same thing two ways:

- `synced_seconds`: one call of ``fn``, the device synchronised before and after, wall clock
  (``time.perf_counter``) in between. The primitive under everything below but `kernel_ms`.
- `median_seconds`: the median of ``repeats`` such calls after ``warmup`` discarded ones (the
  compile and autotune pass). A whole model forward or a whole switch step: times of 10 ms to
  minutes, where a few calls suffice and CUDA graphs or L2 flushing would change what is timed.
- `kernel_ms`: one kernel call of well under a second, many times. On CUDA Triton's
  ``do_bench`` (median, L2 cache flushed between calls, warm-up by time); elsewhere the median
  of per-call wall times over ``rep_ms`` (at least 3 calls) after one discarded call.
- `PeakMemory` / `peak_mib`: the peak of ``torch.cuda.max_memory_allocated`` while the block
  runs, above what was allocated when it began (``mib``) or in all (``total_mib``, weights
  included); NaN off CUDA.
- `StepTimer`: forward hooks that time every forward of a model inside a real sampler run,
  each synchronised like `synced_seconds`, grouped by SparseD step kind and query rows.

Which method each number in ``benchmarks/results`` comes from:

- ``bench_attention*``: ``ms`` (and the TFLOP/s derived from it) `kernel_ms`; ``peak_mib``
  `peak_mib`.
- ``bench_shapes``: ``step_ms`` `kernel_ms`; ``first_call_s`` one `synced_seconds` call
  (compilation included).
- ``bench_e2e*``: every ``*_s`` step time `median_seconds` (one warm-up call discarded);
  totals are those medians weighed by the schedule; ``*_peak_mib`` `PeakMemory.mib`.
- ``bench_tp*``: step times `median_seconds` with a barrier before every call, the slowest
  rank's median reported; ``peak_gib`` `PeakMemory.total_mib` (weights included).
- ``bench_cache*``: the ``projected`` rows as bench_e2e; the ``run`` rows' ``total_s`` and
  ``step_kinds`` from `StepTimer` records (a kind's first forward replaced, see the script),
  ``wall_s`` the whole sampler call timed like `synced_seconds`; ``peak_mib`` `PeakMemory.mib`.
- ``bench_switch_memory*``: ``seconds`` one `synced_seconds` call after one discarded call;
  ``peak_mib`` `PeakMemory.mib`.
- ``bench_blockdiff*``: the ``attention`` rows' ``ms`` `kernel_ms`; the ``e2e`` rows' ``seconds``
  one `synced_seconds` call after a short warm-up generation, ``peak_mib`` `PeakMemory.mib`.
- ``eval_mixed*``, ``fidelity*``, ``long_context*``: ``seconds`` / ``wall_s`` are the wall time
  of a whole evaluation (its answers are copied to the host, which synchronises), not a timing
  method of this module.

``sparsed bench`` uses `median_seconds`; ``sparsed demo`` reports `StepTimer` means.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["PeakMemory", "StepTimer", "kernel_ms", "median_seconds", "peak_mib", "sync", "synced_seconds"]


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced_seconds(fn: Callable[[], Any], device: torch.device | str) -> tuple[float, Any]:
    """(wall seconds, result) of one call of ``fn``, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def median_seconds(
    fn: Callable[[], Any],
    device: torch.device | str,
    repeats: int,
    *,
    warmup: int = 0,
    before: Callable[[], Any] | None = None,
    after: Callable[[], Any] | None = None,
) -> float:
    """Median wall seconds of ``repeats`` synchronised calls of ``fn``, after ``warmup`` discarded ones.

    ``before`` runs ahead of every call (warm-up included) and ``after`` behind it, both outside
    the clock: a barrier between ranks, a progress bar.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        seconds, _ = synced_seconds(fn, device)
        if i >= warmup:
            times.append(seconds)
        if after is not None:
            after()
    return statistics.median(times)


def kernel_ms(fn: Callable[[], Any], device: torch.device | str, warmup_ms: float = 50, rep_ms: float = 300) -> float:
    """Median milliseconds of one call of a short kernel ``fn``; warm-up discarded, device synced.

    CUDA: ``triton.testing.do_bench`` (L2 flushed between calls). Elsewhere: one discarded call,
    then per-call wall times for ``rep_ms`` and at least 3 calls.
    """
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    t_end = time.perf_counter() + rep_ms / 1000
    while time.perf_counter() < t_end or len(times) < 3:
        seconds, _ = synced_seconds(fn, device)
        times.append(seconds * 1000)
    return statistics.median(times)


class PeakMemory:
    """Peak CUDA memory allocated inside a ``with`` block; NaN off CUDA.

    ``mib``: above what was allocated when the block began; ``total_mib``: in all. The device is
    synchronised on entry and exit, and the peak counter reset on entry.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.mib = math.nan
        self.total_mib = math.nan
        self._base = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.mib, self.total_mib = (peak - self._base) / 2**20, peak / 2**20


def peak_mib(fn: Callable[[], Any], device: torch.device | str) -> float:
    """Peak device memory (MiB) allocated while ``fn()`` runs, above what was allocated before."""
    with PeakMemory(device) as peak:
        fn()
    return peak.mib


class StepTimer:
    """Forward hooks that record every model forward as (SparseD step kind, query rows, seconds).

    The step kind is the ``sparsed_state``'s ``mode`` ("dense", "switch", "sparse"), or a block-
    diffusion forward's ``prefix_state`` mode ("dense", "score", "sparse"), "dense" without a
    state. On CUDA each forward is synchronised before and after, so the time is the
    forward's own, not its launch's. ``sparsed demo`` reports the mean per kind;
    benchmarks/bench_cache.py groups the records by kind and query rows (a cached step runs
    fewer rows). Call `remove` when done.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.records: list[tuple[str, int, float]] = []
        self._t0 = 0.0
        self._key = ("dense", 0)
        self._x: torch.Tensor | None = None
        self._hooks = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, with_kwargs=True),
        ]

    @staticmethod
    def _inputs(args, kwargs) -> torch.Tensor | None:
        for name in ("input_ids", "inputs_embeds"):
            if kwargs.get(name) is not None:
                return kwargs[name]
        return args[0] if args and isinstance(args[0], torch.Tensor) else None

    def _pre(self, module, args, kwargs) -> None:
        state = kwargs.get("sparsed_state")
        if state is None:
            state = kwargs.get("prefix_state")
        x = self._inputs(args, kwargs)
        self._key = ("dense" if state is None else state.mode, 0 if x is None else x.shape[1])
        self._x = x
        if x is not None:
            sync(x.device)
        self._t0 = time.perf_counter()

    def _post(self, module, args, kwargs, output) -> None:
        if self._x is not None:
            sync(self._x.device)
        self.records.append((*self._key, time.perf_counter() - self._t0))

    def mean(self, kind: str) -> float:
        """Mean seconds of the forwards of one step kind; NaN when none ran."""
        times = [t for k, _, t in self.records if k == kind]
        return sum(times) / len(times) if times else math.nan

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
