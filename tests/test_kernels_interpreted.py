"""The Triton decode kernels on the CPU, under Triton's interpreter: each check of
`interpreted_checks.py` in its own process with ``TRITON_INTERPRET=1`` (Triton reads it when a
kernel is defined), among them a Hypothesis property over shapes, padding, grids and splits
(keep = 100% is dense attention; a random selection is the gather's step), the whole-forward
graphs' computation, and LLaDA / Dream cache windows through the kernel. The CUDA tests
(`test_kernels.py`, `test_decode_graphs.py`, `test_kv_cache.py`) check the same kernels
compiled, on a GPU; these run everywhere the test extra is installed (it brings Triton), so a
change to a kernel is checked on every CI run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the test extra installs Triton; its interpreter runs the kernels on the CPU")

CHECKS = Path(__file__).with_name("interpreted_checks.py")


@pytest.mark.parametrize(
    "check",
    [
        "sparse_decode_equals_the_gather",
        "block_mass_kernel_is_dense_attention_and_its_mass",
        "dense_decode_is_dense_attention",
        "decode_kernels_property",
        "whole_forwards_with_the_kernels_decode_the_models_tokens",
        "a_kernel_window_gives_the_refreshs_rows",
        "cached_windows_through_the_kernel_equal_flex",
        "dense_cache_windows_through_the_kernel_decode_sdpas_tokens",
    ],
)
def test_kernel_under_the_interpreter(check):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(CHECKS), check], env=env, cwd=CHECKS.parent, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.strip().endswith(f"ok {check}")
