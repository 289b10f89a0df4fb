"""Block diffusion (SDAR) on native Qwen3: parity with the official sampler (frozen reference in
fixtures/sdar_reference), the preallocated cache, argument errors, batches, seeds."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from sparsed_backend._validate import ArgumentTypeError, ArgumentValueError
from sparsed_backend.sampling.block_cache import BlockDiffusionKVCache, cache_keyword
from sparsed_backend.sampling.block_diffusion import block_causal_mask, blockdiff_generate, planned_steps

REFERENCE_DIR = Path(__file__).parent / "fixtures" / "sdar_reference"
REFERENCE = json.loads((REFERENCE_DIR / "reference.json").read_text())
MASK_ID = REFERENCE["mask_id"]
CASES = {case["name"]: case for case in REFERENCE["cases"]}


@functools.cache
def sdar_model(implementation: str = "sdpa") -> Qwen3ForCausalLM:
    """The reference's tiny SDAR weights in transformers' own Qwen3ForCausalLM."""
    fields = json.loads((REFERENCE_DIR / "config.json").read_text())
    fields = {k: v for k, v in fields.items() if k not in ("architectures", "model_type")}
    model = Qwen3ForCausalLM(Qwen3Config(**fields, attn_implementation=implementation)).eval()
    model.load_state_dict(load_file(REFERENCE_DIR / "model.safetensors"), strict=True)
    return model


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def case_kwargs(case: dict) -> dict:
    dynamic = case["remasking_strategy"] == "low_confidence_dynamic"
    return {
        "gen_length": case["gen_length"],
        "block_length": case["block_length"],
        "denoising_steps": case["denoising_steps"],
        "remasking": case["remasking_strategy"],
        "threshold": case["confidence_threshold"] if dynamic else None,
        "temperature": case["temperature"],
        "top_k": case.get("top_k", 0),
        "top_p": case.get("top_p", 1.0),
        "eos_token_id": case.get("stop_token_ids"),
        "mask_id": MASK_ID,
    }


# ------------------------------------------------------------------------- parity with SDAR


def test_sdar_checkpoint_loads_into_native_qwen3_without_renaming():
    state = load_file(REFERENCE_DIR / "model.safetensors")
    model = sdar_model()
    assert set(state) == set(model.state_dict())  # strict load above: no missing or unexpected key
    assert all(t == "full_attention" for t in model.config.layer_types)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_official_sdar_sampler(name, implementation):
    """Token for token what SDAR's block_diffusion_generate produced with its own modeling code
    (each prompt alone, torch.manual_seed(seed)); batches run left padded, one generator per row."""
    case = CASES[name]
    prompts = [row["prompt"] for row in case["rows"]]
    ids, mask = left_padded(prompts)
    generators = [torch.Generator().manual_seed(row["seed"]) for row in case["rows"]]
    out = blockdiff_generate(
        sdar_model(implementation), ids, mask, generator=generators, return_dict_in_generate=True, **case_kwargs(case)
    )
    gen = case["gen_length"]
    for r, row in enumerate(case["rows"]):
        p = len(row["prompt"])
        assert out.sequences[r, ids.shape[1] :].tolist() == row["sequence"][p : p + gen], f"row {r}"
        assert out.sequences[r, ids.shape[1] - p : ids.shape[1]].tolist() == row["prompt"]
    if case["remasking_strategy"] == "low_confidence_dynamic":  # the threshold decided something
        assert min(out.block_steps[1:]) < case["denoising_steps"], out.block_steps
    if name.endswith("_stop"):
        assert out.sequences[0, -1] == MASK_ID  # stopped: the blocks after the stop stay masked


# --------------------------------------------------------------------------------- the cache


def test_cache_commit_and_denoise_write_in_place():
    torch.manual_seed(0)
    cache = BlockDiffusionKVCache(2, 1, 2, 12, 4, dtype=torch.float32, device="cpu")
    storage = (cache.keys.data_ptr(), cache.values.data_ptr())
    prefix = torch.randn(1, 2, 4, 4)
    cache.prepare("commit", 4)
    for layer in range(2):
        k, v = cache.update(prefix + layer, -prefix, layer)
        assert k.shape == (1, 2, 4, 4) and k.data_ptr() == cache.keys[layer].data_ptr()
    assert cache.length == 4 and cache.commits == 1
    for step in range(3):  # denoising steps overwrite the same scratch block
        block = torch.full((1, 2, 4, 4), float(step))
        cache.prepare("denoise", 4)
        for layer in range(2):
            k, v = cache.update(block, block, layer)
            assert k.shape == (1, 2, 8, 4) and k.data_ptr() == cache.keys[layer].data_ptr()
            torch.testing.assert_close(k[:, :, :4], prefix + layer)  # the prefix untouched
            torch.testing.assert_close(k[:, :, 4:], block)
        assert cache.length == 4
    assert (cache.keys.data_ptr(), cache.values.data_ptr()) == storage
    assert cache.denoises == 3


def test_cache_capacity_and_misuse_errors():
    cache = BlockDiffusionKVCache(1, 1, 1, 8, 2, dtype=torch.float32, device="cpu")
    cache.prepare("commit", 6)
    cache.update(torch.zeros(1, 1, 6, 2), torch.zeros(1, 1, 6, 2), 0)
    with pytest.raises(ArgumentValueError, match=r"max_length=8 .* 6 committed \+ 4 new would need 10") as err:
        cache.prepare("denoise", 4)
    assert err.value.argument == "max_length"
    with pytest.raises(RuntimeError, match="before prepare"):
        cache.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0)
    cache.prepare("denoise", 2)
    with pytest.raises(ValueError, match="announced 2 new positions, the forward gave 3"):
        cache.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), 0)
    with pytest.raises(ArgumentValueError, match="forward must be 'commit' or 'denoise', got 'append'"):
        cache.prepare("append", 1)


def test_sampler_attends_views_of_one_preallocated_cache(monkeypatch):
    """Every K/V the attention reads is a view into the storage allocated once: no step copies
    or concatenates the prefix."""
    seen = []
    update = BlockDiffusionKVCache.update

    def spy(self, key, value, layer_idx, *args, **kwargs):
        k, v = update(self, key, value, layer_idx, *args, **kwargs)
        seen.append(
            (k.data_ptr() == self.keys[layer_idx].data_ptr(), v.data_ptr() == self.values[layer_idx].data_ptr())
        )
        seen.append((self.keys.data_ptr(), self.values.data_ptr()))
        return k, v

    monkeypatch.setattr(BlockDiffusionKVCache, "update", spy)
    ids, mask = left_padded([[5, 17, 42, 8, 23, 64, 11], [31, 7, 88]])
    blockdiff_generate(sdar_model(), ids, mask, gen_length=8, block_length=4, denoising_steps=4, mask_id=MASK_ID)
    views, storages = seen[0::2], seen[1::2]
    assert len(views) > 2 * 8 and all(a and b for a, b in views)
    assert len(set(storages)) == 1


@pytest.mark.parametrize("implementation", ["sdpa", "sparsed"])
def test_every_attention_call_runs_in_the_decode_kernel_order(monkeypatch, implementation):
    """Dense and sparse runs steer SDPA alike (policy.decode_kernels) in the prefill, the commits
    and the denoising steps, so they share those kernels."""
    import contextlib

    from sparsed_backend.attention import policy
    from sparsed_backend.attention.prefix_selection import PrefixSparseConfig

    depth, calls = [0], []
    real_order, real_sdpa = policy.decode_kernels, torch.nn.functional.scaled_dot_product_attention

    @contextlib.contextmanager
    def order(query):
        depth[0] += 1
        with real_order(query):
            yield
        depth[0] -= 1

    def sdpa(*args, **kwargs):
        calls.append(depth[0])
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(policy, "decode_kernels", order)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    ids, mask = left_padded([[5, 17, 42, 8, 23, 64, 11], [31, 7, 88]])
    sparsed = PrefixSparseConfig(select=0.5, block_size=16) if implementation == "sparsed" else None
    blockdiff_generate(sdar_model(implementation), ids, mask, gen_length=8, block_length=4, denoising_steps=4,
                       mask_id=MASK_ID, sparsed=sparsed)  # fmt: skip
    assert len(calls) > 8 and all(d > 0 for d in calls)


def test_denoise_step_matches_a_full_block_causal_forward():
    """A cached denoising forward (block against committed prefix) gives the logits of the whole
    canvas run without a cache under the block-causal mask."""
    model = sdar_model()
    torch.manual_seed(1)
    ids = torch.randint(0, MASK_ID, (2, 12))
    ids[:, 8:10] = MASK_ID
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :4] = False  # row 1: one block of padding
    positions = (torch.arange(12) - 4 * (~valid[:, :1]).long()).clamp_min(0)  # (B, 12)
    full = model(input_ids=ids, position_ids=positions, attention_mask=block_causal_mask(valid, 0, 12, 4)).logits
    cache = BlockDiffusionKVCache.for_model(model, 2, 12)
    kw = cache_keyword(model)
    cache.prepare("commit", 8)
    model(
        input_ids=ids[:, :8],
        position_ids=positions[:, :8],
        attention_mask=block_causal_mask(valid, 0, 8, 4),
        **{kw: cache},
    )
    cache.prepare("denoise", 4)
    step = model(
        input_ids=ids[:, 8:],
        position_ids=positions[:, 8:],
        attention_mask=block_causal_mask(valid, 8, 12, 4),
        **{kw: cache},
    ).logits
    torch.testing.assert_close(step, full[:, 8:], atol=1e-5, rtol=1e-5)


def test_block_causal_mask_pattern():
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    keep = block_causal_mask(valid, 2, 6, 2)  # queries 2..5, keys 0..5, blocks of 2
    assert keep.shape == (2, 1, 4, 6)
    expected = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]).bool()
    assert torch.equal(keep[0, 0], expected)
    expected[:, :2] = False  # row 1's padding is never attended
    assert torch.equal(keep[1, 0], expected)
    pad_query = block_causal_mask(valid, 0, 2, 2)[1, 0]  # padding queries keep only themselves
    assert torch.equal(pad_query, torch.eye(2, dtype=torch.bool))


# ---------------------------------------------------------------------------- bad arguments

GOOD = {"gen_length": 8, "block_length": 4, "denoising_steps": 4, "mask_id": MASK_ID}


@pytest.mark.parametrize(
    ("changes", "error", "argument", "match"),
    [
        ({"remasking": "entropy_bounded"}, ArgumentValueError, "remasking", "remasking must be one of"),
        ({"remasking": "low_confidence_dynamic"}, ArgumentValueError, "threshold", "needs a threshold"),
        ({"threshold": 0.9}, ArgumentValueError, "threshold", "only used by remasking='low_confidence_dynamic'"),
        (
            {"remasking": "low_confidence_dynamic", "threshold": 1.5},
            ArgumentValueError,
            "threshold",
            r"threshold must be in \[0.0, 1.0\], got 1.5",
        ),
        ({"temperature": -1.0}, ArgumentValueError, "temperature", "temperature must be >= 0.0, got -1.0"),
        ({"top_k": -1}, ArgumentValueError, "top_k", "top_k must be >= 0, got -1"),
        ({"top_k": 2.5}, ArgumentTypeError, "top_k", "top_k must be an int, got float"),
        ({"top_p": 0.0}, ArgumentValueError, "top_p", r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, ArgumentValueError, "top_p", "top_p must be in"),
        ({"block_length": 0}, ArgumentValueError, "block_length", "block_length must be >= 1, got 0"),
        ({"gen_length": 0}, ArgumentValueError, "gen_length", "gen_length must be >= 1, got 0"),
        ({"denoising_steps": 0}, ArgumentValueError, "denoising_steps", "denoising_steps must be >= 1, got 0"),
        ({"eos_token_id": MASK_ID}, ArgumentValueError, "eos_token_id", "must not be the mask token"),
        ({"eos_token_id": "eos"}, ArgumentTypeError, "eos_token_id", "eos_token_id must be None, an int or"),
        ({"eos_token_id": [1, -2]}, ArgumentValueError, "eos_token_id", "eos_token_id must be >= 0, got -2"),
        ({"generator": [torch.Generator()]}, ArgumentValueError, "generator", "one per row expected, got 1"),
        ({"generator": 7}, ArgumentTypeError, "generator", "generator must be None, a torch.Generator"),
        ({"mask_id": -1}, ArgumentValueError, "mask_id", "mask_id must be >= 0, got -1"),
    ],
)
def test_bad_arguments_name_the_argument(changes, error, argument, match):
    ids, mask = left_padded([[5, 6, 7], [8, 9]])
    with pytest.raises(error, match=match) as err:
        blockdiff_generate(sdar_model(), ids, mask, **{**GOOD, **changes})
    assert err.value.argument == argument


def test_bad_prompts_and_models_are_refused():
    ids, mask = left_padded([[5, 6, 7], [8, 9]])
    with pytest.raises(ArgumentValueError, match="LEFT padded") as err:
        blockdiff_generate(sdar_model(), ids, mask.flip(-1), **GOOD)
    assert err.value.argument == "attention_mask"
    with pytest.raises(ValueError, match=f"must not contain the mask token \\(id {MASK_ID}\\)"):
        blockdiff_generate(sdar_model(), torch.tensor([[5, MASK_ID, 7]]), **GOOD)
    other = Qwen3ForCausalLM(Qwen3Config(**{**sdar_model().config.to_dict(), "attn_implementation": "flex_attention"}))
    with pytest.raises(NotImplementedError, match="'sdpa', 'eager' or 'sparsed', got 'flex_attention'"):
        blockdiff_generate(other, ids, mask, **GOOD)
    fields = {**sdar_model().config.to_dict(), "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
    fields.pop("layer_types", None)  # recomputed from use_sliding_window
    windowed = Qwen3ForCausalLM(Qwen3Config(**fields))
    with pytest.raises(NotImplementedError, match=r"layers \[1\] of this model use sliding-window attention"):
        blockdiff_generate(windowed, ids, mask, **GOOD)
    with pytest.raises(ValueError, match="position limit of 256"):
        blockdiff_generate(sdar_model(), ids, mask, **{**GOOD, "gen_length": 300})


# ----------------------------------------------------------------------- batches and seeds

PROMPTS = [[5, 17, 42], [31, 7, 88, 2, 45, 60], [12, 70, 3, 56, 91, 34, 19, 77, 40]]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"remasking": "low_confidence_static", "denoising_steps": 2},
        {"remasking": "low_confidence_dynamic", "threshold": 0.3, "eos_token_id": [60, 15]},
        {"remasking": "sequential", "temperature": 1.0, "top_k": 10, "top_p": 0.9},
    ],
    ids=["greedy-static", "greedy-dynamic-eos", "sampled-sequential"],
)
def test_left_padded_rows_equal_the_prompts_run_alone(kwargs):
    """Each row of a left-padded batch (prompt lengths 3, 6 and 9 against blocks of 4: three
    block alignments) equals that prompt run alone; the padding's token ids do not matter."""
    args = {"gen_length": 10, "block_length": 4, "denoising_steps": 4, "mask_id": MASK_ID, **kwargs}
    seeds = [11, 12, 13]
    alone = [
        blockdiff_generate(sdar_model(), torch.tensor([p]), generator=torch.Generator().manual_seed(s), **args)[0]
        for p, s in zip(PROMPTS, seeds, strict=True)
    ]
    for pad in (0, 98):
        ids, mask = left_padded(PROMPTS, pad)
        out = blockdiff_generate(
            sdar_model(), ids, mask, generator=[torch.Generator().manual_seed(s) for s in seeds], **args
        )
        for r, row in enumerate(alone):
            assert out[r, ids.shape[1] :].tolist() == row[len(PROMPTS[r]) :].tolist(), f"row {r}, pad {pad}"


