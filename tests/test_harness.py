"""lm-evaluation-harness support: the MC likelihood, the sparsed-dlm model, sparsed-eval, the task.

Tests that need lm_eval skip with a reason where it is missing (``pip install -e ".[eval]"``);
nox's tests session installs it, so they run in CI.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sparsed_backend import _warn
from sparsed_backend._validate import ArgumentValueError
from sparsed_backend.attention.prefix_selection import PrefixSparseConfig
from sparsed_backend.demo import model_path
from sparsed_backend.demo.task import sample_prompts
from sparsed_backend.harness.likelihood import draw_masks, masked_loglikelihood
from sparsed_backend.harness.task_data import (
    DOCS_PER_LENGTH,
    LENGTHS,
    MIXED_DOCS,
    MIXED_RANGE,
    MIXED_SEED,
    SEED_BASE,
    load_docs,
    make_docs,
    mixed_lengths,
)
from tiny_models import MASK_ID, PAD_ID, tiny_model, write_blockdiff_checkpoint

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
NO_LM_EVAL = "lm_eval is not installed (pip install -e '.[eval]'); nox -s tests installs it"


def _lm_eval():
    return pytest.importorskip("lm_eval", reason=NO_LM_EVAL)


def _bin(name: str) -> str:
    """A console script of the running interpreter's environment."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.skip(f"{name} is not installed next to {sys.executable} (pip install -e '.[eval]')")
    return str(path)


# --------------------------------------------------------------------------- Monte Carlo likelihood


def exact_bound(model, context, continuation, shifted):
    """Mean and standard deviation of one sample of the estimator, by enumerating every
    (l, subset) with its probability 1/L * 1/C(L, l)."""
    L = len(continuation)
    mean = second = 0.0
    for n_masked in range(1, L + 1):
        subsets = list(itertools.combinations(range(L), n_masked))
        for subset in subsets:
            x = context + [MASK_ID if i in subset else t for i, t in enumerate(continuation)]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0].double(), -1)
            start = len(context) - (1 if shifted else 0)
            value = L / n_masked * sum(float(logp[start + i, continuation[i]]) for i in subset)
            p = 1 / L / len(subsets)
            mean += p * value
            second += p * value * value
    return mean, math.sqrt(max(second - mean * mean, 0.0))


def _requests(seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = lambda n: torch.randint(2, 120, (n,), generator=g).tolist()
    # Different context and continuation lengths, so that packed batches need padding.
    return [(ctx(9), ctx(2)), (ctx(5), ctx(1)), (ctx(13), ctx(3))]


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_mc_estimate_converges_to_the_exact_expectation(kind):
    model = tiny_model(kind)
    requests = _requests()
    exact = [exact_bound(model, c, x, kind == "dream") for c, x in requests]
    assert exact[1][1] < 1e-9  # one token: always masked, weight 1, no variance
    errors = []
    for n in (8, 64, 1024):
        est = masked_loglikelihood(model, requests, mask_id=MASK_ID, pad_id=PAD_ID, mc_samples=n, batch_size=256,
                                   seed=7, shifted=kind == "dream")  # fmt: skip
        for (value, _), (mean, sd) in zip(est, exact, strict=True):
            assert abs(value - mean) <= 4 * sd / math.sqrt(n) + 1e-4, (n, value, mean, sd)
        errors.append(abs(est[2][0] - exact[2][0]))
    # The 3-token request's error shrinks with the samples (its sd is far from 0).
    assert exact[2][1] > 0.1 and errors[-1] < 4 * exact[2][1] / 32 + 1e-4


def test_mc_estimate_is_reproducible_and_independent_of_batching():
    model = tiny_model("llada")
    requests = _requests(1)
    run = lambda **kw: masked_loglikelihood(model, requests, mask_id=MASK_ID, pad_id=PAD_ID, **kw)
    a = run(mc_samples=32, batch_size=8, seed=3)
    assert a == run(mc_samples=32, batch_size=8, seed=3)
    b = run(mc_samples=32, batch_size=5, seed=3)
    assert [x[0] for x in b] == pytest.approx([x[0] for x in a], abs=1e-4)
    reordered = masked_loglikelihood(model, requests[::-1], mask_id=MASK_ID, pad_id=PAD_ID, mc_samples=32,
                                     batch_size=8, seed=3)[::-1]  # fmt: skip
    assert [x[0] for x in reordered] == pytest.approx([x[0] for x in a], abs=1e-4)
    c = run(mc_samples=32, batch_size=8, seed=4)
    assert c[2][0] != a[2][0]  # another seed, other masks (the 1-token request has only one)


def test_greedy_flag_is_the_argmax_of_the_fully_masked_continuation():
    model = tiny_model("llada")
    context = _requests()[0][0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + [MASK_ID] * 3])).logits[0]
    best = logits[len(context) :].argmax(-1).tolist()
    other = [best[0], best[1], (best[2] + 1) % 100 + 2]
    out = masked_loglikelihood(model, [(context, best), (context, other)], mask_id=MASK_ID, pad_id=PAD_ID,
                               mc_samples=4, batch_size=10, seed=0)  # fmt: skip
    assert [g for _, g in out] == [True, False]


def test_draw_masks_counts_are_uniform_and_never_empty():
    masks = draw_masks(4, 4000, torch.Generator().manual_seed(0))
    counts = masks.sum(-1)
    assert counts.min() == 1 and counts.max() == 4
    share = torch.bincount(counts, minlength=5)[1:].float() / 4000
    assert torch.allclose(share, torch.full((4,), 0.25), atol=0.03)
    assert torch.allclose(masks.float().mean(0), torch.full((4,), 2.5 / 4), atol=0.03)  # positions alike


