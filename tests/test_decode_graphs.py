"""GraphedDecoder: CUDA graphs around eager attention compute what the model's forward computes.

On the CPU the decoder runs its pieces without capture (what a capture records); the CUDA test
captures them and compares whole generations."""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from sparsed_backend._validate import ArgumentTypeError, ArgumentValueError
from sparsed_backend.attention.prefix_selection import PrefixSparseConfig, PrefixSparseState
from sparsed_backend.sampling import block_diffusion
from sparsed_backend.sampling.block_cache import BlockDiffusionKVCache, cache_keyword
from sparsed_backend.sampling.block_diffusion import block_causal_mask, blockdiff_generate
from sparsed_backend.sampling.decode_graphs import GraphedDecoder

REFERENCE_DIR = Path(__file__).parent / "fixtures" / "sdar_reference"
MASK_ID = 99


def sdar_model(implementation: str, device="cpu", dtype=torch.float32) -> Qwen3ForCausalLM:
    """The tiny SDAR weights of the parity fixture (2 layers, 4 query / 2 kv heads, head_dim 16)."""
    fields = json.loads((REFERENCE_DIR / "config.json").read_text())
    fields = {k: v for k, v in fields.items() if k not in ("architectures", "model_type")}
    model = Qwen3ForCausalLM(Qwen3Config(**fields, attn_implementation=implementation)).eval()
    model.load_state_dict(load_file(REFERENCE_DIR / "model.safetensors"), strict=True)
    return model.to(device=device, dtype=dtype)


def prefilled(model, ids, block, **extra):
    """A cache holding the block-causal prefill of ``ids`` (B, P), P a multiple of ``block``."""
    cache = BlockDiffusionKVCache.for_model(model, ids.shape[0], ids.shape[1] + block)
    valid = torch.ones(ids.shape[0], ids.shape[1] + block, dtype=torch.bool)
    cache.prepare("commit", ids.shape[1])
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    mask = block_causal_mask(valid, 0, ids.shape[1], block)
    model(input_ids=ids, position_ids=positions, attention_mask=mask, **{cache_keyword(model): cache}, **extra)
    return cache, valid


