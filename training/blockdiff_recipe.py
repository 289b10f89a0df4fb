"""Block-diffusion training on the retrieval task: a small Qwen3-layout model (SDAR's layout).

`train_retrieval.py --arch qwen3-blockdiff --block-length BL` uses these pieces in place of the
LLaDA ones. The data is the project's recipe (`recipe.py`: a body of records,
questions answered in place, answer tokens masked with t ~ U(0, 1)); what changes is how a
sequence is seen:

- the model is block-causal: a token attends to every token of its own block of ``BL`` positions
  (counted from position 0) and of the blocks before it, as SDAR's models are trained;
- the clean sequence (true answers) is the context; every block that holds answer tokens is
  appended once more as its *noisy* copy (answer tokens masked, the other tokens of that block
  kept), at the same positions. A noisy block attends to the clean blocks before it and to
  itself, never to the clean copy of its own block or to later blocks (the BD3-LM layout:
  arXiv 2503.09573). The loss is the cross-entropy of the masked answer tokens of the noisy
  copies, each predicted at its own position (no shift).

Inference is `sparsed_backend.sampling.block_diffusion.blockdiff_generate`: prefill of the prompt's whole
blocks, then each block denoised against the committed ones: exactly what the noisy copies saw.
"""

from __future__ import annotations

import torch
from recipe import TrainingBatch

from sparsed_backend.demo.task import BOS_ID, EOS_ID, MASK_ID, VOCAB_SIZE

__all__ = ["block_diffusion_inputs", "blockdiff_answer_logits", "build_qwen3"]


def build_qwen3(args, max_positions: int):
    """A small Qwen3ForCausalLM (float32) with the demo vocabulary, SDAR-style config fields
    (``mask_token_id``, ``block_size``)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    heads = args.n_heads
    cfg = Qwen3Config(
        vocab_size=VOCAB_SIZE, hidden_size=args.d_model, intermediate_size=args.mlp_hidden_size,
        num_hidden_layers=args.n_layers, num_attention_heads=heads, num_key_value_heads=args.n_kv_heads or heads,
        head_dim=args.d_model // heads, max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta}, tie_word_embeddings=False,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
    )  # fmt: skip
    cfg.mask_token_id = MASK_ID
    cfg.block_size = args.block_length
    return Qwen3ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)


def block_diffusion_inputs(batch: TrainingBatch, block_length: int):
    """The clean sequence followed by noisy copies of its answer blocks.

    Args:
        batch: from `sample_training_batch` (``input_ids`` holds the masked answers).
        block_length: BL.
    Returns:
        (input_ids (B, T + M), position_ids (B, T + M), mask (1, 1, T + M, T + M) bool, index (K,)
        of each answer token's noisy copy in the input): M = BL times the answer blocks.
    """
    device = batch.input_ids.device
    B, T = batch.input_ids.shape
    clean_ids = batch.input_ids.clone()
    clean_ids[:, batch.answer_pos] = batch.targets
    blocks = torch.unique(batch.answer_pos // block_length)  # the blocks holding answer tokens, ascending
    noisy_pos = (blocks[:, None] * block_length + torch.arange(block_length, device=device)).flatten()
    noisy_pos = noisy_pos[noisy_pos < T]  # the last block may be short
    ids = torch.cat([clean_ids, batch.input_ids[:, noisy_pos]], 1)
    pos = torch.cat([torch.arange(T, device=device), noisy_pos])
    block = pos // block_length
    clean = torch.arange(pos.numel(), device=device) < T
    # clean rows: clean keys of blocks <= own; noisy rows: clean keys of earlier blocks, noisy keys
    # of the same block (its own copy).
    same = block[:, None] == block[None, :]
    earlier = block[None, :] < block[:, None]
    mask = torch.where(
        clean[:, None], clean[None, :] & (earlier | same), (clean[None, :] & earlier) | (~clean[None, :] & same)
    )
    slot = torch.full((T,), -1, dtype=torch.long, device=device)
    slot[noisy_pos] = torch.arange(noisy_pos.numel(), device=device) + T
    return ids, pos.expand(B, -1), mask[None, None], slot[batch.answer_pos]


def blockdiff_answer_logits(model, batch: TrainingBatch, block_length: int) -> torch.Tensor:
    """(B, K, V) logits at the noisy copies of the answer tokens (the training forward)."""
    ids, pos, mask, index = block_diffusion_inputs(batch, block_length)
    return model(input_ids=ids, position_ids=pos, attention_mask=mask, logits_to_keep=index).logits
