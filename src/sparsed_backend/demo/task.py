"""Synthetic long-context retrieval: prompts whose answer only attention can find.

Every token is one character of the demo tokenizer (`sparsed_backend.demo.tokenizer`):

- a **record** is a key followed by its value: one key symbol (512 CJK ideographs) and
  ``VALUE_LEN`` value symbols (512 Hangul syllables);
- a **prompt** is BOS, then ``n_records`` records at uniformly random places in a haystack
  of random value symbols, then the question ``?`` + key;
- the **answer** is that key's value, ``VALUE_LEN`` tokens, generated after the prompt.

A **multi-key** question (``n_keys = m > 1``) is ``?`` followed by ``m`` keys of distinct
records, ``? k1 k2 .. km`` (``1 + m`` tokens, no separators: every key is one symbol); its
answer is the ``m`` values in question order, ``v(k1) v(k2) .. v(km)``, ``m * VALUE_LEN``
tokens, decoded as ``m`` blocks of ``VALUE_LEN`` by default. ``n_keys = 1`` is the single-key
format above, drawn with the same random calls, so a seed gives the same prompts as before.

Keys are distinct within a prompt and appear nowhere else, the value symbols are drawn
independently of everything, and the haystack is made of the same symbols: the only way to
the answer is to attend from the question to the one matching record, wherever it is. Which
record is asked is uniform, so the answer's position is uniform over the prompt.

Everything here works on token ids in torch (any device, a ``torch.Generator`` for
reproducibility), so the same sampler feeds training on a GPU, the demo and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validate import ArgumentValueError, check_int

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "KEY_BASE",
    "KEY_SYMBOLS",
    "MASK_ID",
    "N_KEYS",
    "N_VALUES",
    "QUESTION_ID",
    "RECORD_LEN",
    "VALUE_BASE",
    "VALUE_LEN",
    "VALUE_SYMBOLS",
    "VOCAB_SIZE",
    "Records",
    "RetrievalPrompts",
    "exact_match",
    "min_prompt_tokens",
    "sample_prompts",
    "sample_records",
]

# Token ids. The special tokens carry LLaDA's roles (EOS doubles as pad, as in LLaDA).
EOS_ID, BOS_ID, MASK_ID, UNK_ID, QUESTION_ID = 0, 1, 2, 3, 4
N_KEYS = 512
N_VALUES = 512
KEY_BASE = 5
VALUE_BASE = KEY_BASE + N_KEYS
VOCAB_SIZE = VALUE_BASE + N_VALUES
# The characters that spell them (the tokenizer is built from these).
KEY_SYMBOLS = "".join(chr(c) for c in range(0x4E00, 0x4E00 + N_KEYS))
VALUE_SYMBOLS = "".join(chr(c) for c in range(0xAC00, 0xAC00 + N_VALUES))
# Five answer tokens: with one token decoded per step and skip = 0.2 the switch falls on step 1,
# so one step runs dense before it and three answer tokens are decoded with sparse attention.
VALUE_LEN = 5
RECORD_LEN = 1 + VALUE_LEN
QUESTION_LEN = 2  # "?" + key (a question of m keys has 1 + m tokens)


def min_prompt_tokens(n_records: int, n_keys: int = 1) -> int:
    """Shortest prompt (BOS included) that holds ``n_records`` records and a question of ``n_keys`` keys."""
    return 1 + n_records * RECORD_LEN + 1 + n_keys


@dataclass(frozen=True)
class Records:
    """A batch of record bodies (no BOS, no question).

    Attributes:
        tokens: (B, body_len) records scattered in a haystack of value symbols.
        keys: (B, R) key token ids, distinct within a row.
        values: (B, R, VALUE_LEN) value token ids.
        starts: (B, R) body offset of each record's key.
    """

    tokens: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    starts: torch.Tensor


def sample_records(
    batch: int, body_len: int, n_records: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> Records:
    """Scatter ``n_records`` records uniformly at random over a haystack of ``body_len`` tokens.

    The body is a random interleaving of ``body_len - n_records * RECORD_LEN`` haystack tokens
    and ``n_records`` records, every interleaving equally likely.
    """
    check_int("batch", batch, 1)
    check_int("n_records", n_records, 1)
    if n_records > N_KEYS:
        raise ArgumentValueError("n_records", f"n_records must be <= {N_KEYS} (distinct keys), got {n_records}")
    haystack = body_len - n_records * RECORD_LEN
    if haystack < 0:
        raise ArgumentValueError(
            "body_len",
            f"body_len must be >= n_records * {RECORD_LEN} = {n_records * RECORD_LEN} (the records), got {body_len}",
        )
    kw = {"device": device, "generator": generator}
    tokens = torch.randint(VALUE_BASE, VALUE_BASE + N_VALUES, (batch, body_len), **kw)
    keys = KEY_BASE + torch.rand(batch, N_KEYS, **kw).argsort(1)[:, :n_records]
    values = torch.randint(VALUE_BASE, VALUE_BASE + N_VALUES, (batch, n_records, VALUE_LEN), **kw)
    # Items: haystack tokens and records in random order; record i's start is its item index
    # plus VALUE_LEN for every record before it.
    items = haystack + n_records
    record_items = torch.rand(batch, items, **kw).argsort(1)[:, :n_records].sort(1).values
    starts = record_items + VALUE_LEN * torch.arange(n_records, device=device)
    offsets = starts.unsqueeze(-1) + torch.arange(RECORD_LEN, device=device)  # (B, R, RECORD_LEN)
    tokens.scatter_(1, offsets.flatten(1), torch.cat([keys.unsqueeze(-1), values], -1).flatten(1))
    return Records(tokens, keys, values, starts)


@dataclass(frozen=True)
class RetrievalPrompts:
    """A batch of retrieval prompts of one length.

    Attributes:
        input_ids: (B, n_tokens) BOS, records in a haystack, ``?`` + the asked keys.
        answers: (B, n_keys * VALUE_LEN) the asked keys' values, in question order.
        record_pos: (B,) position in ``input_ids`` of the first asked record's key.
        asked_pos: (B, n_keys) positions in ``input_ids`` of every asked record's key, in
            question order (``asked_pos[:, 0]`` is ``record_pos``).
    """

    input_ids: torch.Tensor
    answers: torch.Tensor
    record_pos: torch.Tensor
    asked_pos: torch.Tensor

    @property
    def n_keys(self) -> int:
        """Keys per question."""
        return self.asked_pos.shape[1]


def sample_prompts(
    n_tokens: int,
    batch: int,
    *,
    n_records: int = 64,
    n_keys: int = 1,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> RetrievalPrompts:
    """Draw ``batch`` prompts of exactly ``n_tokens`` tokens (BOS included).

    Args:
        n_tokens: prompt length, >= ``min_prompt_tokens(n_records, n_keys)``.
        batch: number of prompts.
        n_records: records per prompt (the shipped model was trained with 64).
        n_keys: keys per question (distinct records), ``? k1 .. km``; the answer is their
            values in question order. 1: the shipped single-key format.
        seed: seeds a fresh generator (give this or ``generator``).
        generator: advanced in place; must live on ``device``.
        device: where the tensors are made.
    """
    check_int("n_records", n_records, 1)
    check_int("n_keys", n_keys, 1)
    if n_keys > n_records:
        raise ArgumentValueError(
            "n_keys", f"n_keys must be <= n_records = {n_records} (distinct records), got {n_keys}"
        )
    check_int("n_tokens", n_tokens, min_prompt_tokens(n_records, n_keys))
    if (seed is None) == (generator is None):
        raise ValueError("give exactly one of seed and generator")
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(check_int("seed", seed, 0))
    rec = sample_records(batch, n_tokens - 2 - n_keys, n_records, generator, device)
    if n_keys == 1:  # the single-key draw of the shipped format: same seed, same prompts as before
        asked = torch.randint(0, n_records, (batch, 1), device=device, generator=generator)
    else:  # distinct records in random order
        asked = torch.rand(batch, n_records, device=device, generator=generator).argsort(1)[:, :n_keys]
    keys = rec.keys.gather(1, asked)  # (B, m)
    question = torch.full((batch, 1), QUESTION_ID, device=device)
    ids = torch.cat([torch.full((batch, 1), BOS_ID, device=device), rec.tokens, question, keys], 1)
    answers = rec.values.gather(1, asked.unsqueeze(-1).expand(-1, -1, VALUE_LEN)).flatten(1)  # (B, m * VALUE_LEN)
    asked_pos = 1 + rec.starts.gather(1, asked)
    return RetrievalPrompts(ids, answers, asked_pos[:, 0], asked_pos)


def exact_match(generated: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """(B,) bool: every answer token generated right."""
    if generated.shape != answers.shape:
        raise ArgumentValueError(
            "generated", f"generated must have the answers' shape {tuple(answers.shape)}, got {tuple(generated.shape)}"
        )
    return (generated == answers).all(-1)
