"""Confidence-based parallel decoding (``threshold=`` and Fast-dLLM's ``factor=``) in both
samplers, on the tiny models."""

from __future__ import annotations

import pytest
import torch

import sparsed_backend  # noqa: F401  (registers the "sparsed" attention)
from sparsed_backend import SparseDConfig, SparseDState
from sparsed_backend.sampling._threshold import factor_transfer
from sparsed_backend.sampling.generation import dream_generate, llada_generate
from tiny_models import MASK_ID, never_predicting_mask, padded_pair, tiny_model

P, G, BL = 16, 32, 16
GENERATE = {"llada": llada_generate, "dream": dream_generate}
# Thresholds that make the tiny random models unmask several tokens in some steps and one in
# others (measured: LLaDA at 0.4 takes 6 and 2 steps for its two blocks, Dream at 0.2 5 and 7).
THRESHOLD = {"llada": 0.4, "dream": 0.2}
# Factors that do the same (measured: LLaDA at 2.5 takes 7 and 6 steps, Dream 8 and 8).
FACTOR = {"llada": 2.5, "dream": 2.5}


def prompts(seed: int = 0):
    """Two prompts, the second left padded by 6: ids (2, P), mask (2, P)."""
    return padded_pair(seed, P, 6)


def args(kind: str, **overrides) -> dict:
    base = {"gen_length": G} if kind == "llada" else {"max_new_tokens": G, "alg": "maskgit_plus"}
    return {**base, "block_length": BL, "threshold": THRESHOLD[kind], **overrides}


def threshold_choice(threshold: float):
    """The threshold rule on one row's masked positions {j: confidence}: those at least
    ``threshold`` confident, and the most confident one."""

    def choose(conf: dict[int, float]) -> set[int]:
        best = max(conf, key=conf.get)
        return {j for j, c in conf.items() if c >= threshold} | {best}

    return choose


def factor_choice(factor: float):
    """The factor rule on one row's masked positions, as Fast-dLLM states it: sorted from the most
    confident, the first n for the largest n with (n + 1)(1 - c_n) <= factor for every n' <= n;
    at least one."""

    def choose(conf: dict[int, float]) -> set[int]:
        order = sorted(conf, key=lambda j: -conf[j])
        n = 1
        while n < len(order) and (n + 2) * (1 - conf[order[n]]) <= factor:
            n += 1
        return set(order[:n])

    return choose


def reference_threshold_decoding(model, ids, mask, kind: str, threshold) -> torch.Tensor:
    """The rule written plainly: full forwards of the whole canvas, row by row in Python; the
    masked positions the rule chooses (``threshold``: a float, the threshold rule, or a choice
    function of ``{position: confidence}``) take their argmax token; a block ends when it holds
    no mask."""
    choose = threshold_choice(threshold) if isinstance(threshold, float) else threshold
    x = torch.cat([ids, torch.full((ids.shape[0], G), MASK_ID)], 1)
    full = torch.cat([mask, torch.ones(ids.shape[0], G, dtype=torch.long)], 1)
    pos = (full.cumsum(-1) - 1).clamp_min(0)
    for start in range(P, P + G, BL):
        for _ in range(BL):
            with torch.no_grad():
                logits = model(x, attention_mask=full, position_ids=pos).logits.float()
            if kind == "dream":  # position j is predicted at j - 1
                logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
            conf, tok = torch.softmax(logits[:, start : start + BL], -1).max(-1)
            for r in range(x.shape[0]):
                masked = {j: conf[r, j].item() for j in range(BL) if x[r, start + j] == MASK_ID}
                for j in choose(masked) if masked else ():
                    x[r, start + j] = tok[r, j]
            if not (x[:, start : start + BL] == MASK_ID).any():
                break
    return x


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_threshold_decoding_equals_the_rule_written_plainly(kind):
    model = tiny_model(kind)
    ids, mask = prompts()
    out = GENERATE[kind](model, ids, mask, return_dict_in_generate=True, **args(kind))
    expected = reference_threshold_decoding(model, ids, mask, kind, THRESHOLD[kind])
    assert torch.equal(out.sequences, expected)
    # several steps per block, fewer than one per token, and one forward per step
    assert all(1 < s < BL for s in out.block_steps), out.block_steps
    assert out.num_forwards == sum(out.block_steps)


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_factor_decoding_equals_the_rule_written_plainly(kind):
    model = tiny_model(kind)
    ids, mask = prompts(2)
    out = GENERATE[kind](model, ids, mask, return_dict_in_generate=True, **args(kind, threshold=None,
                                                                                  factor=FACTOR[kind]))  # fmt: skip
    expected = reference_threshold_decoding(model, ids, mask, kind, factor_choice(FACTOR[kind]))
    assert torch.equal(out.sequences, expected)
    assert all(1 < s < BL for s in out.block_steps), out.block_steps
    assert out.num_forwards == sum(out.block_steps)


