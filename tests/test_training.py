"""The demo model's training recipe (curriculum, batches, masking, loss) and the training script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from sparsed_backend.demo.task import (
    BOS_ID,
    KEY_BASE,
    MASK_ID,
    N_KEYS,
    QUESTION_ID,
    RECORD_LEN,
    VALUE_LEN,
    VOCAB_SIZE,
)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "training"))  # the recipe lives beside the training scripts, outside the package

from recipe import (  # noqa: E402
    Curriculum,
    Stage,
    default_stages,
    masked_answer_loss,
    question_tokens,
    sample_training_batch,
)


def test_default_stages_double_records_then_grow_the_prompt():
    stages = default_stages(16, (512, 1024))
    assert [(s.n_records, s.prompt_tokens) for s in stages] == [
        (2, None), (4, None), (8, None), (16, None), (16, 512), (16, 1024)
    ]  # fmt: skip
    assert stages[0].questions() == 2 and stages[-1].questions() == 16
    assert stages[0].body_len == 2 * RECORD_LEN and stages[-1].body_len == 1024 - 3
    with pytest.raises(ValueError, match=r"lengths must be >= 387 for 64 records, got 300"):
        default_stages(64, (300,))


def test_curriculum_moves_only_at_the_gate_and_stops_at_the_end():
    c = Curriculum([Stage(2), Stage(4)], gate=0.9)
    assert not c.update(0.89) and c.index == 0
    assert c.update(0.9) and c.index == 1 and c.last
    assert not c.update(1.0) and c.index == 1
    with pytest.raises(ValueError, match=r"gate must be in \[0, 1\], got 1.5"):
        Curriculum([Stage(2)], gate=1.5)
    with pytest.raises(ValueError, match=r"index must be in \[0, 1\), got 3"):
        Curriculum([Stage(2)], index=3)
    with pytest.raises(ValueError, match="stages must not be empty"):
        Curriculum([])


@given(
    stage=st.sampled_from([Stage(2), Stage(8), Stage(16, 400, 4), Stage(16, 400, 16)]),
    single=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_training_batch_layout(stage, single, seed):
    g = torch.Generator().manual_seed(seed)
    m = 1 if single else stage.questions()
    b = sample_training_batch(stage, 3, g, n_questions=m, p_full_mask=0.3)
    ids = b.input_ids
    assert ids.shape == (3, stage.seq_len(m)) and (ids[:, 0] == BOS_ID).all()
    assert b.answer_pos.shape == (m * VALUE_LEN,) and b.targets.shape == b.masked.shape == (3, m * VALUE_LEN)
    assert b.masked.any(1).all(), "every row supervises at least one token"
    seen = ids[:, b.answer_pos]
    assert (seen[b.masked] == MASK_ID).all() and torch.equal(seen[~b.masked], b.targets[~b.masked])
    assert ((b.targets >= KEY_BASE + N_KEYS) & (b.targets < VOCAB_SIZE)).all()
    body = ids[:, 1 : 1 + stage.body_len]
    for row in range(3):
        for q in range(m):
            first = int(b.answer_pos[q * VALUE_LEN])
            assert ids[row, first - 2] == QUESTION_ID
            key = ids[row, first - 1]
            where = (body[row] == key).nonzero().flatten()
            assert where.numel() == 1, "the asked key occurs once in the body"
            value = body[row, int(where) + 1 : int(where) + RECORD_LEN]
            assert torch.equal(value, b.targets[row, q * VALUE_LEN : (q + 1) * VALUE_LEN])


@given(
    stage=st.sampled_from([Stage(8), Stage(16, 400, 4), Stage(64, 1024, 16)]),
    n_keys=st.integers(2, 4),
    single=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_multi_key_training_batch_layout(stage, n_keys, single, seed):
    """``? k1 .. kk`` then the k values in order, every question answered in place; the records
    asked in a sequence are distinct; the sequence is no longer than the single-key one."""
    g = torch.Generator().manual_seed(seed)
    k = n_keys
    m = 1 if single else stage.questions(k)
    b = sample_training_batch(stage, 2, g, n_questions=m, n_keys=k, p_full_mask=0.3)
    ids = b.input_ids
    assert ids.shape == (2, stage.seq_len(m, k)) and stage.seq_len(m, k) <= stage.seq_len(stage.questions())
    assert stage.seq_len(m, k) == 1 + stage.body_len + m * question_tokens(k) and question_tokens(k) == 1 + 6 * k
    assert b.answer_pos.shape == (m * k * VALUE_LEN,) and b.targets.shape == (2, m * k * VALUE_LEN)
    seen = ids[:, b.answer_pos]
    assert (seen[b.masked] == MASK_ID).all() and torch.equal(seen[~b.masked], b.targets[~b.masked])
    body = ids[:, 1 : 1 + stage.body_len]
    for row in range(2):
        asked = []
        for q in range(m):
            first = int(b.answer_pos[q * k * VALUE_LEN])
            assert ids[row, first - 1 - k] == QUESTION_ID
            keys = ids[row, first - k : first]
            asked += keys.tolist()
            for i, key in enumerate(keys.tolist()):
                where = (body[row] == key).nonzero().flatten()
                assert where.numel() == 1, "the asked key occurs once in the body"
                value = body[row, int(where) + 1 : int(where) + RECORD_LEN]
                t0 = (q * k + i) * VALUE_LEN
                assert torch.equal(value, b.targets[row, t0 : t0 + VALUE_LEN]), "values in question order"
        assert len(set(asked)) == m * k, "distinct records over the sequence"


def test_questions_per_sequence_fit_the_single_key_budget():
    s = Stage(64, 4096, 16)  # 16 single-key questions: 112 tokens
    assert [s.questions(k) for k in (1, 2, 3, 4)] == [16, 8, 5, 4]
    assert max(s.seq_len(s.questions(k), k) for k in range(1, 9)) == s.seq_len(16) == 4206
    assert Stage(4).questions(3) == 1 and Stage(8).questions(2) == 4
    with pytest.raises(ValueError, match=r"n_keys must be in \[1, 4\], got 5"):
        Stage(4).questions(5)
    with pytest.raises(ValueError, match=r"n_questions \* n_keys must be in \[1, 4\], got 2 \* 3"):
        sample_training_batch(Stage(4), 1, torch.Generator(), n_questions=2, n_keys=3)


def test_masking_rate_follows_t_uniform():
    # t ~ U(0, 1) per row, each token masked with prob t: E[masked share] = 1/2 (plus forcing);
    # with p_full_mask = 1 every answer token is masked.
    g = torch.Generator().manual_seed(0)
    b = sample_training_batch(Stage(16), 2000, g, p_full_mask=0.0)
    share = b.masked.float().mean().item()
    assert 0.5 < share < 0.56, share  # 1/2 + forced tokens (~1/80 of a row at t near 0)
    full = sample_training_batch(Stage(4), 50, g, p_full_mask=1.0)
    assert full.masked.all()


def test_masked_answer_loss_is_cross_entropy_on_masked_tokens():
    g = torch.Generator().manual_seed(1)
    b = sample_training_batch(Stage(4), 5, g)
    logits = torch.randn(5, b.answer_pos.numel(), VOCAB_SIZE, generator=g)
    loss, acc = masked_answer_loss(logits, b)
    want = F.cross_entropy(logits[b.masked], b.targets[b.masked])
    assert torch.allclose(loss, want)
    perfect = F.one_hot(b.targets, VOCAB_SIZE).float() * 50
    loss, acc = masked_answer_loss(perfect, b)
    assert loss.item() < 1e-6 and acc.item() == 1.0


def test_training_script_smoke_resume_and_export(tmp_path):
    """--smoke trains a tiny model, the checkpoint resumes, and the export loads as a transformers model."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    script = str(REPO / "training" / "train_retrieval.py")
    ckpt, ckpt2, exported = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "model"
    subprocess.run([sys.executable, script, "--smoke", "--ckpt", str(ckpt)], check=True, env=env, timeout=300)
    subprocess.run(
        [sys.executable, script, "--smoke", "--resume", str(ckpt), "--ckpt", str(ckpt2), "--export", str(exported)],
        check=True, env=env, timeout=300,
    )  # fmt: skip
    first = torch.load(ckpt, weights_only=True)["trainer"]
    second = torch.load(ckpt2, weights_only=True)["trainer"]
    assert second["step"] == first["step"] + 20 and second["resumed_from"] == [str(ckpt)]
    assert len(second["calls"]) == 2 and second["history"][: len(first["history"])] == first["history"]
    summary = json.loads((exported / "training_summary.json").read_text())
    assert summary["seed"] == 0

    from transformers import AutoModel, AutoTokenizer

    import sparsed_backend  # noqa: F401  (registers the model classes)

    model = AutoModel.from_pretrained(exported, attn_implementation="sparsed")
    tok = AutoTokenizer.from_pretrained(exported)
    assert model.config.mask_token_id == tok.mask_token_id == MASK_ID
    state = torch.load(ckpt2, weights_only=True)["state_dict"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor.to(torch.bfloat16), state[name]), name


