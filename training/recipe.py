"""The demo model's training recipe: curriculum, training sequences, answer masking, loss.

A training sequence is a body from `task.sample_records` followed by ``m`` questions, each
answered in place: ``? key v1 .. vL``, or with ``n_keys = k > 1`` keys per question (the
multi-key format of `task.sample_prompts`) ``? key1 .. keyk`` followed by the k values in
order. The answer tokens are the only supervised positions; they are masked as in LLaDA's SFT
(each with probability t ~ U(0, 1), some rows fully) and the loss is the cross-entropy at the
masked ones. The last question of a sequence with ``m = 1``
is exactly the prompt + answer the samplers see at evaluation.

The curriculum is gated on held-out accuracy, in two phases (what broke through on an H100;
training/EXPERIMENTS.md):

1. records only, no haystack: 2, 4, ..., 64 records, every record asked once;
2. 64 records scattered over ever longer prompts (haystack), 16 questions per sequence.

Every stage moves on when held-out token accuracy with fully masked answers reaches the gate.

The multi-key fine-tune (``train_retrieval.py --init``) starts from a trained model and draws
every step's prompt length from the phase-2 stages and its keys per question from 1..M; a
sequence of k-key questions asks as many as fit in the tokens of the stage's single-key
questions (`Stage.questions`), so it is never longer than the single-key sequences the model's
positions were sized for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsed_backend.demo.task import (
    BOS_ID,
    MASK_ID,
    QUESTION_ID,
    QUESTION_LEN,
    RECORD_LEN,
    VALUE_LEN,
    min_prompt_tokens,
    sample_records,
)


def question_tokens(n_keys: int = 1) -> int:
    """Tokens of one answered question of ``n_keys`` keys: ``?``, the keys, their values."""
    return 1 + n_keys * RECORD_LEN


__all__ = ["Curriculum", "Stage", "TrainingBatch", "masked_answer_loss", "question_tokens", "sample_training_batch"]


@dataclass(frozen=True)
class Stage:
    """One curriculum stage.

    Attributes:
        n_records: records per sequence.
        prompt_tokens: prompt length of the eval format (BOS + body + question); None: the
            records alone, no haystack.
        n_questions: questions per sequence; None: every record once.
    """

    n_records: int
    prompt_tokens: int | None = None
    n_questions: int | None = None

    @property
    def body_len(self) -> int:
        if self.prompt_tokens is None:
            return self.n_records * RECORD_LEN
        return self.prompt_tokens - 1 - QUESTION_LEN

    def questions(self, n_keys: int = 1) -> int:
        """Questions per sequence. With ``n_keys > 1``: as many as fit in the tokens of the
        single-key questions (at least one) and ask distinct records."""
        single = self.n_records if self.n_questions is None else min(self.n_questions, self.n_records)
        if not 1 <= n_keys <= self.n_records:
            raise ValueError(f"n_keys must be in [1, {self.n_records}], got {n_keys}")
        fit = single * question_tokens() // question_tokens(n_keys)
        return max(1, min(fit, self.n_records // n_keys))

    def seq_len(self, n_questions: int, n_keys: int = 1) -> int:
        return 1 + self.body_len + n_questions * question_tokens(n_keys)

    def __str__(self) -> str:
        where = "records only" if self.prompt_tokens is None else f"prompt {self.prompt_tokens} tokens"
        return f"{self.n_records} records, {where}"


def default_stages(final_records: int = 64, lengths: tuple[int, ...] = (512, 1024, 2048, 4096)) -> list[Stage]:
    """Records 2, 4, ..., ``final_records`` without haystack, then prompts of ``lengths``."""
    stages, r = [], 2
    while r <= final_records:
        stages.append(Stage(r))
        r *= 2
    for n in lengths:
        if n < min_prompt_tokens(final_records):
            raise ValueError(
                f"lengths must be >= {min_prompt_tokens(final_records)} for {final_records} records, got {n}"
            )
        stages.append(Stage(final_records, n, n_questions=16))
    return stages


class Curriculum:
    """Gated progression through `Stage`s: `update` with held-out accuracy moves it on."""

    def __init__(self, stages: list[Stage], gate: float = 0.9, index: int = 0) -> None:
        if not stages:
            raise ValueError("stages must not be empty")
        if not 0.0 <= gate <= 1.0:
            raise ValueError(f"gate must be in [0, 1], got {gate}")
        if not 0 <= index < len(stages):
            raise ValueError(f"index must be in [0, {len(stages)}), got {index}")
        self.stages, self.gate, self.index = list(stages), gate, index

    @property
    def stage(self) -> Stage:
        return self.stages[self.index]

    @property
    def last(self) -> bool:
        return self.index == len(self.stages) - 1

    def update(self, accuracy: float) -> bool:
        """Record held-out accuracy at the current stage; True if it moved to the next one."""
        if accuracy >= self.gate and not self.last:
            self.index += 1
            return True
        return False


@dataclass(frozen=True)
class TrainingBatch:
    """Model inputs and targets.

    Attributes:
        input_ids: (B, T) with the masked answer tokens replaced by MASK_ID.
        answer_pos: (K,) sequence positions of every answer token (the same in every row).
        targets: (B, K) the answer tokens.
        masked: (B, K) bool, which answer tokens are masked (the loss positions).
    """

    input_ids: torch.Tensor
    answer_pos: torch.Tensor
    targets: torch.Tensor
    masked: torch.Tensor


def sample_training_batch(
    stage: Stage,
    batch: int,
    generator: torch.Generator,
    *,
    n_questions: int | None = None,
    n_keys: int = 1,
    p_full_mask: float = 0.5,
    device: torch.device | str = "cpu",
) -> TrainingBatch:
    """Draw one batch at ``stage`` (``n_questions`` overrides the stage's count for ``n_keys``).

    Every question asks ``n_keys`` keys, ``? k1 .. kk v(k1) .. v(kk)``; the records asked in a
    sequence are distinct (over all its questions). ``n_keys = 1`` draws exactly what it did
    before multi-key questions existed.
    """
    k = n_keys
    m = stage.questions(k) if n_questions is None else n_questions
    if not 1 <= m * k <= stage.n_records:
        raise ValueError(f"n_questions * n_keys must be in [1, {stage.n_records}], got {m} * {k}")
    kw = {"device": device, "generator": generator}
    rec = sample_records(batch, stage.body_len, stage.n_records, generator, device)
    asked = torch.rand(batch, stage.n_records, **kw).argsort(1)[:, : m * k]  # distinct records, random order
    keys = rec.keys.gather(1, asked).view(batch, m, k)
    values = rec.values.gather(1, asked.unsqueeze(-1).expand(-1, -1, VALUE_LEN)).view(batch, m, k * VALUE_LEN)
    mark = torch.full((batch, m, 1), QUESTION_ID, device=device, dtype=torch.long)
    questions = torch.cat([mark, keys, values], -1)  # (B, m, question_tokens(k))
    bos = torch.full((batch, 1), BOS_ID, device=device, dtype=torch.long)
    ids = torch.cat([bos, rec.tokens, questions.flatten(1)], 1)
    q_start = 1 + stage.body_len
    answer_pos = (
        q_start
        + question_tokens(k) * torch.arange(m, device=device).unsqueeze(-1)
        + 1
        + k
        + torch.arange(k * VALUE_LEN, device=device)
    ).flatten()
    targets = values.flatten(1)
    # LLaDA SFT masking: t ~ U(0, 1) per row (1 for a p_full_mask share), each answer token
    # masked with probability t, and at least one masked token per row.
    k = targets.shape[1]
    t = torch.rand(batch, 1, **kw)
    t = torch.where(torch.rand(batch, 1, **kw) < p_full_mask, torch.ones_like(t), t)
    masked = torch.rand(batch, k, **kw) < t
    forced = torch.randint(0, k, (batch, 1), **kw)
    masked.scatter_(1, forced, True)
    answers = ids[:, answer_pos]
    ids[:, answer_pos] = torch.where(masked, torch.full_like(answers, MASK_ID), answers)
    return TrainingBatch(ids, answer_pos, targets, masked)


def masked_answer_loss(logits: torch.Tensor, batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy over the masked answer tokens.

    Args:
        logits: (B, K, V) at ``batch.answer_pos``.
    """
    sel = batch.masked
    logits, targets = logits[sel].float(), batch.targets[sel]
    loss = F.cross_entropy(logits, targets)
    return loss, (logits.argmax(-1) == targets).float().mean()
