"""sparsed_backend.timing: what each method calls and records (never how fast anything is)."""

from __future__ import annotations

import math

import pytest
import torch

from sparsed_backend.timing import PeakMemory, StepTimer, kernel_ms, median_seconds, peak_mib, synced_seconds

CPU = torch.device("cpu")


def test_synced_seconds_returns_the_result():
    seconds, result = synced_seconds(lambda: 7, CPU)
    assert result == 7 and seconds >= 0.0


def test_median_seconds_discards_the_warmup_and_runs_hooks_outside_each_call():
    events = []
    median_seconds(lambda: events.append("call"), CPU, 3, warmup=2,
                   before=lambda: events.append("before"), after=lambda: events.append("after"))  # fmt: skip
    assert events == ["before", "call", "after"] * 5
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        median_seconds(lambda: None, CPU, 0)


def test_kernel_ms_off_cuda_calls_at_least_four_times():
    calls = []
    ms = kernel_ms(lambda: calls.append(1), CPU, rep_ms=0)
    assert len(calls) >= 4 and ms >= 0.0  # one discarded, at least three timed


def test_peak_memory_is_nan_off_cuda():
    assert math.isnan(peak_mib(lambda: torch.ones(1000), CPU))
    with PeakMemory(CPU) as peak:
        torch.ones(1000)
    assert math.isnan(peak.mib) and math.isnan(peak.total_mib)


def test_step_timer_records_kind_and_query_rows_until_removed():
    class Model(torch.nn.Module):
        def forward(self, input_ids, sparsed_state=None):
            return input_ids

    class State:
        mode = "sparse"

    model = Model()
    timer = StepTimer(model)
    model(torch.zeros(1, 5))
    model(input_ids=torch.zeros(1, 3), sparsed_state=State())
    timer.remove()
    model(torch.zeros(1, 4))
    assert [(kind, rows) for kind, rows, _ in timer.records] == [("dense", 5), ("sparse", 3)]
    assert timer.mean("sparse") == timer.records[1][2]
    assert math.isnan(timer.mean("switch"))