def test_mc_estimate_rejects_bad_requests():
    model = tiny_model("llada")
    kw = {"mask_id": MASK_ID, "pad_id": PAD_ID, "mc_samples": 2, "batch_size": 2, "seed": 0}
    with pytest.raises(ValueError, match=r"requests\[0\]: the context must hold at least one token"):
        masked_loglikelihood(model, [([], [5])], **kw)
    with pytest.raises(ValueError, match=r"requests\[1\]: the continuation must hold at least one token"):
        masked_loglikelihood(model, [([4], [5]), ([4], [])], **kw)
    with pytest.raises(ValueError, match=r"requests\[0\] contains the mask token \(id 127\)"):
        masked_loglikelihood(model, [([4, MASK_ID], [5])], **kw)


# ------------------------------------------------------------------------------------- task data


def test_shipped_task_data_is_the_seeded_draw_and_tokenizes_to_the_prompt_ids():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path())
    for n in LENGTHS:
        docs = load_docs(n)
        assert len(docs) == DOCS_PER_LENGTH and docs == make_docs(n)
        prompts = sample_prompts(n, DOCS_PER_LENGTH, seed=SEED_BASE + n)
        for i in (0, 1, DOCS_PER_LENGTH - 1):
            # The text the task feeds the model encodes to exactly the task's prompt (BOS added).
            assert tok(docs[i]["prompt"])["input_ids"] == prompts.input_ids[i].tolist()
            assert tok(docs[i]["answer"], add_special_tokens=False)["input_ids"] == prompts.answers[i].tolist()
            assert tok.decode(prompts.answers[i].tolist()) == docs[i]["answer"]
            assert docs[i]["record_pos"] == int(prompts.record_pos[i])


def test_task_prompts_are_not_the_other_evaluations_prompts():
    ours = sample_prompts(1024, DOCS_PER_LENGTH, seed=SEED_BASE + 1024).input_ids[:4]
    for other in (5000, 9000):  # training's final evaluation, the fidelity benchmark
        theirs = sample_prompts(1024, 256, seed=other + 1024).input_ids[:4]
        assert all(not torch.equal(ours[i], theirs[j]) for i in range(4) for j in range(4))
    with pytest.raises(ValueError, match=r"split must be one of \(1024, 2048, 4096, 'mixed'\), got 512"):
        make_docs(512)
    with pytest.raises(ValueError, match=r"split must be one of .*, got 1024.0"):
        load_docs(1024.0)


def test_mixed_task_lengths_are_distinct_and_spread_over_the_range():
    lengths = mixed_lengths()
    docs = load_docs("mixed")
    assert [d["prompt_tokens"] for d in docs] == lengths and [d["doc_id"] for d in docs] == list(range(MIXED_DOCS))
    assert len(docs) == MIXED_DOCS == 300 and len(set(lengths)) == MIXED_DOCS  # every length its own shape
    low, high = MIXED_RANGE
    assert low <= min(lengths) and max(lengths) <= high
    # Uniform over the range: each sixth holds 50 +- ~7 prompts; 30-70 is far outside chance (fixed seed).
    counts = torch.histc(torch.tensor(lengths, dtype=torch.float), bins=6, min=low, max=high + 1)
    assert (counts >= 30).all() and (counts <= 70).all(), counts
    assert sorted(lengths) != lengths and sorted(lengths, reverse=True) != lengths  # not grouped by length


def test_shipped_mixed_task_is_the_seeded_draw_and_tokenizes_to_the_prompt_ids():
    from transformers import AutoTokenizer

    from sparsed_backend.demo.task import KEY_BASE, N_KEYS, VALUE_BASE, VALUE_LEN

    docs = load_docs("mixed")
    assert docs == make_docs("mixed")  # regenerating gives the shipped file exactly
    tok = AutoTokenizer.from_pretrained(model_path())
    for i in (0, 1, 150, MIXED_DOCS - 1):
        prompts = sample_prompts(docs[i]["prompt_tokens"], 1, seed=MIXED_SEED + 1 + i)
        ids = tok(docs[i]["prompt"])["input_ids"]
        assert ids == prompts.input_ids[0].tolist() and len(ids) == docs[i]["prompt_tokens"]
        answer = tok(docs[i]["answer"], add_special_tokens=False)["input_ids"]
        assert answer == prompts.answers[0].tolist() and len(answer) == VALUE_LEN
        assert all(t >= VALUE_BASE for t in answer)  # value symbols only
        assert KEY_BASE <= ids[-1] < KEY_BASE + N_KEYS and ids[-2] == tok.convert_tokens_to_ids("?")
        pos = docs[i]["record_pos"]
        assert ids[pos] == ids[-1] and ids[pos + 1 : pos + 1 + VALUE_LEN] == answer  # the asked record's value


def test_mixed_task_seeds_are_apart_from_every_other_split():
    # Other prompt seeds are base + n for a length n <= 4096: 5000 (training's final evaluation),
    # 9000 (the fidelity benchmark), SEED_BASE (the fixed-length splits). The mixed split's seeds
    # MIXED_SEED .. MIXED_SEED + MIXED_DOCS lie above all of them.
    assert max(5000, 9000, SEED_BASE) + MIXED_RANGE[1] < MIXED_SEED
    n = mixed_lengths()[0]
    ours = sample_prompts(n, 1, seed=MIXED_SEED + 1).input_ids[0]
    for other in (5000, 9000, SEED_BASE):  # the other evaluations' prompts of the same length differ
        theirs = sample_prompts(n, 4, seed=other + n).input_ids
        assert all(not torch.equal(ours, row) for row in theirs)


