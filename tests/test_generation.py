"""The LLaDA and Dream samplers: the official algorithms' results, batching with left padding,
reproducibility, the SparseD state they drive, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsed_backend.attention.config import SparseDConfig
from sparsed_backend.sampling.generation import (
    DiffusionGenerationOutput,
    dream_generate,
    llada_generate,
    llada_transfer_schedule,
)
from tiny_models import MASK_ID, long_and_short, tiny_model

GENERATE = {"llada": llada_generate, "dream": dream_generate}
P, G = 16, 32  # padded prompt length and generated tokens: L = 48, the shape test_models runs
SHORT = 10  # the second prompt's real length


def prompts(seed: int = 0):
    """Two prompts (lengths P and SHORT), the short one left padded: ids (2, P), mask (2, P)."""
    return long_and_short(seed, P, SHORT)


def model_for(kind: str, attn: str = "sdpa", device: str | torch.device = "cpu"):
    model = tiny_model(kind).to(device)
    model.set_attn_implementation(attn)
    return model


def args(kind: str, **overrides) -> dict:
    base = (
        {"steps": 8, "gen_length": G, "block_length": 16}
        if kind == "llada"
        else {"steps": 8, "max_new_tokens": G, "alg": "entropy"}
    )
    return {**base, **overrides}


# ------------------------------------------------------------ the official loops, literally


def official_llada(model, prompt, steps, gen_length, block_length, cfg_scale=0.0):
    """LLaDA generate.py at temperature 0 with low_confidence remasking: full logits, a per-row
    top-k loop, boolean indexing (batch of unpadded prompts of one length)."""
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), MASK_ID)
    x[:, :p] = prompt
    prompt_index = x != MASK_ID
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for nb in range(num_blocks):
        block_mask = x[:, p + nb * block_length : p + (nb + 1) * block_length] == MASK_ID
        mask_num = block_mask.sum(dim=1, keepdim=True)
        num_transfer = torch.zeros(b, steps, dtype=torch.int64) + mask_num // steps
        for j in range(b):
            num_transfer[j, : int(mask_num[j] % steps)] += 1
        for i in range(steps):
            mask_index = x == MASK_ID
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = MASK_ID
                logits, un_logits = torch.chunk(model(torch.cat([x, un_x])).logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x).logits
            x0 = logits.argmax(-1)
            x0_p = torch.gather(F.softmax(logits, dim=-1), -1, x0[..., None]).squeeze(-1)
            x0_p[:, p + (nb + 1) * block_length :] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(b):
                _, sel = torch.topk(confidence[j], k=int(num_transfer[j, i]))
                transfer[j, sel] = True
            x[transfer] = x0[transfer]
    return x


def official_dream(model, prompt, steps, max_new_tokens, alg, eps=1e-3):
    """Dream's _sample at temperature 0, alg_temp None: full shifted logits, boolean indexing."""
    x = F.pad(prompt, (0, max_new_tokens), value=MASK_ID)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == MASK_ID
        logits = model(x).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        probs = torch.softmax(logits[mask_index], dim=-1)
        confidence, x0 = probs.max(dim=-1)
        if alg == "topk_margin":
            top = torch.sort(probs, dim=-1, descending=True).values
            confidence = top[:, 0] - top[:, 1]
        elif alg == "entropy":
            confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        t, s = timesteps[i], timesteps[i + 1]
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        k = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
        full_confidence[mask_index] = confidence
        if k > 0:
            _, index = torch.topk(full_confidence, k)
            x_ = torch.full_like(x, MASK_ID)
            x_[mask_index] = x0
            rows = torch.arange(x.shape[0])[:, None].expand_as(index)
            x[rows, index] = x_[rows, index]
    return x


