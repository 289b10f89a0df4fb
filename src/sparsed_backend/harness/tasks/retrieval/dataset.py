"""Loader that lm-eval imports by file path (``custom_dataset: !function dataset.load``).

It delegates to `sparsed_backend.harness.task_data`, which finds the JSONL files from its own
``__file__``, so the task works from any working directory.
"""

from sparsed_backend.harness.task_data import retrieval_dataset


def load(prompt_tokens: int | str, **metadata) -> dict:
    return retrieval_dataset(prompt_tokens, **metadata)