def test_lm_eval_resolves_the_mixed_task_outside_the_group():
    _lm_eval()
    from lm_eval.tasks import TaskManager

    from sparsed_backend.harness import tasks_dir

    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    loaded = manager.load(["sparsed_retrieval_mixed", "sparsed_retrieval"])
    # The group's score is unchanged: its members are the three fixed lengths, as before.
    assert loaded["group_map"] == {"sparsed_retrieval": [f"sparsed_retrieval_{n}" for n in LENGTHS]}
    tasks = loaded["tasks"]
    task = tasks["sparsed_retrieval_mixed"]
    docs = list(task.test_docs())
    assert len(docs) == MIXED_DOCS and task.doc_to_text(docs[7]) == load_docs("mixed")[7]["prompt"]
    assert task.doc_to_target(docs[7]) == load_docs("mixed")[7]["answer"]


# ---------------------------------------------------------------------------- the sparsed-dlm model


@pytest.fixture(scope="module")
def harness_model():
    _lm_eval()
    from sparsed_backend.harness import model

    return model


def _make(harness_model, **kw):
    kw.setdefault("device", "cpu")
    return harness_model.DiffusionLM(pretrained=str(model_path()), **kw)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"steps": 0}, r"^model arg steps: steps must be >= 1, got 0$"),
        ({"steps": "five"}, r"^model arg steps: steps must be an int, got str \('five'\)$"),
        ({"gen_length": 2.5}, r"^model arg gen_length: gen_length must be an int, got float \(2.5\)$"),
        ({"attn": "flash"}, r"model arg attn: expected one of \('dense', 'sparsed'\), got 'flash'"),
        ({"attn": "sparsed", "select": 1.5}, r"^model arg select: select must be in \(0, 1\], got 1.5$"),
        ({"attn": "sparsed", "skip": "x"}, r"^model arg skip: skip must be a float, got str \('x'\)$"),
        ({"attn": "sparsed", "block_size": 24},
         r"^model arg block_size: block_size must be 'auto' or a positive multiple of 16, got 24$"),
        ({"attn": "sparsed", "keep_diagonal": "yes"}, r"^model args: keep_diagonal must be a bool, got str$"),
        ({"attn": "sparsed", "pattern": "stripes"},
         r"^model arg pattern: pattern must be 'topk', 'local' or 'random', got 'stripes'$"),
        ({"pattern": "local"},
         r"model args \['pattern'\] are SparseD settings: they need attn=sparsed, got attn=dense"),
        ({"select": 0.3}, r"model args \['select'\] are SparseD settings: they need attn=sparsed, got attn=dense"),
        ({"alg": "entropy"}, r"model args \['alg'\] belong to the dream sampler; this checkpoint is llada"),
        ({"batch_size": "auto"},
         r"model arg batch_size: expected an int >= 1 \(automatic batch sizes are not supported\), got 'auto'$"),
        ({"batch_size": "auto:4"},
         r"model arg batch_size: expected an int >= 1 \(automatic batch sizes are not supported\), got 'auto:4'$"),
        ({"gen_length": 4206},
         r"model arg gen_length: expected an int < the model's position limit 4206 \(no RoPE scaling; the prompt "),
        ({"rope_scaling": "yarn"},
         r"model arg rope_scaling: expected none or TYPE:FACTOR with TYPE linear, dynamic or yarn and FACTOR a "
         r"number >= 1 \(e\.g\. yarn:4\), got 'yarn'$"),
        ({"rope_scaling": "longrope:2"},
         r"model arg rope_scaling: expected TYPE:FACTOR .*\(longrope takes per-dimension factors"),
        ({"dtype": "float64"}, r"model arg dtype: expected one of \('auto', 'float32', 'bfloat16', 'float16'\)"),
        ({"device": "gpu0"}, r"model arg device: expected a torch device such as 'cpu' or 'cuda:0', got 'gpu0'"),
        ({"mc_samples": -1}, r"^model arg mc_samples: mc_samples must be >= 1, got -1$"),
        ({"stepz": 3}, r"unknown model args \['stepz'\]; sparsed-dlm takes pretrained and"),
        ({"cuda_graphs": True}, r"^model args \['cuda_graphs'\] apply to block-diffusion \(Qwen3\) checkpoints only$"),
        ({"select_every": 2, "denoising_steps": 2},
         r"^model args \['denoising_steps', 'select_every'\] apply to block-diffusion \(Qwen3\) checkpoints only$"),
        ({"kv_cache": "full"}, r"^model arg kv_cache: kv_cache must be None, 'prefix' or 'dual', got 'full'$"),
        ({"attn": "sparsed", "prompt_end_offset": -1},
         r"^model arg prompt_end_offset: prompt_end_offset must be None, 'middle' or an int in \[0, block_size=128\), "
         r"got -1$"),
        ({"attn": "sparsed", "prompt_end_offset": "half"},
         r"^model arg prompt_end_offset: prompt_end_offset must be None, 'middle' or an int .*, got 'half'$"),
        ({"attn": "sparsed", "prompt_end_offset": 128},
         r"prompt_end_offset must be None, 'middle' or an int in \[0, block_size=128\), got 128"),
        ({"prompt_end_offset": 64},
         r"model args \['prompt_end_offset'\] are SparseD settings: they need attn=sparsed, got attn=dense"),
    ],
)  # fmt: skip
def test_bad_model_args_name_the_arg_the_expectation_and_the_value(harness_model, args, message):
    with pytest.raises(harness_model.ModelArgError, match=message):
        _make(harness_model, **args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"remasking": "top"}, r"^model arg remasking: remasking must be one of \('low_confidence', 'random'\), "),
        ({"gen_length": 6, "block_length": 4},
         r"^model arg gen_length: gen_length must be divisible by block_length, got gen_length=6, block_length=4$"),
        ({"gen_length": 8, "block_length": 4, "steps": 3},
         r"^model arg steps: steps must be divisible by the number of blocks gen_length/block_length = 2, got "),
        ({"temperature": "hot"}, r"^model arg temperature: temperature must be a float, got str \('hot'\)$"),
    ],
)  # fmt: skip
def test_bad_sampler_model_args_are_named_before_the_model_loads(harness_model, args, message, monkeypatch):
    """The sampler's own rules (`check_llada_arguments`, run by the sampler too) reach the user as
    a ModelArgError naming the model arg, from the constructor, before any weights load."""
    import transformers

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *a, **kw: pytest.fail("weights loaded"))
    with pytest.raises(harness_model.ModelArgError, match=message):
        _make(harness_model, **{"gen_length": 4, **args})


