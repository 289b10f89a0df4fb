"""The retrieval task's data for lm-eval: generated from `demo.task`, shipped as JSONL.

    python -m sparsed_backend.harness.task_data            # rewrite the shipped files
    python -m sparsed_backend.harness.task_data --check    # verify them against a fresh draw

Prompts of ``n`` tokens are ``sample_prompts(n, DOCS_PER_LENGTH, seed=SEED_BASE + n)`` on the CPU.
Training drew its data from CUDA generators; its final evaluation used seeds 5000 + n and the
fidelity benchmark 9000 + n. SEED_BASE = 20000 keeps this task's prompts apart from those.

A document is one prompt as text: one character per token (the demo tokenizer maps each
character to one id), without the leading BOS, which the tokenizer adds when it encodes the
prompt. ``answer`` is the 5 value characters the model must generate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..demo.task import QUESTION_ID, sample_prompts
from ..demo.tokenizer import CHARACTERS

__all__ = ["DOCS_PER_LENGTH", "LENGTHS", "SEED_BASE", "data_file", "load_docs", "make_docs", "retrieval_dataset"]

LENGTHS = (1024, 2048, 4096)
DOCS_PER_LENGTH = 100
SEED_BASE = 20000

_DATA_DIR = Path(__file__).resolve().parent / "tasks" / "retrieval" / "data"


def _text(ids: list[int]) -> str:
    # Characters start at the question mark's id (the special tokens come first).
    return "".join(CHARACTERS[i - QUESTION_ID] for i in ids)


def make_docs(length: int) -> list[dict]:
    """The ``DOCS_PER_LENGTH`` documents of the ``length``-token split (deterministic; one draw
    of the whole batch: a smaller batch from the same seed gives other prompts)."""
    if length not in LENGTHS:
        raise ValueError(f"length must be one of {LENGTHS}, got {length!r}")
    prompts = sample_prompts(length, DOCS_PER_LENGTH, seed=SEED_BASE + length)
    docs = []
    for i in range(DOCS_PER_LENGTH):
        ids = prompts.input_ids[i].tolist()
        docs.append(
            {
                "doc_id": i,
                "prompt_tokens": length,
                "prompt": _text(ids[1:]),  # BOS is added by the tokenizer
                "answer": _text(prompts.answers[i].tolist()),
                "record_pos": int(prompts.record_pos[i]),
            }
        )
    return docs


def data_file(length: int) -> Path:
    """Path of the shipped JSONL for ``length``-token prompts (built on this file's location)."""
    if length not in LENGTHS:
        raise ValueError(f"length must be one of {LENGTHS}, got {length!r}")
    return _DATA_DIR / f"retrieval_{length}.jsonl"


def load_docs(length: int) -> list[dict]:
    """The shipped documents of ``length``-token prompts."""
    path = data_file(length)
    if not path.is_file():
        raise FileNotFoundError(
            f"the retrieval task data is missing at {path}; reinstall sparsed_backend (package data) or "
            "run python -m sparsed_backend.harness.task_data"
        )
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def retrieval_dataset(prompt_tokens: int, **_metadata) -> dict:
    """lm-eval ``custom_dataset`` hook: ``{"test": Dataset}`` of one length, built in memory.

    ``Dataset.from_list`` keeps the rows in memory, so nothing is written under ``$HF_HOME``
    (``load_dataset("json", ...)`` would write an Arrow cache there). lm-eval also passes the
    task's metadata and model args as keywords; they do not change the data.
    """
    import datasets

    return {"test": datasets.Dataset.from_list(load_docs(prompt_tokens))}


def _write(length: int) -> Path:
    path = data_file(length)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(doc, ensure_ascii=False) for doc in make_docs(length)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare the shipped files with a fresh draw")
    args = p.parse_args(argv)
    bad = 0
    for n in LENGTHS:
        if args.check:
            same = load_docs(n) == make_docs(n)
            bad += not same
            print(f"{data_file(n)}: {'matches' if same else 'DIFFERS from'} a fresh draw")
        else:
            print(f"wrote {_write(n)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