def prompt_and_block(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of 2 prompts of 24 tokens, a 4-token block after them and the block's positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, MASK_ID, (2, 24), generator=g)
    block = torch.randint(2, MASK_ID, (2, 4), generator=g)
    return ids, block, torch.arange(24, 28).expand(2, 4)


@pytest.mark.parametrize("implementation", ["sdpa", "sparsed"])
def test_the_pieces_compute_the_models_forward(implementation):
    """A denoising forward through the decoder's pieces (uncaptured) equals the model's forward
    bit for bit, with the same cache writes; with the "sparsed" attention through a selecting
    step and a sparse step, whose selections are equal too."""
    model = sdar_model(implementation)
    ids, block, positions = prompt_and_block(seed=3)
    results = []
    for graphed in (False, True):
        state = PrefixSparseState(PrefixSparseConfig(select=0.5, block_size=4), padded=False)
        extra = {"prefix_state": state} if implementation == "sparsed" else {}
        cache, valid = prefilled(model, ids, 4, **extra)  # state.mode "dense": exact
        decoder = GraphedDecoder(model, 2, 4, capture=False)
        mask = block_causal_mask(valid, 24, 28, 4)
        logits = []
        for mode in ("score", "sparse"):
            if mode == "score":
                state.begin_block()
            state.mode = mode
            cache.prepare("denoise", 4)
            if graphed:
                logits.append(decoder(block, positions, mask, cache, **extra))
            else:
                kwargs = {cache_keyword(model): cache, **extra}
                logits.append(model(input_ids=block, position_ids=positions, attention_mask=mask, **kwargs).logits)
        results.append((logits, cache, state))
    (want, want_cache, want_state), (got, got_cache, got_state) = results
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(want_cache.keys, got_cache.keys) and torch.equal(want_cache.values, got_cache.values)
    if implementation == "sparsed":
        for i, sel in want_state.layers.items():
            assert torch.equal(sel.blocks, got_state.layers[i].blocks)


def test_a_commit_through_the_pieces_writes_the_models_keys_and_values():
    """A commit (no logits wanted) skips the last piece, which feeds only the LM head: it
    returns None and writes the cache the model's own forward writes, bit for bit."""
    model = sdar_model("sdpa")
    ids, block, positions = prompt_and_block(seed=5)
    caches = []
    for graphed in (False, True):
        cache, valid = prefilled(model, ids, 4)
        mask = block_causal_mask(valid, 24, 28, 4)
        cache.prepare("commit", 4)
        if graphed:
            decoder = GraphedDecoder(model, 2, 4, capture=False)
            ran = []
            piece = decoder._piece
            decoder._piece = lambda index, ran=ran, piece=piece: ran.append(index) or piece(index)
            assert decoder(block, positions, mask, cache, logits=False) is None
            assert ran == list(range(decoder.n_pieces - 1))  # one piece per layer, not the logits'
        else:
            model(input_ids=block, position_ids=positions, attention_mask=mask, **{cache_keyword(model): cache})
        caches.append(cache)
    assert torch.equal(caches[0].keys, caches[1].keys) and torch.equal(caches[0].values, caches[1].values)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize(
    "sparsed",
    [
        None,
        PrefixSparseConfig(select=0.3, block_size=4, per_kv_head=True),
        PrefixSparseConfig(select=0.3, block_size=4, per_kv_head=True, select_every=3),
        PrefixSparseConfig(select=0.3, block_size=4, per_kv_head=True, sparse_commit=True),
    ],
    ids=["dense", "sparse", "sparse_every_3", "sparse_commit"],
)
def test_the_sampler_with_the_decoder_decodes_the_same_tokens(monkeypatch, sparsed, padded):
    """blockdiff_generate(cuda_graphs=True) with the decoder's pieces run uncaptured decodes
    what the model's own forward decodes; the commits go through the decoder too (forwards of
    one block's length). A left-padded batch passes the block-causal mask; a batch with no
    padding passes none (every key is attendable). The kept blocks grow from 3 to 4 on the way,
    so the sparse step's buffers are rebuilt once."""
    implementation = "sdpa" if sparsed is None else "sparsed"
    model = sdar_model(implementation)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(2, MASK_ID, (2, 30), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :7] = 0
    masks = []
    args = {"gen_length": 24, "block_length": 4, "denoising_steps": 2, "mask_id": MASK_ID, "sparsed": sparsed}
    want = blockdiff_generate(model, ids, mask, **args)
    calls = []

    class Uncaptured(GraphedDecoder):
        def __init__(self, *a, **k):
            super().__init__(*a, **k, capture=False)

        def __call__(self, *a, **k):
            calls.append("step" if k.get("logits", True) else "commit")
            masks.append(a[2] is None)
            return super().__call__(*a, **k)

        def sparse_step(self, *a, **k):
            calls.append("sparse")
            return super().sparse_step(*a, **k)

    monkeypatch.setattr(block_diffusion, "GraphedDecoder", Uncaptured)
    got = blockdiff_generate(model, ids, mask, cuda_graphs=True, return_dict_in_generate=True, **args)
    assert torch.equal(got.sequences, want)
    # Every block's denoising steps and its commit went through the decoder; with sparsed, every
    # step but a selecting block's first through the whole-forward sparse step.
    blocks = len(got.block_steps)
    sparse_commits = blocks if sparsed is not None and sparsed.sparse_commit else 0  # whole-forward sparse steps
    assert calls.count("commit") + sparse_commits == blocks == 7
    sparse = 0
    if sparsed is not None:  # every step but a selecting block's first
        selecting = got.sparsed_state.selections
        sparse = sum(got.block_steps) - selecting
    assert sparse > 0 or sparsed is None
    assert set(masks) == {not padded}
    assert calls.count("sparse") == sparse + sparse_commits and calls.count("step") == sum(got.block_steps) - sparse


class _Whole(GraphedDecoder):
    """The decoder with ``whole=True``, uncaptured (the whole forwards run eagerly: SDPA for the
    exact attention, `prefix_block_mass` for the selecting steps' mass), counting its calls."""

    calls: list[str] = []

    def __init__(self, *a, **k):
        super().__init__(*a, **k, capture=False)

    def __call__(self, *a, **k):
        self.calls.append("piecewise")
        return super().__call__(*a, **k)

    def dense_step(self, *a, **k):
        self.calls.append("dense" if k.get("logits", True) else "dense_commit")
        return super().dense_step(*a, **k)

    def score_step(self, *a, **k):
        self.calls.append("score")
        return super().score_step(*a, **k)

    def sparse_step(self, *a, **k):
        self.calls.append("sparse" if k.get("logits", True) else "sparse_commit")
        return super().sparse_step(*a, **k)


def _whole_inputs(padded: bool):
    ids = torch.randint(2, MASK_ID, (2, 30), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :7] = 0
    return ids, mask


def _whole_run(monkeypatch, sparsed, padded: bool, reference):
    """(what the model's forward decodes with ``reference``, the whole-graph run's output, its
    decoder calls) for a 30-token batch decoding 24 tokens in blocks of 4."""
    model = sdar_model("sdpa" if sparsed is None else "sparsed")
    ids, mask = _whole_inputs(padded)
    args = {"gen_length": 24, "block_length": 4, "denoising_steps": 2, "mask_id": MASK_ID}
    want = blockdiff_generate(model, ids, mask, sparsed=reference, return_dict_in_generate=True, **args)
    monkeypatch.setattr(block_diffusion, "GraphedDecoder", _Whole)
    monkeypatch.setattr(_Whole, "calls", [])
    got = blockdiff_generate(model, ids, mask, sparsed=sparsed, cuda_graphs="whole", return_dict_in_generate=True,
                             **args)  # fmt: skip
    return want, got, _Whole.calls


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize(
    "sparsed",
    [
        None,
        PrefixSparseConfig(select=0.3, block_size=4, per_kv_head=True, scorer="fused"),
        PrefixSparseConfig(select=0.3, block_size=4, scorer="fused", select_every=3),
        PrefixSparseConfig(select=0.3, block_size=4, per_kv_head=True, scorer="fused", sparse_commit=True),
        PrefixSparseConfig(select=0.5, block_size=4, per_kv_head=True, scorer="fused", pattern="local"),
    ],
    ids=["dense", "sparse", "sparse_every_3", "sparse_commit", "local"],
)
def test_whole_forward_graphs_decode_the_same_tokens(monkeypatch, sparsed, padded):
    """cuda_graphs="whole" runs every forward of a block as one whole forward (uncaptured here):
    exact steps and commits through `dense_step`, selecting steps through `score_step`, which
    chooses the blocks itself, the rest through `sparse_step`. It decodes what the model's own
    forward decodes (with the separate scorer, whose mass the uncaptured selecting step
    computes), with the same selections' density, and no forward takes the piecewise path."""
    reference = None if sparsed is None else dataclasses.replace(sparsed, scorer="separate")
    want, got, calls = _whole_run(monkeypatch, sparsed, padded, reference)
    assert torch.equal(got.sequences, want.sequences)
    blocks, steps = len(got.block_steps), sum(got.block_steps)
    assert blocks == 7 and "piecewise" not in calls
    if sparsed is None:
        assert calls.count("dense") == steps and calls.count("dense_commit") == blocks
        return
    selections = got.sparsed_state.selections
    assert calls.count("score") == selections == (3 if sparsed.select_every == 3 else blocks)
    assert calls.count("sparse") == steps - selections
    commits = "sparse_commit" if sparsed.sparse_commit else "dense_commit"
    assert calls.count(commits) == blocks
    assert got.sparsed_state.density() == want.sparsed_state.density()
    for i, sel in want.sparsed_state.layers.items():  # the last selection, layer by layer
        assert torch.equal(got.sparsed_state.layers[i].blocks, sel.blocks)


@pytest.mark.parametrize("graphs", [True, "whole"])
def test_a_prefill_of_one_block_runs_the_models_forward(monkeypatch, graphs):
    """A prompt whose prefill is one block long (the length of the decoder's forwards), with a
    row that is all padding there, is prefilled by the model's forward, not through the graphs:
    every decoder call is a decoding step or a block's commit, and the tokens are the model's."""
    model = sdar_model("sdpa")
    ids = torch.randint(2, MASK_ID, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1: two tokens, no whole block; its prefill block is padding
    args = {"gen_length": 8, "block_length": 4, "denoising_steps": 2, "mask_id": MASK_ID}
    want = blockdiff_generate(model, ids, mask, **args)
    monkeypatch.setattr(block_diffusion, "GraphedDecoder", _Whole)
    monkeypatch.setattr(_Whole, "calls", [])
    got = blockdiff_generate(model, ids, mask, cuda_graphs=graphs, return_dict_in_generate=True, **args)
    assert torch.equal(got.sequences, want)
    # every denoising step and every decoded block's commit, and no prefill forward
    assert len(_Whole.calls) == sum(got.block_steps) + len(got.block_steps) and len(got.block_steps) == 3


def test_whole_graphs_say_once_when_selecting_steps_run_piecewise(monkeypatch):
    """A selecting step that cannot be one graph runs through the piecewise graphs, said once:
    the separate scorer (its attention changes shape with the prefix; this run) and the random
    pattern (its blocks are drawn on the host; the fused scorer it would need runs on CUDA
    only, so only the reason is checked). Every other forward is still whole, and the tokens
    are the model's."""
    from sparsed_backend import _warn

    random = PrefixSparseConfig(select=0.3, block_size=4, scorer="fused", pattern="random")
    assert block_diffusion.whole_scoring_refusal(random) == "pattern='random' draws its blocks on the host"
    monkeypatch.setattr(_warn, "_warned", set())
    sparsed = PrefixSparseConfig(select=0.3, block_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want, got, calls = _whole_run(monkeypatch, sparsed, False, sparsed)
    said = [str(w.message) for w in caught if "cuda_graphs='whole'" in str(w.message)]
    assert said == ["cuda_graphs='whole': the selecting steps run as piecewise graphs (they score with "
                    "scorer='fused' only, got scorer='separate'); every other forward is one graph"]  # fmt: skip
    assert torch.equal(got.sequences, want.sequences)
    assert calls.count("piecewise") == got.sparsed_state.selections == 7 and "score" not in calls


def test_cuda_graphs_refuses_what_it_cannot_run():
    """Asking for CUDA graphs off a CUDA device, for a model of another layout, with a value
    other than a bool, "piecewise" or "whole", or for whole graphs of a model with a
    sliding-window layer (they attend to every cached key) names the argument."""
    model = sdar_model("sdpa")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    args = {"gen_length": 4, "block_length": 4, "denoising_steps": 4, "mask_id": MASK_ID}
    if not torch.cuda.is_available():
        with pytest.raises(ArgumentValueError, match="CUDA device, got it on cpu") as info:
            blockdiff_generate(model, ids, cuda_graphs=True, **args)
        assert info.value.argument == "cuda_graphs"
    with pytest.raises(ArgumentTypeError, match="cuda_graphs must be a bool") as info:
        blockdiff_generate(model, ids, cuda_graphs="yes", **args)
    assert info.value.argument == "cuda_graphs"
    model.model.layers[1].self_attn.sliding_window = 8
    with pytest.raises(ArgumentValueError, match=r"layers \[1\] use a sliding window") as info:
        GraphedDecoder(model, 1, 4, capture=False, whole=True)
    assert info.value.argument == "cuda_graphs"
    del model.model.layers[0].self_attn.q_norm
    with pytest.raises(ArgumentValueError, match="Qwen3-layout") as info:
        GraphedDecoder(model, 1, 4, capture=False)
    assert info.value.argument == "cuda_graphs"


@functools.cache
def _cuda_available() -> bool:
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_available(), reason="needs CUDA (captures CUDA graphs)")
@pytest.mark.parametrize(("implementation", "block_size"), [("sdpa", None), ("sparsed", 4), ("sparsed", 16)])
def test_captured_graphs_decode_what_the_eager_forward_decodes(monkeypatch, implementation, block_size):
    """On CUDA, bf16: a generation with captured graphs (a left-padded batch, several blocks)
    decodes the eager forward's tokens, greedy and sampled with per-row generators. Sparse steps
    of 16-token prefix blocks run the block-sparse decode kernel in the graph; 4-token blocks
    are refused by it (said once) and gather the kept keys, as the eager steps do, so their
    tokens are equal. The kernel sums in another order than SDPA, so in bf16 a near tie can
    flip a greedy token and every later one of that row: its run must agree on 80% of the
    greedy tokens (the H200 run agreed on all but 2 of 48; a wrong kernel agrees by chance
    only), and its outputs are checked against the gather in `test_kernels.py`."""
    from sparsed_backend import _warn

    monkeypatch.setattr(_warn, "_warned", set())
    model = sdar_model(implementation, "cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(2, MASK_ID, (3, 37), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[2, :10] = 0
    sparsed = None
    if implementation == "sparsed":
        sparsed = PrefixSparseConfig(select=0.3, block_size=block_size, per_kv_head=True)
    refused = "block-sparse decode kernel cannot run these sparse steps (block_size 4 is neither"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _decode_both_ways(model, ids, mask, sparsed, exact=block_size != 16)
    said = [str(w.message) for w in caught if "block-sparse decode kernel" in str(w.message)]
    assert (len(said) == 1 and refused in said[0]) if block_size == 4 else not said


@pytest.mark.skipif(not _cuda_available(), reason="needs CUDA (captures CUDA graphs, the decode kernel)")
@pytest.mark.parametrize("sparsed", [None, PrefixSparseConfig(select=0.3, block_size=16, per_kv_head=True,
                                                              scorer="fused")], ids=["dense", "sparse"])  # fmt: skip
def test_whole_captured_graphs_decode_what_the_eager_forward_decodes(monkeypatch, sparsed):
    """On CUDA, bf16: cuda_graphs="whole" (every forward one graph; exact attention through the
    split-KV decode kernel, selecting steps through the fused kernel) decodes the eager
    forward's greedy tokens, up to the bf16 near ties the kernel's summation order may flip
    (agreement >= 80%, as for the piecewise kernel steps), and says nothing."""
    from sparsed_backend import _warn

    monkeypatch.setattr(_warn, "_warned", set())
    model = sdar_model("sdpa" if sparsed is None else "sparsed", "cuda", torch.bfloat16)
    ids = torch.randint(2, MASK_ID, (3, 37), generator=torch.Generator().manual_seed(9)).cuda()
    mask = torch.ones_like(ids)
    mask[2, :10] = 0
    args = {"gen_length": 16, "block_length": 4, "denoising_steps": 4, "mask_id": MASK_ID}
    eager_config = None if sparsed is None else dataclasses.replace(sparsed, scorer="separate")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want = blockdiff_generate(model, ids, mask, sparsed=eager_config, **args)
        got = blockdiff_generate(model, ids, mask, sparsed=sparsed, cuda_graphs="whole", **args)
    assert not [w for w in caught if "sparsed" in str(w.message) or "cuda_graphs" in str(w.message)]
    generated = slice(ids.shape[1], None)
    agree = (want[:, generated] == got[:, generated]).float().mean().item()
    assert agree >= 0.8, f"whole graphs agree with eager on {agree:.0%} of the greedy tokens"


def _decode_both_ways(model, ids, mask, sparsed, exact: bool) -> None:
    for temperature in (0.0, 1.0) if exact else (0.0,):
        args = {"gen_length": 16, "block_length": 4, "denoising_steps": 4, "mask_id": MASK_ID, "sparsed": sparsed,
                "temperature": temperature}  # fmt: skip
        runs = [
            blockdiff_generate(
                model,
                ids,
                mask,
                cuda_graphs=graphs,
                generator=[torch.Generator("cuda").manual_seed(s) for s in (1, 2, 3)],
                **args,
            )  # fmt: skip
            for graphs in (False, True)
        ]
        if exact:
            assert torch.equal(runs[0], runs[1]), f"temperature {temperature}"
        else:
            generated = slice(ids.shape[1], None)
            agree = (runs[0][:, generated] == runs[1][:, generated]).float().mean().item()
            assert agree >= 0.8, f"graphed kernel steps agree with eager on {agree:.0%} of the greedy tokens"


@pytest.mark.skipif(not _cuda_available(), reason="needs CUDA (the block-sparse decode kernel)")
@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("per_kv", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_the_kernel_sparse_step_computes_the_gathered_steps_logits(per_kv, padded, every):
    """The decoder's sparse step through the block-sparse decode kernel (kept blocks, offsets
    and attendable keys in its buffers) gives the gathered step's logits, step by step over a
    generation (fp32 model, uncaptured, both run on the same inputs; the kernel's dot products
    run in TF32 on CUDA, hence the tolerance). Checked the same way on the CPU under Triton's
    interpreter (exact fp32): max difference 1e-5 over 13 steps."""
    diffs = []

    class BothWays(GraphedDecoder):
        def __init__(self, *a, **k):
            super().__init__(*a, **k, capture=False)

        def sparse_step(self, ids, positions, key_valid, cache, state):
            self._set_inputs(ids, positions)
            self._cache = cache
            self.write_positions.copy_(torch.arange(cache.length, cache.length + self.tokens, device=ids.device))
            self._load_gathers(key_valid, state, True)
            self._sparse_forward()
            gathered = self.logits.clone()
            self._load_kept(key_valid, cache, state, True)
            self._sparse_forward()
            diffs.append((gathered - self.logits).abs().max().item())
            cache.written()
            return self.logits.clone()

    model = sdar_model("sparsed", "cuda", torch.float32)
    ids = torch.randint(2, MASK_ID, (2, 70), generator=torch.Generator().manual_seed(8)).cuda()
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :23] = 0
    config = PrefixSparseConfig(select=0.3, block_size=16, per_kv_head=per_kv, select_every=every)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(block_diffusion, "GraphedDecoder", BothWays)
        blockdiff_generate(model, ids, mask, gen_length=16, block_length=4, denoising_steps=4, mask_id=MASK_ID,
                           sparsed=config, cuda_graphs=True)  # fmt: skip
    assert len(diffs) >= 8 and max(diffs) < 5e-2, diffs