def test_model_args_typed_by_lm_eval_and_spelled_as_text_reach_the_library(harness_model):
    """lm-eval's parser types numbers, booleans and none; the text spellings of TEXT_VALUES (from
    a YAML config) and rope_scaling=none (None after lm-eval's parser: no scaling) are mapped."""
    from lm_eval.utils import simple_parse_args_string

    parsed = simple_parse_args_string("steps=5,select=0.3,block_size=64,keep_diagonal=true,prompt_end_offset=none")
    assert parsed == {"steps": 5, "select": 0.3, "block_size": 64, "keep_diagonal": True, "prompt_end_offset": None}
    spelled = harness_model._spelled({"prompt_end_offset": "None", "kv_cache": "NONE", "rope_scaling": None})
    assert spelled == {"prompt_end_offset": None, "kv_cache": None, "rope_scaling": "none"}
    assert harness_model._spelled({"prompt_end_offset": 3, "steps": 5}) == {"prompt_end_offset": 3, "steps": 5}


def test_a_library_error_about_an_argument_no_model_arg_feeds_keeps_its_traceback(harness_model):
    known = {"steps", "gen_length", "prefix_budget"}
    renamed = r"^model arg gen_length \(the library's max_new_tokens\): max_new_tokens must be >= 1, got 0$"
    with pytest.raises(harness_model.ModelArgError, match=renamed), harness_model._model_args(known):
        raise ArgumentValueError("max_new_tokens", "max_new_tokens must be >= 1, got 0")
    with pytest.raises(ArgumentValueError, match="input_ids must be 2D"), harness_model._model_args(known):
        raise ArgumentValueError("input_ids", "input_ids must be 2D")  # not a model arg: a bug


@pytest.mark.parametrize(
    ("args", "parsed"),
    [({}, "middle"), ({"prompt_end_offset": 64}, 64), ({"prompt_end_offset": None}, None),
     ({"prompt_end_offset": "none"}, None), ({"prompt_end_offset": "Middle"}, "middle")],
)  # fmt: skip
def test_the_block_grid_reaches_the_config_and_runs_with_a_cache(harness_model, args, parsed):
    lm = _make(harness_model, attn="sparsed", steps=5, gen_length=5, **args)
    assert lm.sparsed.prompt_end_offset == parsed
    cached = _make(harness_model, attn="sparsed", kv_cache="dual", steps=5, gen_length=5, **args)
    assert cached.sparsed == lm.sparsed and cached.kv_cache == "dual"


def test_pretrained_must_be_a_diffusion_lm(harness_model, tmp_path):
    with pytest.raises(ValueError, match=r"model arg pretrained: expected a checkpoint path or Hub id, got None"):
        harness_model.DiffusionLM(device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(
        ValueError, match=r"expected a checkpoint with model_type in \('llada', 'Dream', 'qwen3'\), got 'gpt2'"
    ):
        harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu")


def test_cli_style_args_strings_and_defaults(harness_model):
    # What lm-eval's CLI hands over: model args typed by its parser, device='cuda:0', batch_size as str.
    lm = harness_model.DiffusionLM.create_from_arg_string(
        f"pretrained={model_path()},attn=sparsed,select=0.3,skip=0.2,block_size=128,steps=5,gen_length=5,device=cpu",
        {"device": "cuda:0", "batch_size": "4", "max_batch_size": None},
    )
    assert (lm.steps, lm.gen_length, lm.block_length, lm.batch_size) == (5, 5, 5, 4)
    assert lm.sparsed.select == 0.3 and lm.sparsed.block_size == 128 and lm.device == torch.device("cpu")
    assert lm.model.config._attn_implementation == "sparsed"
    args = {"pretrained": str(model_path()), "steps": 5, "gen_length": 5, "device": "cpu"}
    lm = harness_model.DiffusionLM.create_from_arg_obj(args, {"batch_size": 2})
    assert (lm.steps, lm.batch_size, lm.sparsed) == (5, 2, None)
    assert lm.model.config._attn_implementation == "sdpa"


def test_automatic_batch_size_from_lm_eval_flags_is_refused_before_loading(harness_model):
    # What `--batch_size auto:4 --max_batch_size 64` hands over (lm-eval's flags, not model args).
    with pytest.raises(ValueError, match=r"model arg batch_size: .*not supported\), got 'auto:4'$"):
        harness_model.DiffusionLM.create_from_arg_string(
            f"pretrained={model_path()},device=cpu", {"batch_size": "auto:4", "max_batch_size": 64}
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's warning")
def test_cuda_device_without_cuda_warns_once_and_runs_on_cpu(harness_model):
    _warn._warned.discard("harness-no-cuda")
    with pytest.warns(RuntimeWarning, match=r"device 'cuda:0' asked for but CUDA is not available"):
        lm = _make(harness_model, device="cuda:0", gen_length=5)
    assert lm.device == torch.device("cpu")


def _instance(kind, args, idx=0):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=idx)


def test_loglikelihood_of_the_shipped_model_is_reproducible_and_prefers_the_answer(harness_model):
    lm = _make(harness_model, mc_samples=2, batch_size=6, seed=11)
    task = sample_prompts(512, 1, seed=SEED_BASE + 512)  # short, to keep the test cheap
    prompt = lm.tokenizer.decode(task.input_ids[0, 1:].tolist())
    answer = lm.tokenizer.decode(task.answers[0].tolist())
    wrong = answer[::-1]
    reqs = [_instance("loglikelihood", (prompt, answer)), _instance("loglikelihood", (prompt, wrong))]
    first = lm.loglikelihood(reqs)
    assert first == lm.loglikelihood(reqs)  # same seed, same numbers
    (right_ll, right_greedy), (wrong_ll, wrong_greedy) = first
    assert right_greedy and not wrong_greedy
    assert right_ll > wrong_ll + 5
    with pytest.raises(NotImplementedError, match="does not implement loglikelihood_rolling"):
        lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (prompt,))])


