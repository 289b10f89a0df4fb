"""The retrieval task, its tokenizer and the training script's smoke run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from sparsed_backend.demo.task import (
    ANSWER_LEN,
    KEY_ALPHABET,
    KEY_MAX,
    KEY_MIN,
    MIN_TOKENS,
    exact_match,
    make_batch,
    make_example,
    make_record_example,
    min_tokens,
)
from sparsed_backend.demo.tokenizer import (
    BOS_TOKEN,
    CHARACTERS,
    EOS_TOKEN,
    MASK_TOKEN,
    SPECIAL_TOKENS,
    build_tokenizer,
)

REPO = Path(__file__).resolve().parent.parent
LENGTHS = [MIN_TOKENS, MIN_TOKENS + 1, 67, 100, 123, 251, 256, 1019, 2043, 4096]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# --------------------------------------------------------------------------- task


def test_same_seed_same_examples():
    a = [make_example(random.Random(7), n) for n in (100, 512, 2048)]
    b = [make_example(random.Random(7), n) for n in (100, 512, 2048)]
    assert a == b
    assert make_batch(3, 300, 5) == make_batch(random.Random(3), 300, 5)
    assert make_batch(3, 300, 5) != make_batch(4, 300, 5)


@pytest.mark.parametrize("n_tokens", LENGTHS)
def test_example_invariants(n_tokens):
    rng = random.Random(n_tokens)
    for _ in range(20):
        ex = make_record_example(rng, n_tokens)
        assert len(ex.prompt) == n_tokens
        assert len(set(ex.keys)) == len(ex.keys), "keys must be unique"
        assert len(set(ex.values)) == len(ex.values), "values must be unique"
        assert all(KEY_MIN <= len(k) <= KEY_MAX and set(k) <= set(KEY_ALPHABET) for k in ex.keys)
        assert all(len(v) == ANSWER_LEN and any(c.isdigit() for c in v) for v in ex.values)
        # The answer is the queried key's value, and that is its only occurrence in the prompt.
        assert ex.answer == ex.values[ex.query_index]
        assert ex.prompt.endswith(f"?{ex.keys[ex.query_index]}:")
        assert ex.prompt.count(ex.answer) == 1
        assert ex.prompt[ex.query_offset : ex.query_offset + ANSWER_LEN] == ex.answer
        # The queried key names exactly one record.
        key = ex.keys[ex.query_index]
        assert (";" + ex.prompt).count(f";{key}:") == 1
        assert set(ex.prompt) <= set(CHARACTERS)


@pytest.mark.parametrize("n_queries", [2, 3, 8])
def test_multi_query_invariants(n_queries):
    rng = random.Random(n_queries)
    for n_tokens in (min_tokens(n_queries), min_tokens(n_queries) + 7, 512, 2043):
        ex = make_record_example(rng, n_tokens, n_queries)
        text = ex.prompt + ex.answer
        assert len(ex.prompt) == n_tokens and len(set(ex.query_indices)) == n_queries
        assert ex.prompt.count(ex.answer) == 1  # the open question's answer is not given
        for q, off in zip(ex.query_indices, ex.answer_offsets, strict=True):
            assert text[off : off + ANSWER_LEN] == ex.values[q]
            assert text[off - len(ex.keys[q]) - 2 : off] == f"?{ex.keys[q]}:"
        assert ex.answer_offsets[-1] == n_tokens
    with pytest.raises(ValueError, match="n_tokens must be >= "):
        make_example(rng, min_tokens(n_queries) - 1, n_queries)


def test_query_position_is_uniform():
    rng = random.Random(0)
    n = 2000
    fractions = []
    for _ in range(n):
        ex = make_record_example(rng, 256)
        fractions.append(ex.query_index / (len(ex.keys) - 1))
    # Uniform on [0, 1]: mean 1/2, each quarter ~ n/4 (loose bounds, ~5 sigma).
    assert abs(sum(fractions) / n - 0.5) < 0.04
    quarters = [sum(q / 4 <= f < (q + 1) / 4 for f in fractions) for q in range(4)]
    quarters[3] += sum(f == 1.0 for f in fractions)
    assert all(abs(c - n / 4) < 5 * (n * 3 / 16) ** 0.5 for c in quarters), quarters


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_tokens must be >= "):
        make_example(random.Random(0), MIN_TOKENS - 1)
    with pytest.raises(TypeError, match="n_tokens must be an int"):
        make_example(random.Random(0), 100.0)
    with pytest.raises(ValueError, match="n_queries must be >= 1"):
        make_example(random.Random(0), 100, 0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        make_batch(0, 100, 0)
    with pytest.raises(TypeError, match="rng must be"):
        make_batch("seed", 100, 1)


def test_exact_match():
    assert exact_match("ab12", "ab12")
    assert exact_match(" ab12\n", "ab12")
    assert not exact_match("ab13", "ab12")
    assert not exact_match("ab1", "ab12")


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tokenizer):
    prompt, answer = make_example(random.Random(1), 300)
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(prompt) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    plain = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert len(plain) == ANSWER_LEN and tokenizer.decode(plain) == answer
    text = "hi there, x = (1 - 2)/3!\n'ok'."
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert tokenizer("A")["input_ids"][1] == tokenizer.unk_token_id


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len(CHARACTERS) <= 1088  # the model's embedding rows
    assert tokenizer.mask_token == MASK_TOKEN and tokenizer.bos_token == BOS_TOKEN
    assert tokenizer.eos_token == tokenizer.pad_token == EOS_TOKEN
    assert len({tokenizer.mask_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}) == 3
    assert tokenizer.decode([tokenizer.mask_token_id]) == MASK_TOKEN


def test_auto_tokenizer_loads_saved_copy(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    prompt, _ = make_example(random.Random(2), 200)
    assert loaded(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]
    assert loaded.get_vocab() == tokenizer.get_vocab()
    for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
        assert getattr(loaded, name) == getattr(tokenizer, name), name
    assert loaded.decode(loaded(" a .")["input_ids"], skip_special_tokens=True) == " a ."


# --------------------------------------------------------------------------- training script


@pytest.fixture(scope="module")
def train_mod():
    spec = importlib.util.spec_from_file_location("train_retrieval", REPO / "training" / "train_retrieval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("t", [0.001, 0.05, 0.5, 0.999])
def test_answer_mask_is_bernoulli_given_one_masked(train_mod, t):
    """sample_answer_mask draws i.i.d. Bernoulli(t) masks conditioned on >= 1 masked."""
    import torch

    k, n = 4, 200_000
    gen = torch.Generator().manual_seed(0)
    masked = train_mod.sample_answer_mask(torch.full((n,), t), k, gen)
    assert masked.any(-1).all()
    counts = torch.bincount(masked.sum(-1), minlength=k + 1).double() / n
    z = 1 - (1 - t) ** k
    expected = torch.tensor([math.comb(k, m) * t**m * (1 - t) ** (k - m) / z for m in range(k + 1)])
    expected[0] = 0.0
    assert torch.allclose(counts, expected.double(), atol=4e-3), (counts, expected)
    # Exchangeable: every position is masked equally often.
    per_pos = masked.double().mean(0)
    assert torch.allclose(per_pos, per_pos.mean().expand(k), atol=4e-3), per_pos


def test_curriculum(train_mod):
    """Starts at curriculum_start, promotes one length at a time, reaches the top by curriculum_end."""
    args = train_mod.parse_args([])
    cur = train_mod.Curriculum(args)
    lengths = sorted(args.train_lengths)
    assert cur.allowed(0.0) == [lengths[0]] == [args.curriculum_start]
    cur.promote(0.0)
    assert cur.allowed(0.0) == lengths[:2]
    assert cur.cap(args.curriculum_end) == lengths[-1]
    caps = [cur.cap(p / 100) for p in range(101)]
    assert caps == sorted(caps)
    for _ in range(20):
        cur.promote(0.0)
    assert cur.allowed(0.0) == lengths


def test_greedy_answer_unmasks_most_confident_first(train_mod):
    """One token per step, the most confident still-masked position first (LLaDA low-confidence)."""
    import torch

    order = []

    class Fake(torch.nn.Module):
        def forward(self, input_ids, logits_to_keep=0):
            x = input_ids[:, -logits_to_keep:]
            order.append((x[0] == 2).tolist())
            logits = torch.full((1, 4, 64), -5.0)
            for j, (tok, conf) in enumerate([(10, 1.0), (11, 4.0), (12, 2.0), (13, 3.0)]):
                logits[0, j, tok] = conf
            return type("Out", (), {"logits": logits})()

    out = train_mod.greedy_answer(Fake(), torch.tensor([[1, 5, 6]]), mask_id=2)
    assert out.tolist() == [[10, 11, 12, 13]]
    # Confidences 1, 4, 2, 3: positions 1, 3, 2, 0 are unmasked in that order.
    t, f = True, False
    assert order == [[t, t, t, t], [t, f, t, t], [t, f, t, f], [t, f, f, f]]


def test_training_smoke(tmp_path):
    """--smoke trains a tiny LLaDA for a few steps on CPU, saves, reloads and evaluates."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(REPO / "training" / "train_retrieval.py"), "--smoke"]
    cmd += ["--out", str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "ckpt" / "summary.json").read_text())
    assert summary["steps"] > 0 and set(summary["exact_match"]) == {"96", "128"}

    from transformers import AutoTokenizer

    from sparsed_backend.models.llada import LLaDAModelLM

    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    model = LLaDAModelLM.from_pretrained(tmp_path / "ckpt")
    assert model.config.mask_token_id == tok.mask_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.vocab_size == len(tok)