def test_factor_rule_keeps_the_leading_run_under_the_rising_bar():
    """Sorted masked confidences 0.99, 0.95, 0.9, 0.5: (n + 1)(1 - c_n) = 0.02, 0.15, 0.4, 2.5, so
    factor 1 keeps three, 0.1 one (the first always), 3 all four; unmasked positions never count,
    and a row with nothing masked keeps nothing."""
    conf = torch.tensor([[0.9, 0.5, 0.99, 0.999, 0.95], [0.9, 0.9, 0.9, 0.9, 0.9]])
    masked = torch.tensor([[True, True, True, False, True], [False] * 5])
    want = {1.0: [True, False, True, False, True], 0.1: [False, False, True, False, False], 3.0: [True, True, True,
            False, True]}  # fmt: skip
    for factor, row in want.items():
        got = factor_transfer(conf, masked, factor)
        assert got[0].tolist() == row, factor
        assert not got[1].any()


def test_threshold_one_unmasks_one_token_per_step_as_the_fixed_schedule_does():
    """No probability of the tiny model reaches 1.0, so each step unmasks exactly the most
    confident masked token: LLaDA's fixed schedule with one step per token."""
    model = tiny_model("llada")
    ids, mask = prompts(1)
    fixed = llada_generate(model, ids, mask, steps=G, gen_length=G, block_length=BL)
    out = llada_generate(model, ids, mask, **args("llada", threshold=1.0), return_dict_in_generate=True)
    assert torch.equal(out.sequences, fixed) and out.block_steps == (BL, BL)


@pytest.mark.parametrize("rule", ["threshold", "factor"])
@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_threshold_composes_with_sparsed_caches_and_padded_batches(kind, cache, rule):
    """With sparsed (default grid) and each cache, for either rule: everything is decoded, the
    switch lands on a block's first step (a refresh the cache needs anyway: no extra full
    forward), and the padded row's tokens do not depend on its batch-mate."""
    chosen = {} if rule == "threshold" else {"threshold": None, "factor": FACTOR[kind]}
    model = tiny_model(kind)
    model.set_attn_implementation("sparsed")
    cfg = SparseDConfig(skip=0.2, select=0.5, block_size=16, min_sparse_len=0)
    ids, mask = prompts(3)
    other, other_mask = prompts(4)

    run = lambda i, m: GENERATE[kind](  # noqa: E731
        model, i, m, sparsed=cfg, kv_cache=cache, return_dict_in_generate=True, **args(kind, **chosen)
    )
    try:
        with never_predicting_mask(model):  # a mask left in the output = an undecoded position
            out = run(ids, mask)
            mixed = run(torch.stack([other[0], ids[1]]), torch.stack([other_mask[0], mask[1]]))
    finally:
        model.set_attn_implementation("sdpa")
    assert not (out.sequences[:, P:] == MASK_ID).any(), "a mask token is left"
    assert torch.equal(out.sequences[:, :P], ids)
    assert torch.equal(mixed.sequences[1], out.sequences[1])
    switch = out.sparsed_state.switch
    assert out.sparsed_state.layers and 0 < switch <= out.block_steps[0]
    if cache is not None:
        # With a cache the switch waits for the second block's first step (forward index
        # block_steps[0]), a refresh the cache runs anyway: one refresh per block, none extra.
        assert switch == out.block_steps[0] and out.kv_cache.refreshes == len(out.block_steps)


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_threshold_with_sparsed_at_select_one_equals_dense(kind):
    model = tiny_model(kind)
    ids, mask = prompts(5)
    dense = GENERATE[kind](model, ids, mask, **args(kind))
    model.set_attn_implementation("sparsed")
    try:
        cfg = SparseDConfig(skip=0.0, select=1.0, block_size=16, min_sparse_len=0)
        out = GENERATE[kind](model, ids, mask, sparsed=cfg, return_dict_in_generate=True, **args(kind))
    finally:
        model.set_attn_implementation("sdpa")
    assert out.sparsed_state.switch == 0 and torch.equal(out.sequences, dense)