def test_sparsed_loglikelihood_warns_that_it_runs_dense(harness_model):
    lm = _make(harness_model, attn="sparsed", mc_samples=1, batch_size=2)
    _warn._warned.discard("harness-ll-dense")
    with pytest.warns(RuntimeWarning, match="loglikelihood runs dense attention"):
        lm.loglikelihood([_instance("loglikelihood", ("\u4e00\uac00", "\uac01"))])


def test_generate_until_batches_and_passes_the_sampler_settings(harness_model, monkeypatch):
    lm = _make(harness_model, attn="sparsed", select=0.3, skip=0.2, steps=5, gen_length=5, batch_size=2)
    calls = []

    def fake_generate(model, ids, mask, **kw):
        calls.append((ids.clone(), None if mask is None else mask.clone(), kw))
        # Per row: value symbols 0..4 of the row's real prompt length, then an EOS at the end.
        n = mask.sum(-1, keepdim=True)
        gen = 517 + (n + torch.arange(5)) % 512
        gen[:, 4] = 0
        return torch.cat([ids, gen], 1)

    monkeypatch.setattr(harness_model, "llada_generate", fake_generate)
    prompts = ["\u4e00" * 3, "\u4e00" * 6, "\u4e00" * 4]
    reqs = [_instance("generate_until", (p, {"until": [], "max_gen_toks": 5})) for p in prompts]
    reqs[2] = _instance("generate_until", (prompts[2], {"until": [chr(0xAC00 + 7)], "max_gen_toks": 3}))
    out = lm.generate_until(reqs)
    assert len(calls) == 2  # batch_size 2, three requests
    ids, mask, kw = calls[0]
    assert ids.shape == (2, 7) and mask.tolist() == [[1] * 7, [0, 0, 1, 1, 1, 1, 1]]  # left padded, longest first
    assert ids[1, :2].tolist() == [lm.pad_id] * 2
    assert kw["sparsed"] == lm.sparsed and (kw["steps"], kw["gen_length"], kw["block_length"]) == (5, 5, 5)
    assert kw["kv_cache"] is None
    sym = lambda n, k: "".join(chr(0xAC00 + (n + j) % 512) for j in range(k))
    assert out[0] == sym(4, 4)  # cut at the EOS in the last place
    assert out[1] == sym(7, 4)
    assert out[2] == sym(5, 2)  # max_gen_toks 3, then cut at the stop string (symbol 7)


def _llada_kwargs(harness_model, monkeypatch, lm) -> dict:
    """One generate_until request of 5 tokens with llada_generate replaced: the kwargs it got."""
    seen = {}

    def fake_generate(model, ids, mask, **kw):
        seen.update(kw)
        return torch.cat([ids, torch.zeros(ids.shape[0], 5, dtype=ids.dtype)], 1)

    monkeypatch.setattr(harness_model, "llada_generate", fake_generate)
    lm.generate_until([_instance("generate_until", ("\u4e00" * 3, {"until": [], "max_gen_toks": 5}))])
    return seen


def test_threshold_reaches_the_sampler_in_place_of_steps(harness_model, monkeypatch):
    lm = _make(harness_model, attn="sparsed", threshold=0.9, gen_length=5, kv_cache="dual")
    assert (lm.threshold, lm.steps) == (0.9, None)
    seen = _llada_kwargs(harness_model, monkeypatch, lm)
    assert (seen["threshold"], seen["steps"], seen["kv_cache"]) == (0.9, None, "dual")
    with pytest.raises(ValueError, match=r"^model arg steps: steps=5 and threshold=0.9 exclude each other"):
        _make(harness_model, threshold=0.9, steps=5, gen_length=5)
    with pytest.raises(ValueError, match=r"^model arg threshold: threshold must be in \(0, 1\], got 0.0$"):
        _make(harness_model, threshold=0, gen_length=5)