def test_multi_key_fine_tune_smoke_from_export_and_checkpoint(tmp_path):
    """--init fine-tunes an exported model (or a .pt) on 1..M keys per question; the checkpoint
    resumes in fine-tune mode and exports a bf16 model of the same size."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    script = str(REPO / "training" / "train_retrieval.py")
    base, base_ckpt = tmp_path / "base", tmp_path / "base.pt"
    ft, ft2, ft_pt, exported = tmp_path / "ft.pt", tmp_path / "ft2.pt", tmp_path / "ft_pt.pt", tmp_path / "mk"

    def run(*argv):
        return subprocess.run([sys.executable, script, "--smoke", *argv], check=True, env=env, timeout=300,
                              capture_output=True, text=True).stdout  # fmt: skip

    run("--ckpt", str(base_ckpt), "--export", str(base), "--final-eval-prompts", "0")
    log = run("--init", str(base), "--max-keys", "3", "--seed", "4", "--ckpt", str(ft))
    assert "fine-tune, 1..3 keys per question" in log
    first = torch.load(ft, weights_only=True)["trainer"]
    assert first["step"] == 20 and first["seed"] == 4
    assert first["finetune"] == {"init": str(base), "max_keys": 3, "lengths": [64]}
    assert set(first["history"][-1]["heldout_acc_by_keys"]) == {1, 3}
    assert set(first["final_eval"][64]) == {1, 2, 3}, "exact match for every number of keys"
    run("--resume", str(ft), "--ckpt", str(ft2), "--export", str(exported), "--final-eval-prompts", "0")
    second = torch.load(ft2, weights_only=True)["trainer"]
    assert second["step"] == 40 and second["finetune"]["max_keys"] == 3 and second["resumed_from"] == [str(ft)]
    run("--init", str(base_ckpt), "--max-keys", "2", "--ckpt", str(ft_pt), "--final-eval-prompts", "0")
    assert torch.load(ft_pt, weights_only=True)["trainer"]["finetune"]["max_keys"] == 2
    size = (exported / "model.safetensors").stat().st_size
    assert abs(size - (base / "model.safetensors").stat().st_size) < 1024, "bf16, the size of the model it started from"
    assert json.loads((exported / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(subprocess.CalledProcessError):
        run("--init", str(base), "--resume", str(ft))


@given(st.sampled_from([2, 4, 8]), st.integers(1, 3), st.integers(0, 2**16))
def test_block_diffusion_inputs_follow_the_bd3_layout(block_length, questions, seed):
    """The clean sequence, then each answer block once more, noisy: written as plain loops, a clean
    token sees the clean tokens of its block and the blocks before; a noisy token sees the clean
    tokens of earlier blocks and its own noisy block; the answer logits come from the noisy copies,
    whose masked tokens are the batch's."""
    sys.path.insert(0, str(REPO / "training"))
    from blockdiff_recipe import block_diffusion_inputs

    stage = Stage(4, 64, questions)
    batch = sample_training_batch(stage, 2, torch.Generator().manual_seed(seed))
    ids, pos, mask, index = block_diffusion_inputs(batch, block_length)
    T = batch.input_ids.shape[1]
    clean = batch.input_ids.clone()
    clean[:, batch.answer_pos] = batch.targets
    assert torch.equal(ids[:, :T], clean) and torch.equal(pos[0, :T], torch.arange(T))
    answer_blocks = sorted({int(p) // block_length for p in batch.answer_pos})
    noisy = [p for b in answer_blocks for p in range(b * block_length, min((b + 1) * block_length, T))]
    assert pos[0, T:].tolist() == noisy and torch.equal(ids[:, T:], batch.input_ids[:, noisy])
    n = ids.shape[1]
    want = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            bi, bj = int(pos[0, i]) // block_length, int(pos[0, j]) // block_length
            if i < T:
                want[i, j] = j < T and bj <= bi
            else:
                want[i, j] = (j < T and bj < bi) or (j >= T and bj == bi)
    assert torch.equal(mask[0, 0], want)
    assert torch.equal(pos[0, index], batch.answer_pos) and bool((index >= T).all())
    assert torch.equal(ids[:, index] == MASK_ID, batch.masked)


def test_block_diffusion_training_smoke_resume_and_export(tmp_path):
    """--arch qwen3-blockdiff trains a tiny Qwen3 block-diffusion model, resumes, and exports a
    checkpoint that loads as transformers' Qwen3ForCausalLM and decodes with blockdiff_generate."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    script = str(REPO / "training" / "train_retrieval.py")
    ckpt, ckpt2, exported = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "model"
    args = ["--smoke", "--arch", "qwen3-blockdiff", "--block-length", "4"]
    subprocess.run([sys.executable, script, *args, "--ckpt", str(ckpt)], check=True, env=env, timeout=300)
    subprocess.run(
        [sys.executable, script, *args, "--resume", str(ckpt), "--ckpt", str(ckpt2), "--export", str(exported)],
        check=True, env=env, timeout=300,
    )  # fmt: skip
    assert torch.load(ckpt2, weights_only=True)["trainer"]["step"] == 40

    from transformers import AutoModelForCausalLM

    from sparsed_backend.demo.task import sample_prompts
    from sparsed_backend.sampling.block_diffusion import blockdiff_generate

    model = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="sdpa").eval()
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.mask_token_id == MASK_ID and model.config.block_size == 4
    prompts = sample_prompts(64, 2, n_records=4, seed=1)
    out = blockdiff_generate(model, prompts.input_ids, gen_length=5, block_length=4, denoising_steps=4)
    assert out.shape == (2, 69) and not (out[:, 64:] == MASK_ID).any()

    # The evaluation both the training script and fidelity_blockdiff.py use: the same greedy
    # decode, exact match against the answers, and keeping every prefix block changes nothing.
    from sparsed_backend.attention.prefix_selection import PrefixSparseConfig
    from sparsed_backend.demo.evaluate import answer_blockdiff_prompts

    dense = answer_blockdiff_prompts(model, prompts, batch=1)
    assert torch.equal(dense.generated, out[:, 64:]) and dense.states == [] and dense.forwards > 0
    assert torch.equal(dense.correct, (out[:, 64:] == prompts.answers).all(-1))
    model.set_attn_implementation("sparsed")
    kept = answer_blockdiff_prompts(model, prompts, sparsed=PrefixSparseConfig(select=1.0, block_size=16), batch=2)
    assert torch.equal(kept.generated, dense.generated) and kept.density() == 1.0
    del model.config.block_size
    with pytest.raises(TypeError, match=r"model.config.block_size must be an int, got NoneType \(None\)"):
        answer_blockdiff_prompts(model, prompts)