@pytest.mark.parametrize(
    ("steps", "gen_length", "block_length", "cfg_scale"),
    [(8, 32, 16, 0.0), (6, 32, 32, 0.0), (12, 8, 8, 0.0), (4, 32, 16, 1.5)],
    ids=["2blocks", "uneven_schedule", "more_steps_than_tokens", "cfg"],
)
def test_llada_matches_official_loop(steps, gen_length, block_length, cfg_scale):
    model = model_for("llada")
    ids = prompts()[0][:1]
    with torch.no_grad():
        expected = official_llada(model, ids, steps, gen_length, block_length, cfg_scale)
    out = llada_generate(model, ids, steps=steps, gen_length=gen_length, block_length=block_length, cfg_scale=cfg_scale)
    assert torch.equal(out, expected)
    assert not (out == MASK_ID).any()


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("steps", [8, 5])
def test_dream_matches_official_loop(alg, steps):
    model = model_for("dream")
    ids = prompts()[0][:1]
    with torch.no_grad():
        expected = official_dream(model, ids, steps, G, alg)
    out = dream_generate(model, ids, steps=steps, max_new_tokens=G, alg=alg)
    assert torch.equal(out, expected)
    assert not (out == MASK_ID).any()


def test_llada_transfer_schedule():
    assert llada_transfer_schedule(32, 6) == [6, 6, 5, 5, 5, 5]
    assert llada_transfer_schedule(4, 6) == [1, 1, 1, 1, 0, 0]


# --------------------------------------------------------------------- batching, padding


@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        ("llada", {}),
        ("llada", {"cfg_scale": 1.0, "remasking": "low_confidence"}),
        ("dream", {"alg": "maskgit_plus"}),
        ("dream", {"alg": "topk_margin"}),
    ],
)
def test_left_padded_batch_equals_each_prompt_alone(kind, overrides):
    model = model_for(kind)
    ids, mask = prompts()
    overrides = {"steps": 4, **overrides}
    batch = GENERATE[kind](model, ids, mask, **args(kind, **overrides))
    assert batch.shape == (2, P + G)
    assert torch.equal(batch[:, :P], ids)  # prompt and pad tokens never change
    for row, start in ((0, 0), (1, P - SHORT)):
        alone = GENERATE[kind](model, ids[row : row + 1, start:], **args(kind, **overrides))
        assert torch.equal(batch[row, start:], alone[0])


