"""Synthetic long-context key-value retrieval: prompts whose answer only attention can find.

A prompt is a run of records ``key:value;`` followed by a question ``?key:``; the answer is
that key's value. Keys are 1-2 random CJK symbols, unique within a prompt; values are 4
characters from ``[a-z0-9]`` with at least one digit, unique within a prompt. Keys contain no
digit and delimiters appear in neither, so the answer string occurs exactly once in the
prompt: as the queried record's value. Nothing about the question or the answer's surroundings
predicts the value, so a model can only answer by attending to the matching record, whose
index is uniform over the prompt.

The tokenizer (`sparsed_backend.demo.tokenizer`) is character-level, so a prompt of
``n_tokens`` characters is ``n_tokens`` tokens (plus the BOS token the tokenizer prepends).

``make_example(random.Random(0), 80)``::

    prompt = "亏乡:ig3b;儲:c76d;凲倡:4z2w;僒偨:w3l0;亖:zc7h;乥之:2ftd;兦佒:959r;倽佪:9jcy;佃:7h2t;傏:kd2l;?兦佒:"
    answer = "959r"

``n_queries > 1`` answers the first questions in the prompt and leaves the last open
(``...jr;僐:xz9m;?也:g3b9;?僐:xz9m;?佒倽:`` -> ``c7h2``): a multi-needle variant, and denser
supervision for training.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

__all__ = [
    "ANSWER_LEN",
    "KEY_ALPHABET",
    "MIN_TOKENS",
    "VALUE_ALPHABET",
    "RetrievalExample",
    "exact_match",
    "make_batch",
    "make_example",
    "make_record_example",
    "min_tokens",
]

# Keys are 1-2 symbols from 1024 CJK ideographs (one token each), so finding the record takes
# one or two content matches: 4-6 letter keys over 26 letters did not learn at all in a
# 7-minute H100 budget (training/README.md). Values stay lowercase/digits, so no value can be
# mistaken for a key. 1024 symbols leave room for unique one-symbol keys at 8k tokens.
KEY_ALPHABET = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 1024))
VALUE_ALPHABET = string.ascii_lowercase + string.digits
KEY_MIN, KEY_MAX = 1, 2  # key length range, inclusive
ANSWER_LEN = 4  # every value (so every answer) has exactly this many characters
KV_SEP, RECORD_SEP, QUESTION = ":", ";", "?"
# Characters of one record beyond its key: ":" + value + ";".
_RECORD_EXTRA = len(KV_SEP) + ANSWER_LEN + len(RECORD_SEP)
# Characters of the question beyond its key: "?" + key + ":".
_QUESTION_EXTRA = len(QUESTION) + len(KV_SEP)
_MIN_RECORDS = 4


@dataclass(frozen=True)
class RetrievalExample:
    """One prompt with the structure needed to check it.

    Attributes:
        prompt: records then the question(s), exactly ``n_tokens`` characters.
        answer: the value of the last (open) question's key, ``ANSWER_LEN`` characters.
        keys: the record keys in prompt order.
        values: the record values in prompt order.
        query_indices: indices into ``keys`` of the questions in prompt order; all but the
            last are answered in the prompt (``?key:value;``), the last is open.
    """

    prompt: str
    answer: str
    keys: tuple[str, ...]
    values: tuple[str, ...]
    query_indices: tuple[int, ...]

    @property
    def query_index(self) -> int:
        """Index into ``keys`` of the open question's record."""
        return self.query_indices[-1]

    @property
    def query_offset(self) -> int:
        """Character offset in ``prompt`` of the open question's record value."""
        before = sum(len(k) + _RECORD_EXTRA for k in self.keys[: self.query_index])
        return before + len(self.keys[self.query_index]) + len(KV_SEP)

    @property
    def answer_offsets(self) -> tuple[int, ...]:
        """Offsets in ``prompt + answer`` of every question's answer, the open one last."""
        offsets = []
        pos = sum(len(k) + _RECORD_EXTRA for k in self.keys)
        for q in self.query_indices:
            pos += len(QUESTION) + len(self.keys[q]) + len(KV_SEP)
            offsets.append(pos)
            pos += ANSWER_LEN + len(RECORD_SEP)
        return tuple(offsets)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _min_records(n_queries: int) -> int:
    # One record nobody asks about keeps the length budget reachable by +-1 steps.
    return max(_MIN_RECORDS, n_queries + 1)


def min_tokens(n_queries: int = 1) -> int:
    """Shortest prompt with ``n_queries`` questions, whatever the key lengths."""
    _check_int("n_queries", n_queries, 1)
    n_records = _min_records(n_queries)
    answered = (n_queries - 1) * (ANSWER_LEN + len(RECORD_SEP))
    shortest = n_records * (KEY_MAX + _RECORD_EXTRA) + n_queries * (KEY_MAX + _QUESTION_EXTRA) + answered
    # With keys of 1-2 symbols, consecutive record counts leave gaps of unreachable lengths
    # below about 8 * (KEY_MAX + _RECORD_EXTRA) characters; from there on every length fits.
    return max(shortest, 8 * (KEY_MAX + _RECORD_EXTRA) + n_queries * _QUESTION_EXTRA + answered)