def test_the_factor_rule_reaches_the_sampler_in_place_of_steps(harness_model, monkeypatch):
    lm = _make(harness_model, factor=1.5, gen_length=5)
    assert (lm.factor, lm.threshold, lm.steps) == (1.5, None, None)
    seen = _llada_kwargs(harness_model, monkeypatch, lm)
    assert (seen["factor"], seen["threshold"], seen["steps"]) == (1.5, None, None)
    with pytest.raises(ValueError, match=r"^model arg factor: factor=1.5 and threshold=0.9 are two parallel"):
        _make(harness_model, factor=1.5, threshold=0.9, gen_length=5)
    with pytest.raises(ValueError, match=r"^model arg factor: factor must be > 0, got -1.0$"):
        _make(harness_model, factor=-1, gen_length=5)


def test_generation_kwargs_the_model_cannot_apply_warn(harness_model):
    lm = _make(harness_model, steps=5, gen_length=5)
    _warn._warned.discard("harness-max-gen-64")
    _warn._warned.discard("harness-gen-top_p-0.9")
    with pytest.warns(RuntimeWarning, match=r"max_gen_toks=64 tokens but the sampler generates gen_length=5"):
        assert lm._gen_settings({"until": "x", "max_gen_toks": 64}) == (["x"], 5)
    with pytest.warns(RuntimeWarning, match=r"generation kwarg top_p=0.9 is not applied"):
        lm._gen_settings({"top_p": 0.9})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # greedy settings agree with temperature 0: no warning
        assert lm._gen_settings({"do_sample": False, "temperature": 0.0, "max_gen_toks": 2}) == ([], 2)


def _demo_vocab_checkpoint(path: Path, kind: str, limit: int = 256) -> None:
    """A tiny LLaDA or Dream with the demo tokenizer's vocabulary (text in, text out) and a
    position limit (``max_position_embeddings``) of ``limit`` tokens."""
    from sparsed_backend.demo.task import MASK_ID as DEMO_MASK
    from sparsed_backend.demo.task import VOCAB_SIZE
    from sparsed_backend.demo.tokenizer import build_tokenizer
    from tiny_models import TINY, write_checkpoint

    cfg = TINY[kind] | {"vocab_size": VOCAB_SIZE, "mask_token_id": DEMO_MASK, "bos_token_id": 1, "eos_token_id": 0,
                        "pad_token_id": 0}  # fmt: skip
    cfg |= (
        {"embedding_size": VOCAB_SIZE, "max_sequence_length": limit}
        if kind == "llada"
        else {"max_position_embeddings": limit}
    )
    write_checkpoint(path, kind, cfg)
    build_tokenizer().save_pretrained(path)


def test_a_dream_checkpoint_is_detected_and_runs_both_request_types(harness_model, tmp_path):
    from sparsed_backend.demo.task import MASK_ID as DEMO_MASK

    _demo_vocab_checkpoint(tmp_path, "dream")
    with pytest.raises(
        ValueError, match=r"model args \['remasking'\] belong to the llada sampler; this checkpoint is dream"
    ):
        harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu", remasking="random")
    with pytest.raises(harness_model.ModelArgError, match=r"^model arg kv_cache: kv_cache='prefix' needs block_length"):
        harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu", gen_length=4, kv_cache="prefix")
    cached = harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu", gen_length=4, steps=4,
                                       block_length=2, kv_cache="dual")  # fmt: skip
    text = cached.generate_until([_instance("generate_until", ("\u4e00\u4e01?", {"until": [], "max_gen_toks": 4}))])
    assert (cached.block_length, cached.kv_cache) == (2, "dual") and len(text) == 1
    fast = harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu", gen_length=4, block_length=2,
                                     threshold=0.5, kv_cache="prefix")  # fmt: skip
    text = fast.generate_until([_instance("generate_until", ("\u4e00\u4e01?", {"until": [], "max_gen_toks": 4}))])
    assert fast.alg == "maskgit_plus" and len(text) == 1  # threshold decoding compares maskgit_plus's confidence
    lm = harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu", gen_length=4, steps=4, mc_samples=3,
                                   batch_size=4, alg="maskgit_plus")  # fmt: skip
    assert lm.family == "dream" and lm.alg == "maskgit_plus"
    prompts = ["\u4e00\u4e01?", "\u4e02" * 5]
    out = lm.generate_until([_instance("generate_until", (p, {"until": [], "max_gen_toks": 4})) for p in prompts])
    assert len(out) == 2 and all(isinstance(t, str) and len(t) <= 4 for t in out)
    got = lm.loglikelihood([_instance("loglikelihood", (prompts[0], "\uac00\uac01"))])
    ctx = lm.tokenizer(prompts[0])["input_ids"]
    direct = masked_loglikelihood(lm.model, [(ctx, [517, 518])], mask_id=DEMO_MASK, pad_id=0, mc_samples=3,
                                  batch_size=4, seed=0, shifted=True)  # fmt: skip
    assert got == direct


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_rope_scaling_model_arg_extends_the_position_limit(harness_model, tmp_path, kind):
    """With rope_scaling=yarn:4 a checkpoint trained on 32 positions takes a gen_length of 40."""
    _demo_vocab_checkpoint(tmp_path, kind, limit=32)
    with pytest.raises(ValueError, match=r"model arg gen_length: expected an int < the model's position limit 32 "):
        harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu", gen_length=40)
    lm = harness_model.DiffusionLM(
        pretrained=str(tmp_path), device="cpu", gen_length=40, steps=2, rope_scaling="yarn:4"
    )
    assert lm.max_length == 128
    assert lm.model.config.rope_scaling == {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 32}
    assert lm.model.model.rotary_emb.rope_type == "yarn"
    out = lm.generate_until([_instance("generate_until", ("\u4e00\u4e01?", {"until": [], "max_gen_toks": 40}))])
    assert len(out) == 1


