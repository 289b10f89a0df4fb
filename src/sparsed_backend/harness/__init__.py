"""lm-evaluation-harness support: the ``sparsed-dlm`` model, the ``sparsed-eval`` command and the
retrieval tasks.

- `sparsed_backend.harness.model`: ``DiffusionLM``, an lm-eval model for LLaDA and Dream
  checkpoints, dense or with SparseD (importing it registers it as ``sparsed-dlm``);
- `sparsed_backend.harness.likelihood`: the Monte Carlo masked log-likelihood estimate;
- `sparsed_backend.harness.task_data`: the shipped retrieval tasks' data (JSONL) and its generator;
- `sparsed_backend.harness.cli`: ``sparsed-eval``, lm-eval's CLI with our model and tasks.

Only ``model`` and ``cli`` import lm_eval (``pip install -e ".[eval]"`` from a clone); this
package's ``__init__`` does not, and ``import sparsed_backend`` never imports this package.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MODEL_NAME", "tasks_dir"]

MODEL_NAME = "sparsed-dlm"


def tasks_dir() -> Path:
    """Directory of the lm-eval task YAMLs shipped with the package (for ``--include_path``)."""
    return Path(__file__).resolve().parent / "tasks"