def test_seeded_sampling_is_reproducible():
    ids, mask = left_padded(PROMPTS[:2])
    args = {**GOOD, "gen_length": 12, "temperature": 1.0, "remasking": "low_confidence_dynamic", "threshold": 0.5}
    runs = [
        blockdiff_generate(sdar_model(), ids, mask, generator=torch.Generator().manual_seed(seed), **args)
        for seed in (3, 3, 4)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert not (runs[0][:, ids.shape[1] :] == MASK_ID).any()


@pytest.mark.parametrize(
    ("masked", "schedule", "steps"),
    [([4], [1, 1, 1, 1], 4), ([1, 4], [1, 1, 1, 1], 4), ([1, 2], [1, 1, 1, 1], 2), ([3], [2, 2], 2),
     ([2], [2, 2], 1), ([0, 0], [1, 1], 0), ([5], [2, 2, 1], 3)],
)  # fmt: skip
def test_planned_steps_run_until_the_most_masked_row_is_done(masked, schedule, steps):
    assert planned_steps(masked, schedule) == steps


@pytest.mark.parametrize(
    "kwargs",
    [{"denoising_steps": 4}, {"denoising_steps": 2}, {"remasking": "sequential"},
     {"remasking": "low_confidence_dynamic", "threshold": 0.3}, {"temperature": 1.0}],
    ids=["static", "static-2-steps", "sequential", "dynamic", "sampled"],
)  # fmt: skip
def test_planned_steps_skip_read_backs_and_change_nothing(monkeypatch, kwargs):
    """A greedy schedule with fixed counts runs its planned steps without reading the masks
    back (one read-back per block, after the plan), and decodes what reading back at every step
    decodes: same tokens, steps and forwards. Dynamic counts and sampling read back every step."""
    from sparsed_backend.sampling import block_diffusion

    ids, mask = left_padded(PROMPTS)  # tails of 3, 2 and 1 against blocks of 4
    args = {"gen_length": 10, "block_length": 4, "denoising_steps": 4, "mask_id": MASK_ID,
            "return_dict_in_generate": True, **kwargs}  # fmt: skip
    runs, read_backs = [], []
    real_tolist = torch.Tensor.tolist
    for plan in (True, False):
        count = [0]

        def tolist(tensor, count=count):
            count[0] += 1
            return real_tolist(tensor)

        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "tolist", tolist)
            if not plan:
                patch.setattr(block_diffusion, "planned_steps", lambda masked, schedule: 0)
            g = torch.Generator().manual_seed(5)
            runs.append(blockdiff_generate(sdar_model(), ids, mask, generator=g, **args))
        read_backs.append(count[0])
    (planned, every), (with_plan, without) = runs, read_backs
    assert torch.equal(planned.sequences, every.sequences)
    assert planned.block_steps == every.block_steps and planned.num_forwards == every.num_forwards
    fixed = kwargs.get("remasking") != "low_confidence_dynamic" and kwargs.get("temperature", 0) == 0
    assert without - with_plan == (sum(every.block_steps) if fixed else 0)