def _truncation_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "left-truncated" in str(w.message)]


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_over_long_generate_until_requests_are_left_truncated_with_one_warning(harness_model, tmp_path, kind):
    from sparsed_backend.demo.tokenizer import CHARACTERS

    # Position limit 32, gen_length 4: a context keeps at most its last 28 tokens.
    _demo_vocab_checkpoint(tmp_path, kind, limit=32)
    lm = harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu", gen_length=4, steps=4, batch_size=2)
    texts = [CHARACTERS[1:41], CHARACTERS[50:53], CHARACTERS[100:135]]  # 41, 4 and 36 tokens with BOS
    reqs = [_instance("generate_until", (t, {"until": [], "max_gen_toks": 4}), i) for i, t in enumerate(texts)]
    _warn._warned.discard("harness-truncated-generate_until")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = lm.generate_until(reqs)  # untruncated, the sampler would refuse 41 + 4 > 32
        assert lm.generate_until(reqs) == out  # a second call: same answers, no second warning
    assert _truncation_warnings(caught) == [
        "sparsed-dlm: 2 of 3 generate_until requests exceed the model's position limit 32 (no RoPE scaling; "
        "gen_length 4 kept for the generation); left-truncated as lm-eval's HF model does: 21 context tokens cut "
        "in all, 8 to 13 per request"
    ]
    for text, got in zip(texts, out, strict=True):
        ids = lm.tokenizer(text)["input_ids"][-28:]  # the truncated context, run alone through the sampler
        x = torch.tensor([ids])
        direct = lm._sample(x, torch.ones_like(x), torch.Generator().manual_seed(0))
        assert got == lm._decode(direct[0].tolist(), [])
    assert len(lm.tokenizer(texts[1])["input_ids"]) == 4  # one request fits and is left whole


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_over_long_loglikelihood_requests_are_left_truncated_with_one_warning(harness_model, tmp_path, kind):
    from sparsed_backend.demo.tokenizer import CHARACTERS

    _demo_vocab_checkpoint(tmp_path, kind, limit=32)
    lm = harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu", gen_length=4, mc_samples=3, batch_size=4)
    pairs = [
        (CHARACTERS[1:41], CHARACTERS[41:44]),  # 41 + 3 tokens: the context keeps its last 29
        (CHARACTERS[60:62], CHARACTERS[62:64]),  # 3 + 2: fits
        (CHARACTERS[70:72], CHARACTERS[72:112]),  # 3 + 40: the continuation keeps its last 31, the context 1
    ]
    split = [lm._split(c, x) for c, x in pairs]
    assert [(len(c), len(x)) for c, x in split] == [(41, 3), (3, 2), (3, 40)]
    reqs = [_instance("loglikelihood", p, i) for i, p in enumerate(pairs)]
    _warn._warned.discard("harness-truncated-loglikelihood")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = lm.loglikelihood(reqs)
    assert _truncation_warnings(caught) == [
        "sparsed-dlm: 2 of 3 loglikelihood requests exceed the model's position limit 32 (no RoPE scaling; "
        "continuation included); left-truncated as lm-eval's HF model does: 14 context tokens cut in all, 2 to 12 "
        "per request; 1 continuation(s) alone exceed the limit and keep their right end: 9 continuation tokens cut"
    ]
    truncated = [(split[0][0][-29:], split[0][1]), split[1], (split[2][0][-1:], split[2][1][-31:])]
    direct = masked_loglikelihood(lm.model, truncated, mask_id=lm.mask_id, pad_id=lm.pad_id, mc_samples=3,
                                  batch_size=4, seed=0, shifted=kind == "dream")  # fmt: skip
    assert got == direct


# ----------------------------------------------------------------------------- the console script


