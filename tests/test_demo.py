"""The shipped retrieval model and the `sparsed demo` command."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from sparsed_backend import SparseDConfig
from sparsed_backend.attention.prefix_selection import PrefixSparseConfig
from sparsed_backend.demo import blockdiff_model_path, model_path
from sparsed_backend.demo.evaluate import answer_blockdiff_prompts, answer_prompts, generation_length, wilson_interval
from sparsed_backend.demo.task import sample_prompts
from sparsed_cli import main


@pytest.fixture(scope="module")
def shipped():
    return AutoModel.from_pretrained(model_path(), attn_implementation="sparsed", dtype=torch.float32).eval()


def test_shipped_model_retrieves_and_select_one_changes_nothing(shipped):
    prompts = sample_prompts(1024, 4, seed=31337)
    dense = answer_prompts(shipped, prompts, batch=4)
    assert dense.n_correct == 4, dense.generated
    full = answer_prompts(shipped, prompts, sparsed=SparseDConfig(select=1.0, min_sparse_len=0), batch=4)
    assert torch.equal(full.generated, dense.generated)


def test_multi_key_answers_are_decoded_block_by_block(shipped):
    """A 2-key answer (10 tokens) in blocks of 5 takes 10 steps; in blocks of 8 the generation is
    rounded up to 16 tokens (16 steps) and only the first 10 are scored."""
    prompts = sample_prompts(512, 2, n_keys=2, seed=31337)
    per_key = answer_prompts(shipped, prompts, batch=2)
    assert per_key.generated.shape == (2, 10) and per_key.forwards == 10
    assert torch.equal(per_key.correct, (per_key.generated == prompts.answers).all(-1))
    rounded = answer_prompts(shipped, prompts, batch=2, block_length=8)
    assert rounded.generated.shape == (2, 10) and rounded.forwards == 16
    assert generation_length(10, 8) == 16 and generation_length(10, 5) == 10
    with pytest.raises(ValueError, match="block_length must be >= 1, got 0"):
        generation_length(10, 0)


def test_the_multi_key_model_answers_two_keys_where_the_single_key_model_cannot(shipped):
    """The shipped multi-key fine-tune answers 2-key questions on fresh prompts (seeds never used in
    training, which draws from 2^40 + ... and evaluates at 5000 + n); the single-key model, which never
    saw `? k1 k2`, gets none (training/README.md)."""
    multikey = AutoModel.from_pretrained(model_path(keys=2), attn_implementation="sparsed", dtype=torch.float32)
    prompts = sample_prompts(1024, 4, n_keys=2, seed=31337)
    assert answer_prompts(multikey.eval(), prompts, batch=4).n_correct == 4
    assert answer_prompts(shipped, prompts, batch=4).n_correct == 0
    single = sample_prompts(1024, 4, seed=31337)
    assert answer_prompts(multikey, single, batch=4).n_correct == 4  # single-key retrieval is kept


def test_the_shipped_block_diffusion_model_retrieves_and_top_k_keeps_its_answers():
    """The shipped block-diffusion Qwen3 answers fresh 1,500-token prompts (a length off the
    128-token prefix grid) with dense attention; top-k prefix selection at 0.3 per key-value head
    keeps its answers, and the same number of blocks nearest the decoded block ("local") loses
    most of them (benchmarks/results/fidelity_blockdiff_*.md: the same at 128 prompts on a GPU)."""
    path = blockdiff_model_path()
    dense = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
    sparse = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sparsed", dtype=torch.float32).eval()
    assert dense.config.block_size == 4 and dense.config.mask_token_id is not None
    prompts = sample_prompts(1500, 8, seed=31337)
    exact = answer_blockdiff_prompts(dense, prompts, batch=8)
    assert exact.n_correct >= 7, exact.generated
    keep = {"select": 0.3, "per_kv_head": True}
    topk = answer_blockdiff_prompts(sparse, prompts, batch=8, sparsed=PrefixSparseConfig(**keep))
    assert topk.n_correct >= exact.n_correct - 1
    local = answer_blockdiff_prompts(sparse, prompts, batch=8, sparsed=PrefixSparseConfig(**keep, pattern="local"))
    assert local.n_correct <= 3


@pytest.mark.parametrize("keys", [0, 3, 1.0, True])
def test_model_path_names_the_keys_it_accepts(keys):
    with pytest.raises(ValueError, match=rf"keys must be an int in \[1, 2\] \(the shipped models\), got {keys!r}"):
        model_path(keys=keys)


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        wilson_interval(0, 0)


def test_demo_prints_the_lines_scripts_read(tmp_path, capsys):
    out = tmp_path / "blocks.png"
    argv = ["demo", "--prompts", "2", "--length", "512", "--batch", "2", "--seed", "3", "--out", str(out)]
    argv.append("--no-progress")
    assert main(argv) == 0
    text, err = capsys.readouterr()
    assert err == ""  # no bar, no loading messages: stdout is all there is to parse
    assert re.search(r"^prompt tokens: 512$", text, re.M)
    assert re.search(r"^exact match: dense \d+% \| sparsed \d+%$", text, re.M)
    assert re.search(r"^switch step: 1 of 5$", text, re.M)
    assert out.is_file()


def test_readme_python_blocks_run_as_written(capsys):
    """Every ```python block of the README runs on the CPU, offline, exactly as printed."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no python block"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert printed.count("[") >= 2  # the first block prints the generated and the true answers