def test_a_mask_token_written_by_the_model_is_decoded_after_the_schedule():
    """SDAR writes a predicted mask token like any token (the position stays masked) and then
    indexes past its schedule; here one more step decodes what is left, the mask ruled out."""
    model = sdar_model()
    calls = []

    def first_step_predicts_mask(_module, _inputs, logits):
        calls.append(logits.shape[1])
        if calls.count(4) == 1 and logits.shape[1] == 4:  # the first denoising step (commits keep 1 logit)
            logits[..., MASK_ID] = 1e4

    hook = model.get_output_embeddings().register_forward_hook(first_step_predicts_mask)
    try:
        out = blockdiff_generate(model, torch.tensor([[5, 17, 42, 8]]), return_dict_in_generate=True, **GOOD)
    finally:
        hook.remove()
    assert out.block_steps == (5, 4)  # 4 scheduled steps, the first wrote a mask, then one more
    assert not (out.sequences == MASK_ID).any()
    assert out.num_forwards == 1 + (5 + 1) + (4 + 1)  # prefill, then each block's steps and commit


@pytest.mark.parametrize("chunk", [4, 9, 12])
def test_a_prefill_in_chunks_decodes_what_one_prefill_decodes(chunk):
    """prefill_chunk splits a long prompt's prefill into commits of whole blocks (4 and 8 of the 4-token
    blocks here; 9 rounds down to 8): the cache, and so every decoded token, is the one-forward
    prefill's."""
    ids, mask = left_padded([list(range(5, 30)), list(range(40, 58))])
    kwargs = {**GOOD, "gen_length": 8, "return_dict_in_generate": True}
    whole = blockdiff_generate(sdar_model(), ids, mask, **kwargs)
    parts = blockdiff_generate(sdar_model(), ids, mask, prefill_chunk=chunk, **kwargs)
    assert torch.equal(parts.sequences, whole.sequences)
    prefill = 24 // (chunk // 4 * 4)  # 6 prompt blocks, then 2 decoded blocks of (steps + commit)
    assert parts.num_forwards - whole.num_forwards == prefill - 1