def test_import_keeps_lm_eval_optional_and_builtin_models_registered():
    _lm_eval()
    code = (
        "import sys, sparsed_backend, sparsed_backend.demo, sparsed_backend.harness\n"
        "assert 'lm_eval' not in sys.modules, 'import sparsed_backend imported lm_eval'\n"
        "import sparsed_backend.harness.model\n"
        "from lm_eval.api.registry import get_model, model_registry\n"
        "assert {'hf', 'vllm', 'dummy'} <= set(model_registry.keys()), sorted(model_registry.keys())\n"
        "print(get_model('dummy').__name__, get_model('sparsed-dlm').__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **OFFLINE})
    assert out.returncode == 0, out.stderr
    # lm-eval's own models stay registered (materializing "hf" needs lm-eval[hf]: accelerate).
    assert out.stdout.split() == ["DummyLM", "DiffusionLM"]


def test_bad_model_args_are_one_line_in_sparsed_eval(tmp_path):
    """As a user runs it (the console script): no traceback, exit status 2, the arg named."""
    _lm_eval()
    exe = _bin("sparsed-eval")
    cases = [
        ("pretrained={shipped},steps=0", r"^sparsed-eval: error: model arg steps: steps must be >= 1, got 0$"),
        ("pretrained={shipped},attn=sparsed,prompt_end_offset=500",
         r"^sparsed-eval: error: model arg prompt_end_offset: prompt_end_offset must be None, 'middle' or an int in "),
        ("pretrained=/nonexistent/model", r"^sparsed-eval: error: model arg pretrained: expected a checkpoint"),
    ]  # fmt: skip
    env = {**os.environ, **OFFLINE, "PYTHONWARNINGS": "ignore"}
    for model_args, message in cases:
        cmd = [exe, "--model", "sparsed-dlm", "--model_args", model_args.format(shipped=model_path()),
               "--tasks", "sparsed_retrieval_1024", "--limit", "1", "--device", "cpu"]  # fmt: skip
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert re.search(message, out.stderr.strip().splitlines()[-1], re.M), out.stderr[-1000:]


def test_sparsed_eval_runs_the_task_end_to_end_offline_from_any_directory(tmp_path):
    _lm_eval()
    exe = _bin("sparsed-eval")
    hf_home, work = tmp_path / "hf_home", tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_CACHE"))}
    env |= OFFLINE | {"HF_HOME": str(hf_home), "PYTHONWARNINGS": "ignore"}
    cmd = [exe, "--model", "sparsed-dlm", "--model_args", f"pretrained={model_path()},steps=5,gen_length=5",
           "--tasks", "sparsed_retrieval_1024", "--limit", "2", "--batch_size", "2", "--device", "cpu",
           "--log_samples", "--output_path", str(work / "out")]  # fmt: skip
    out = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "|sparsed_retrieval_1024|" in out.stdout and "|exact_match|" in out.stdout
    # Nothing under HF_HOME: no Hub download, no datasets cache.
    assert not hf_home.exists() or not any(hf_home.rglob("*")), sorted(hf_home.rglob("*"))
    samples = [json.loads(line) for p in (work / "out").rglob("samples_sparsed_retrieval_1024_*.jsonl")
               for line in p.read_text().splitlines()]  # fmt: skip
    assert len(samples) == 2
    docs = load_docs(1024)
    prompts = sample_prompts(1024, DOCS_PER_LENGTH, seed=SEED_BASE + 1024)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path())
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        i = s["doc_id"]
        context = s["arguments"]["gen_args_0"]["arg_0"]
        assert context == docs[i]["prompt"]  # the request is the prompt, nothing added
        assert tok(context)["input_ids"] == prompts.input_ids[i].tolist()
        assert s["target"] == docs[i]["answer"]
        assert s["filtered_resps"] == [docs[i]["answer"]] and s["exact_match"] == 1.0  # dense retrieves


def test_a_block_diffusion_checkpoint_runs_blockdiff_generate(harness_model, tmp_path, monkeypatch):
    """A Qwen3 checkpoint whose config carries mask_token_id and block_size (SDAR's fields) runs
    blockdiff_generate with the model args' settings, sparse prefix selection with attn=sparsed;
    LLaDA / Dream args and loglikelihood are refused with one-line errors."""
    write_blockdiff_checkpoint(tmp_path, block_size=4)
    with pytest.raises(ValueError, match=r"model args \['steps'\] belong to the LLaDA / Dream samplers"):
        harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu", steps=4)
    with pytest.raises(ValueError, match=r"model args \['mc_samples'\] belong to the LLaDA / Dream samplers"):
        harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu", mc_samples=8)  # no likelihood here
    with pytest.raises(ValueError, match=r"model args \['select'\] are sparse prefix settings: they need attn=sparsed"):
        harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu", select=0.3)
    with pytest.raises(ValueError, match=r"^model arg select: give exactly one of select and budget"):
        harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu", attn="sparsed", select=0.3, prefix_budget=8)
    with pytest.raises(ValueError, match=r"^model arg prefix_budget \(the library's budget\): budget must be >= 1"):
        harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu", attn="sparsed", prefix_budget=0)
    with pytest.raises(ValueError, match=r"^model arg scorer: scorer must be one of \('separate', 'fused'\), got 'x'"):
        harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu", attn="sparsed", scorer="x")
    # blockdiff_generate's own rule, checked when it runs: a one-line error naming the model arg.
    lm = harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu", remasking="low_confidence_dynamic")
    with pytest.raises(harness_model.ModelArgError, match=r"^model arg threshold: remasking='low_confidence_dynamic' "):
        lm.generate_until([_instance("generate_until", ("\u4e00\u4e01?", {"until": []}))])
    calls = []
    real = harness_model.blockdiff_generate
    monkeypatch.setattr(harness_model, "blockdiff_generate", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    lm = harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu", gen_length=8, attn="sparsed",
                                   prefix_budget=8, block_size=4, per_kv_head=True, threshold=0.9,
                                   select_every=2, sparse_commit=True)  # fmt: skip
    assert lm.family == "blockdiff" and type(lm.model).__name__ == "Qwen3ForCausalLM"
    out = lm.generate_until([_instance("generate_until", ("\u4e00\u4e01?" * 3, {"until": [], "max_gen_toks": 8}))])
    assert len(out) == 1 and isinstance(out[0], str)
    (kw,) = calls
    assert (kw["block_length"], kw["denoising_steps"], kw["remasking"], kw["threshold"]) == (
        4, 4, "low_confidence_dynamic", 0.9,
    )  # fmt: skip
    assert kw["sparsed"] == PrefixSparseConfig(
        select=None, budget=8, block_size=4, per_kv_head=True, select_every=2, sparse_commit=True
    )
    assert kw["cuda_graphs"] is False
    if not torch.cuda.is_available():  # the model arg reaches the sampler, which refuses it off CUDA
        lm = harness_model.DiffusionLM(pretrained=str(tmp_path), device="cpu", gen_length=8, cuda_graphs=True)
        with pytest.raises(harness_model.ModelArgError, match=r"^model arg cuda_graphs: cuda_graphs needs the model"):
            lm.generate_until([_instance("generate_until", ("\u4e00\u4e01?", {"until": []}))])
    with pytest.raises(NotImplementedError, match="loglikelihood is not implemented for block-diffusion"):
        lm.loglikelihood([_instance("loglikelihood", ("\u4e00", "\uac00"))])