def _key_lengths(rng: random.Random, weights: list[int], budget: int) -> list[int]:
    """Key lengths in [KEY_MIN, KEY_MAX] with sum(weight * length) == budget.

    A record's weight is 1, plus 1 if a question names its key (the key is written twice).
    Lengths start i.i.d. uniform and are then nudged one character at a time at random records
    until the total fits (a weight-2 move that overshoots by one is undone elsewhere).
    """
    n = len(weights)
    lengths = [rng.randint(KEY_MIN, KEY_MAX) for _ in range(n)]
    total = sum(w * n for w, n in zip(weights, lengths, strict=True))
    while total != budget:
        step = 1 if total < budget else -1
        i = rng.randrange(n)
        if KEY_MIN <= lengths[i] + step <= KEY_MAX:
            lengths[i] += step
            total += weights[i] * step
    return lengths


def _unique_strings(rng: random.Random, lengths: list[int], alphabet: str, need_digit: bool = False) -> list[str]:
    """Distinct random strings of the given lengths (optionally each with a digit), in order.

    All characters come from one ``choices`` call (fast); strings that break a rule are redrawn
    one by one, in order, which keeps the result a function of the rng state alone.
    """
    chars = "".join(rng.choices(alphabet, k=sum(lengths)))
    out: list[str] = []
    seen: set[str] = set()
    start = 0
    for n in lengths:
        s = chars[start : start + n]
        start += n
        while s in seen or (need_digit and not any(c.isdigit() for c in s)):
            s = "".join(rng.choices(alphabet, k=n))
        seen.add(s)
        out.append(s)
    return out


def make_record_example(rng: random.Random, n_tokens: int, n_queries: int = 1) -> RetrievalExample:
    """Draw one retrieval prompt of exactly ``n_tokens`` characters.

    Args:
        rng: the only source of randomness; the same state gives the same example.
        n_tokens: prompt length in characters (= tokens, BOS excluded), >= ``min_tokens``.
        n_queries: questions about distinct records; the first ``n_queries - 1`` are answered
            in the prompt (a multi-needle variant, and denser supervision for training), the
            last is open. 1 gives the plain task.

    Returns:
        The example with its records, so tests can check the invariants.
    """
    _check_int("n_queries", n_queries, 1)
    _check_int("n_tokens", n_tokens, min_tokens(n_queries))
    # Characters that do not depend on key lengths, for r records.
    answered = (n_queries - 1) * (ANSWER_LEN + len(RECORD_SEP))

    def fixed(r: int) -> int:
        return r * _RECORD_EXTRA + n_queries * _QUESTION_EXTRA + answered

    mean_key = (KEY_MIN + KEY_MAX) / 2
    n_records = round((n_tokens - fixed(0) - n_queries * mean_key) / (mean_key + _RECORD_EXTRA))
    n_records = max(n_records, _min_records(n_queries))
    for _ in range(n_tokens):  # smallest adjustment that makes the key-length budget reachable
        budget = n_tokens - fixed(n_records)
        if budget < (n_records + n_queries) * KEY_MIN:
            n_records -= 1
        elif budget > (n_records + n_queries) * KEY_MAX:
            n_records += 1
        else:
            break
    else:
        raise ValueError(f"n_tokens={n_tokens} cannot be laid out with {n_queries} question(s)")
    # Distinct records, uniform over the prompt, in random order.
    queries = rng.sample(range(n_records), n_queries)
    weights = [1] * n_records
    for q in queries:
        weights[q] = 2
    lengths = _key_lengths(rng, weights, budget)
    keys = _unique_strings(rng, lengths, KEY_ALPHABET)
    values = _unique_strings(rng, [ANSWER_LEN] * n_records, VALUE_ALPHABET, need_digit=True)
    parts = [f"{k}{KV_SEP}{v}{RECORD_SEP}" for k, v in zip(keys, values, strict=True)]
    parts += [f"{QUESTION}{keys[q]}{KV_SEP}{values[q]}{RECORD_SEP}" for q in queries[:-1]]
    parts.append(f"{QUESTION}{keys[queries[-1]]}{KV_SEP}")
    prompt = "".join(parts)
    assert len(prompt) == n_tokens, (len(prompt), n_tokens)
    return RetrievalExample(prompt, values[queries[-1]], tuple(keys), tuple(values), tuple(queries))


MIN_TOKENS = min_tokens(1)  # shortest plain prompt


def make_example(rng: random.Random, n_tokens: int, n_queries: int = 1) -> tuple[str, str]:
    """Draw one ``(prompt, answer)`` pair; see `make_record_example`."""
    ex = make_record_example(rng, n_tokens, n_queries)
    return ex.prompt, ex.answer


def make_batch(
    rng: random.Random | int, n_tokens: int, batch_size: int, n_queries: int = 1
) -> tuple[list[str], list[str]]:
    """Draw ``batch_size`` examples of the same length (so they stack without padding).

    Args:
        rng: a ``random.Random`` (advanced in place) or an int seed.
        n_tokens: prompt length in characters of every example.
        batch_size: number of examples, >= 1.
        n_queries: questions per prompt (see `make_record_example`).

    Returns:
        ``(prompts, answers)``, two lists of ``batch_size`` strings.
    """
    if isinstance(rng, int) and not isinstance(rng, bool):
        rng = random.Random(rng)
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random or an int seed, got {type(rng).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    pairs = [make_example(rng, n_tokens, n_queries) for _ in range(batch_size)]
    return [p for p, _ in pairs], [a for _, a in pairs]


def exact_match(pred: str, answer: str) -> bool:
    """Whether a decoded prediction equals the answer, ignoring surrounding whitespace."""
    return pred.strip() == answer.strip()
