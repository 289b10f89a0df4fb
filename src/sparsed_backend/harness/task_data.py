"""The retrieval tasks' data for lm-eval: generated from `demo.task`, shipped as JSONL.

    python -m sparsed_backend.harness.task_data            # rewrite the shipped files
    python -m sparsed_backend.harness.task_data --check    # verify them against a fresh draw

Two kinds of split, all drawn on the CPU:

- one length ``n`` in `LENGTHS` (tasks ``sparsed_retrieval_<n>``): ``DOCS_PER_LENGTH`` prompts
  of ``n`` tokens, ``sample_prompts(n, DOCS_PER_LENGTH, seed=SEED_BASE + n)``;
- ``"mixed"`` (task ``sparsed_retrieval_mixed``): ``MIXED_DOCS`` prompts whose lengths are
  drawn uniformly from ``MIXED_RANGE`` (both ends included) without replacement, so every length
  differs and a batch of them shares no shape; the lengths come from a generator seeded with
  ``MIXED_SEED`` and prompt ``i`` is ``sample_prompts(length_i, 1, seed=MIXED_SEED + 1 + i)``.
  It exists to measure what varied lengths cost (recompilation, padding), which the fixed-length
  splits cannot show.

Seeds in use elsewhere, kept apart: training drew its data from CUDA generators, its final
evaluation used 5000 + n and the fidelity benchmark 9000 + n; the fixed-length splits use
SEED_BASE + n = 21024, 22048, 24096; the mixed split uses MIXED_SEED = 30000 to 30300.

A document is one prompt as text: one character per token (the demo tokenizer maps each
character to one id), without the leading BOS, which the tokenizer adds when it encodes the
prompt. ``prompt_tokens`` is its length in tokens, BOS included; ``answer`` is the 5 value
characters the model must generate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..demo.task import QUESTION_ID, RetrievalPrompts, sample_prompts
from ..demo.tokenizer import CHARACTERS

__all__ = [
    "DOCS_PER_LENGTH", "LENGTHS", "MIXED", "MIXED_DOCS", "MIXED_RANGE", "MIXED_SEED", "SEED_BASE", "SPLITS",
    "data_file", "load_docs", "make_docs", "mixed_lengths", "retrieval_dataset",
]  # fmt: skip

LENGTHS = (1024, 2048, 4096)
DOCS_PER_LENGTH = 100
SEED_BASE = 20000

MIXED = "mixed"
MIXED_DOCS = 300
MIXED_RANGE = (1024, 4096)
MIXED_SEED = 30000

SPLITS = (*LENGTHS, MIXED)

_DATA_DIR = Path(__file__).resolve().parent / "tasks" / "retrieval" / "data"


def _check_split(split: object) -> int | str:
    # An int length (not a bool, not a float that would name another file) or the mixed split.
    if (isinstance(split, int) and not isinstance(split, bool) and split in LENGTHS) or split == MIXED:
        return split
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _text(ids: list[int]) -> str:
    # Characters start at the question mark's id (the special tokens come first).
    return "".join(CHARACTERS[i - QUESTION_ID] for i in ids)


def _doc(doc_id: int, prompts: RetrievalPrompts, row: int) -> dict:
    ids = prompts.input_ids[row].tolist()
    return {
        "doc_id": doc_id,
        "prompt_tokens": len(ids),
        "prompt": _text(ids[1:]),  # BOS is added by the tokenizer
        "answer": _text(prompts.answers[row].tolist()),
        "record_pos": int(prompts.record_pos[row]),
    }


def mixed_lengths() -> list[int]:
    """The mixed split's prompt lengths, in document order: ``MIXED_DOCS`` distinct values drawn
    uniformly from ``MIXED_RANGE`` (a prefix of a seeded random permutation of the range)."""
    low, high = MIXED_RANGE
    g = torch.Generator().manual_seed(MIXED_SEED)
    return (torch.randperm(high - low + 1, generator=g)[:MIXED_DOCS] + low).tolist()


def make_docs(split: int | str) -> list[dict]:
    """The documents of ``split`` (a length of `LENGTHS`, or ``"mixed"``), deterministic.

    A fixed-length split is one draw of the whole batch (a smaller batch from the same seed
    gives other prompts); the mixed split draws each prompt from its own seed."""
    split = _check_split(split)
    if split == MIXED:
        return [_doc(i, sample_prompts(n, 1, seed=MIXED_SEED + 1 + i), 0) for i, n in enumerate(mixed_lengths())]
    prompts = sample_prompts(split, DOCS_PER_LENGTH, seed=SEED_BASE + split)
    return [_doc(i, prompts, i) for i in range(DOCS_PER_LENGTH)]


def data_file(split: int | str) -> Path:
    """Path of the shipped JSONL of ``split`` (built on this file's location)."""
    return _DATA_DIR / f"retrieval_{_check_split(split)}.jsonl"


def load_docs(split: int | str) -> list[dict]:
    """The shipped documents of ``split`` (a length of `LENGTHS`, or ``"mixed"``)."""
    path = data_file(split)
    if not path.is_file():
        raise FileNotFoundError(
            f"the retrieval task data is missing at {path}; reinstall sparsed_backend (package data) or "
            "run python -m sparsed_backend.harness.task_data"
        )
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def retrieval_dataset(prompt_tokens: int | str, **_metadata) -> dict:
    """lm-eval ``custom_dataset`` hook: ``{"test": Dataset}`` of one split, built in memory.

    ``prompt_tokens`` is the task YAML's ``dataset_kwargs`` entry: a length of `LENGTHS`, or
    ``"mixed"``. ``Dataset.from_list`` keeps the rows in memory, so nothing is written under
    ``$HF_HOME`` (``load_dataset("json", ...)`` would write an Arrow cache there). lm-eval also
    passes the task's metadata and model args as keywords; they do not change the data.
    """
    import datasets

    return {"test": datasets.Dataset.from_list(load_docs(prompt_tokens))}


def _write(split: int | str) -> Path:
    path = data_file(split)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(doc, ensure_ascii=False) for doc in make_docs(split)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare the shipped files with a fresh draw")
    args = p.parse_args(argv)
    bad = 0
    for split in SPLITS:
        if args.check:
            same = load_docs(split) == make_docs(split)
            bad += not same
            print(f"{data_file(split)}: {'matches' if same else 'DIFFERS from'} a fresh draw")
        else:
            print(f"wrote {_write(split)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