def test_a_single_cached_block_switches_once_past_skip_with_one_extra_refresh():
    """One decoding block and a cache: no later block start exists, so the switch refreshes at
    the first step that begins with skip of the tokens decoded."""
    model = tiny_model("llada")
    model.set_attn_implementation("sparsed")
    cfg = SparseDConfig(skip=0.2, select=0.5, block_size=16, min_sparse_len=0)
    ids, mask = prompts(6)
    try:
        out = llada_generate(
            model, ids, mask, gen_length=G, threshold=0.6, kv_cache="dual", sparsed=cfg, return_dict_in_generate=True
        )
    finally:
        model.set_attn_implementation("sdpa")
    # Up to the switch the sparsed run is this dense run with the same cache and windows.
    history = llada_generate(model, ids, mask, gen_length=G, threshold=0.6, kv_cache="dual", output_history=True,
                             return_dict_in_generate=True).history  # fmt: skip
    switch = out.sparsed_state.switch
    assert 0 < switch < out.num_forwards
    before = [0] + [int((h[:, P:] != MASK_ID).sum(-1).min()) for h in history]  # least decoded row, per step
    assert before[switch] >= 0.2 * G > before[switch - 1]
    assert out.kv_cache.refreshes == 2  # the block's first step and the switch


BAD = [
    ("llada", {"threshold": 0.5, "steps": 8}, ValueError, r"steps=8 and threshold=0.5 exclude each other"),
    ("llada", {"threshold": None}, ValueError, r"steps is required \(a fixed schedule\), unless threshold is given"),
    ("llada", {"threshold": 0.0}, ValueError, r"threshold must be in \(0, 1\], got 0.0"),
    ("dream", {"threshold": 1.5}, ValueError, r"threshold must be in \(0, 1\], got 1.5"),
    ("dream", {"threshold": -0.5}, ValueError, r"threshold must be in \(0, 1\], got -0.5"),
    ("llada", {"threshold": float("nan")}, ValueError, r"threshold must be finite, got nan"),
    ("llada", {"threshold": "high"}, TypeError, r"threshold must be a float, got str"),
    ("llada", {"remasking": "random"}, ValueError, r"threshold needs remasking='low_confidence'"),
    ("dream", {"alg": "entropy"}, ValueError, r"threshold needs alg='maskgit_plus' .* got alg='entropy'"),
    ("dream", {"alg_temp": 0.5}, ValueError, r"threshold needs alg='maskgit_plus' .* alg_temp=0.5"),
    ("llada", {"factor": 1.0}, ValueError, r"factor=1.0 and threshold=0.4 are two parallel decoding rules: give one"),
    ("llada", {"threshold": None, "factor": 0.0}, ValueError, r"factor must be > 0, got 0.0"),
    ("dream", {"threshold": None, "factor": float("inf")}, ValueError, r"factor must be finite, got inf"),
    ("llada", {"threshold": None, "factor": 1.0, "steps": 8}, ValueError, r"steps=8 and factor=1.0 exclude each other"),
    (
        "llada",
        {"threshold": None, "factor": 1.0, "remasking": "random"},
        ValueError,
        r"factor needs remasking='low_confidence'",
    ),
    ("dream", {"threshold": None, "factor": 1.0, "alg": "entropy"}, ValueError, r"factor needs alg='maskgit_plus'"),
]


@pytest.mark.parametrize(("kind", "overrides", "error", "match"), BAD)
def test_bad_threshold_arguments_raise(kind, overrides, error, match):
    ids, mask = prompts()
    with pytest.raises(error, match=match):
        GENERATE[kind](tiny_model(kind), ids, mask, **args(kind, **overrides))


def test_a_state_of_unknown_length_is_dense_until_the_sampler_switches():
    state = SparseDState(SparseDConfig(), steps=None)
    assert state.switch is None and state.mode == "dense"
    state.advance()
    state.advance()
    state.switch_here()
    assert state.switch == 2 and state.mode == "switch"
    state.advance()
    assert state.mode == "sparse"
    with pytest.raises(ValueError, match=r"the switch step is already set \(step 2\)"):
        state.switch_here()
    state.reset()
    assert state.switch is None and state.mode == "dense"
    with pytest.raises(ValueError, match=r"switch_here\(\) is for steps=None; this schedule switches at step 2"):
        SparseDState(SparseDConfig(), steps=10).switch_here()
