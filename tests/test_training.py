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
from sparsed_backend.demo.training import (
    Curriculum,
    Stage,
    default_stages,
    masked_answer_loss,
    sample_training_batch,
)

REPO = Path(__file__).resolve().parent.parent


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