def test_all_ones_mask_equals_no_mask():
    model = model_for("dream")
    ids = prompts()[0]
    a = dream_generate(model, ids, torch.ones_like(ids), **args("dream"))
    b = dream_generate(model, ids, None, **args("dream"))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        ("llada", {"temperature": 1.0, "remasking": "random"}),
        ("llada", {"temperature": 0.7, "remasking": "low_confidence", "cfg_scale": 0.5}),
        ("dream", {"alg": "origin", "temperature": 1.0, "top_p": 0.9, "top_k": 20}),
        ("dream", {"alg": "maskgit_plus", "temperature": 0.5, "alg_temp": 0.5}),
        ("dream", {"alg": "entropy", "temperature": 0.8, "top_p": 0.95}),
    ],
)
def test_same_seed_same_output(kind, overrides):
    model = model_for(kind)
    overrides = {"steps": 4, **overrides}
    ids, mask = prompts()
    runs = [
        GENERATE[kind](model, ids, mask, generator=torch.Generator().manual_seed(seed), **args(kind, **overrides))
        for seed in (3, 3, 4)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # the noise matters (a different seed differs)
    assert torch.equal(runs[0][:, :P], ids)


# ------------------------------------------------------------- what reaches the model


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_lm_head_runs_only_on_decoded_positions(kind):
    model = model_for(kind)
    seen = []

    def spy(module, args_, kwargs, output):
        seen.append((kwargs["logits_to_keep"].tolist(), tuple(output.logits.shape)))

    handle = model.register_forward_hook(spy, with_kwargs=True)
    try:
        out = GENERATE[kind](model, *prompts(), return_dict_in_generate=True, output_history=True, **args(kind))
    finally:
        handle.remove()
    assert isinstance(out, DiffusionGenerationOutput)
    assert out.num_forwards == len(seen) == len(out.history) == 8
    assert torch.equal(out.history[-1], out.sequences)
    if kind == "llada":  # the current 16-token block: 4 steps on each of the two blocks
        blocks = [list(range(P, P + 16))] * 4 + [list(range(P + 16, P + 32))] * 4
        assert [keep for keep, _ in seen] == blocks
        assert {shape for _, shape in seen} == {(2, 16, 128)}
    else:  # the generation region, shifted one left (position i is predicted at i - 1)
        assert all(keep == list(range(P - 1, P + G - 1)) for keep, _ in seen)
        assert {shape for _, shape in seen} == {(2, G, 128)}


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_diffusion_generate_method(kind):
    model = model_for(kind)
    ids, mask = prompts()
    assert torch.equal(
        model.diffusion_generate(ids, mask, **args(kind)), GENERATE[kind](model, ids, mask, **args(kind))
    )


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_sparsed_greedy_equals_sdpa_at_select_one(kind, device):
    import sparsed_backend  # noqa: F401  (registers the "sparsed" attention)

    ids, mask = prompts()
    ids, mask = ids.to(device), mask.to(device)
    dense = GENERATE[kind](model_for(kind, "sdpa", device), ids, mask, **args(kind))
    model = model_for(kind, "sparsed", device)
    try:
        config = SparseDConfig(select=1.0, skip=0.0, block_size=16, min_sparse_len=0)
        out = GENERATE[kind](model, ids, mask, sparsed=config, return_dict_in_generate=True, **args(kind))
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(out.sequences, dense)
    state = out.sparsed_state
    assert state.steps == out.num_forwards == 8  # one schedule over every forward
    assert state.step == 8  # advanced after each forward
    assert state.gen_start == P
    assert state.switch == 0
    assert sorted(state.layers) == [0, 1]  # the switch step selected blocks for both layers
    assert state.density() == pytest.approx(1.0)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        ("llada", {"temperature": 0.5, "cfg_scale": 1.0}),
        ("dream", {"alg": "origin", "temperature": 0.5, "top_p": 0.9, "top_k": 20}),
        ("dream", {"alg": "maskgit_plus", "temperature": 0.5, "alg_temp": 0.5}),
    ],
)
def test_step_loop_never_syncs_with_the_host(kind, overrides, device):
    """From the first forward on (input validation reads the inputs back once, before the
    loop), any device-to-host sync raises. No padding here: with padding, transformers' own
    sdpa mask builder calls padding_mask.all() once per forward."""
    if device.type != "cuda":
        pytest.skip("torch.cuda.set_sync_debug_mode needs a CUDA device")
    model = model_for(kind, "sdpa", device)
    handle = model.register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error"))
    try:
        out = GENERATE[kind](
            model,
            prompts()[0].to(device),
            generator=torch.Generator(device).manual_seed(0),
            **args(kind, **overrides),
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
        handle.remove()
    assert out.shape == (2, P + G)


@pytest.mark.gpu
@pytest.mark.parametrize(("reselect", "kv_cache"), [(False, None), (False, "prefix"), (False, "dual"), (True, None)])
@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_sparsed_step_loop_never_syncs_with_the_host(kind, reselect, kv_cache, device):
    """The same promise with sparsed attention: dense steps, the switch step (scoring, top-k,
    BlockMask) and sparse steps, with re-selection at every step too, and with a prefix or
    dual K/V cache (refreshes, then windows on the switch step's rows). A first generation
    compiles FlexAttention (compilation may read back); the second one is checked."""
    import sparsed_backend  # noqa: F401  (registers the "sparsed" attention)

    if device.type != "cuda":
        pytest.skip("torch.cuda.set_sync_debug_mode needs a CUDA device")
    model = model_for(kind, "sparsed", device)
    ids = prompts()[0].to(device)
    config = SparseDConfig(skip=0.25, select=0.5, block_size=16, min_sparse_len=0, reselect=reselect)
    cache = {} if kv_cache is None else {"kv_cache": kv_cache, "block_length": 16}
    run = lambda: GENERATE[kind](model, ids, sparsed=config, **args(kind, **cache))  # noqa: E731
    try:
        run()
        handle = model.register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error"))
        try:
            out = run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            handle.remove()
    finally:
        model.set_attn_implementation("sdpa")
    assert out.shape == (2, P + G)


def test_two_generations_compile_a_bounded_number_of_graphs():
    """FlexAttention compiles per distinct shape, not per layer or step: one generation over a
    4-layer model compiles exactly one graph (the one sparse shape every layer and step
    shares), and a second generation of the same shape compiles none."""
    import sparsed_backend  # noqa: F401  (registers the "sparsed" attention)
    from sparsed_backend._compat import compile_counters
    from sparsed_backend.models import LLaDAConfig, LLaDAModelLM
    from tiny_models import TINY

    def graphs() -> int:
        return compile_counters().get("stats", {}).get("unique_graphs", 0)

    torch.manual_seed(0)
    model = LLaDAModelLM(LLaDAConfig(**{**TINY["llada"], "n_layers": 4})).eval()
    model.set_attn_implementation("sparsed")
    ids, mask = prompts(3)
    ids, mask = torch.cat([ids, ids]), torch.cat([mask, mask])  # batch 4: a shape no other test uses
    config = SparseDConfig(skip=0.25, select=0.5, block_size=16, min_sparse_len=0)
    start = graphs()
    out = llada_generate(model, ids, mask, sparsed=config, return_dict_in_generate=True, **args("llada"))
    first = graphs() - start
    assert sorted(out.sparsed_state.layers) == [0, 1, 2, 3]
    again = llada_generate(model, ids, mask, sparsed=config, **args("llada"))
    assert torch.equal(again, out.sequences)
    assert first == 1, f"one generation compiled {first} graphs"
    assert graphs() - start == first, "the second generation recompiled"


# ------------------------------------------------------------------------------ bad input


LLADA_BAD = [
    ({"gen_length": 32, "block_length": 10}, ValueError, "gen_length must be divisible by block_length"),
    ({"steps": 5}, ValueError, r"steps must be divisible by the number of blocks .* = 2, got steps=5"),
    ({"steps": 0}, ValueError, "steps must be >= 1, got 0"),
    ({"steps": 8.0}, TypeError, "steps must be an int, got float"),
    ({"gen_length": 0}, ValueError, "gen_length must be >= 1, got 0"),
    ({"temperature": -0.5}, ValueError, r"temperature must be >= 0.0, got -0.5"),
    ({"cfg_scale": -1.0}, ValueError, r"cfg_scale must be >= 0.0, got -1.0"),
    ({"remasking": "lowest"}, ValueError, r"remasking must be one of .*low_confidence.*, got 'lowest'"),
    ({"sparsed": SparseDConfig()}, ValueError, r"attention implementation is 'sdpa', expected 'sparsed'"),
    ({"sparsed": {"select": 0.3}}, TypeError, "sparsed must be a SparseDConfig or None, got dict"),
]
DREAM_BAD = [
    ({"steps": 0}, ValueError, "steps must be >= 1, got 0"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1, got 0"),
    ({"max_new_tokens": True}, TypeError, "max_new_tokens must be an int, got bool"),
    ({"alg": "greedy"}, ValueError, r"alg must be one of .*entropy.*, got 'greedy'"),
    ({"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_k": 0}, ValueError, "top_k must be >= 1, got 0"),
    ({"temperature": -1.0}, ValueError, r"temperature must be >= 0.0, got -1.0"),
    ({"alg_temp": -0.1}, ValueError, r"alg_temp must be >= 0.0, got -0.1"),
    ({"eps": 0.0}, ValueError, r"eps must be in \(0, 1\), got 0.0"),
    ({"eps": 1.0}, ValueError, r"eps must be in \(0, 1\), got 1.0"),
    ({"sparsed": SparseDConfig()}, ValueError, r"attention implementation is 'sdpa', expected 'sparsed'"),
]


@pytest.mark.parametrize(
    ("kind", "overrides", "error", "match"),
    [("llada", *case) for case in LLADA_BAD] + [("dream", *case) for case in DREAM_BAD],
)
def test_bad_arguments_raise(kind, overrides, error, match):
    ids, mask = prompts()
    with pytest.raises(error, match=match):
        GENERATE[kind](model_for(kind), ids, mask, **args(kind, **overrides))


def _with_mask_token(ids, mask):
    ids = ids.clone()
    ids[1, -3] = MASK_ID
    return ids, mask


def _right_padded(ids, mask):
    return ids, mask.flip(-1)


BAD_INPUTS = [
    (_with_mask_token, ValueError, rf"prompt must not contain the mask token \(id {MASK_ID}\)"),
    (
        lambda ids, mask: (ids[:0], mask[:0]),
        ValueError,
        r"batch >= 1 and prompt length >= 1, got shape \(0, 16\)",
    ),
    (lambda ids, mask: (ids[:, :0], mask[:, :0]), ValueError, r"prompt length >= 1, got shape \(2, 0\)"),
    (
        lambda ids, mask: (ids[0], None),
        ValueError,
        r"input_ids must be 2D \(batch, prompt_len\), got shape \(16,\)",
    ),
    (
        lambda ids, mask: (ids.float(), mask),
        TypeError,
        "input_ids must hold integer token ids, got dtype torch.float32",
    ),
    (lambda ids, mask: (ids.tolist(), mask), TypeError, "input_ids must be a torch.Tensor, got list"),
    (lambda ids, mask: (ids, mask[:, 1:]), ValueError, r"attention_mask must be a tensor of shape \(2, 16\)"),
    (_right_padded, ValueError, "attention_mask must be LEFT padded"),
    (lambda ids, mask: (ids, mask * 2), ValueError, r"attention_mask must hold only 0 \(padding\) and 1"),
]


@pytest.mark.parametrize(("make", "error", "match"), BAD_INPUTS)
@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_bad_inputs_raise(kind, make, error, match):
    ids, mask = make(*prompts())
    with pytest.raises(error, match=match):
        GENERATE[kind](model_for(kind), ids, mask, **args(kind))


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_right_padding_error_says_how_to_fix_it(kind):
    ids, mask = _right_padded(*prompts())
    with pytest.raises(ValueError, match="LEFT padded") as err:
        GENERATE[kind](model_for(kind), ids, mask, **args(kind))
    assert 'tokenizer.padding_side = "left"' in str(err.value)
    assert 'padding_side="left"' in str(err.value)


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_prompt_longer_than_the_model_is_refused(kind):
    """Prompt + generated tokens past the position limit (max_position_embeddings, 256 here) raise,
    naming both numbers and saying that no RoPE scaling is on;
    exactly at the limit still runs."""
    model = model_for(kind)
    limit = model.config.max_position_embeddings
    assert limit == 256
    ids, mask = prompts()  # (2, 16)
    gen = "gen_length" if kind == "llada" else "max_new_tokens"
    too_long = {gen: limit - ids.shape[1] + 1, "steps": 1}
    if kind == "llada":
        too_long["block_length"] = too_long[gen]
    with pytest.raises(ValueError, match=rf"prompt length 16 \+ {gen} 241 = 257 tokens, more than the model's "
                                         rf"position limit of 256 \(no RoPE scaling\)"):  # fmt: skip
        GENERATE[kind](model, ids, mask, **too_long)
    fits = {k: v - 1 if k in (gen, "block_length") else v for k, v in too_long.items()}
    out = GENERATE[kind](model, ids, mask, **fits)
    assert out.shape == (2, limit)


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_causal_model_is_refused(kind):
    model = model_for(kind)
    module = next(m for m in model.modules() if hasattr(m, "is_causal"))
    module.is_causal = True
    try:
        with pytest.raises(ValueError, match=r"must be bidirectional \(is_causal=False\).*is_causal=True in"):
            GENERATE[kind](model, *prompts(), **args(kind))
    finally:
        module.is_causal = False
