"""Block scoring in plain PyTorch: softmax probability mass per (query block, key block) pair.

The importance of a block pair is the mean softmax probability of its (query, attendable key)
entries under the layer's real softmax. `switch_step.block_importance` turns these pieces into
importance on any device (the fused Triton kernel in `kernels/importance.py` computes the same
sums on CUDA).
"""

from __future__ import annotations

import torch

__all__ = ["block_prob_sums", "importance_from_sums", "key_block_counts", "num_blocks"]

# Bytes of fp32 scores materialised at once while scoring: bounds memory at 64k tokens. 32 MiB
# ran 2x faster than 256 MiB on 2 CPU cores (8 x 8 heads x 2053^2, d 32: 1.5 s vs 3.1 s).
_SCORE_CHUNK_BYTES = 32 * 2**20


def num_blocks(n: int, block_size: int) -> int:
    return (n + block_size - 1) // block_size


def key_block_counts(
    key_valid: torch.Tensor | None, kv_len: int, block_size: int, batch: int, device: torch.device
) -> torch.Tensor:
    """Number of attendable keys in every key block.

    Args:
        key_valid: (B, S) bool, True for real keys; None when every key is real.
    Returns:
        (B, nKV) int64 counts; the tail block of a length that is not a block multiple is short.
    """
    n_kv = num_blocks(kv_len, block_size)
    if key_valid is None:
        # Built by arithmetic, not by writing a Python number into a device tensor (a host sync).
        starts = torch.arange(n_kv, dtype=torch.int64, device=device) * block_size
        return (kv_len - starts).clamp(max=block_size).expand(batch, n_kv)
    pad = n_kv * block_size - kv_len
    padded = torch.nn.functional.pad(key_valid, (0, pad), value=False)
    return padded.view(batch, n_kv, block_size).sum(-1)


def importance_from_sums(sums: torch.Tensor, q_len: int, counts: torch.Tensor, block_size: int) -> torch.Tensor:
    """Turn per-block-pair probability sums into means; key blocks with no key get -inf.

    Args:
        sums: (B, H, nQ, nKV) float32 sums of softmax probabilities per block pair.
        counts: (B, nKV) attendable keys per key block (see key_block_counts).
    Returns:
        (B, H, nQ, nKV) float32 importance.
    """
    B, _, n_q, n_kv = sums.shape
    starts = torch.arange(n_q, dtype=torch.float32, device=sums.device) * block_size
    q_rows = (q_len - starts).clamp(max=block_size)  # the last query block may be short
    denom = q_rows.view(1, 1, n_q, 1) * counts.view(B, 1, 1, n_kv).float()
    out = sums / denom
    return out.masked_fill_((counts == 0).view(B, 1, 1, n_kv), float("-inf"))


@torch.no_grad()
def block_prob_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    block_size: int,
    key_valid: torch.Tensor | None = None,
    chunk_bytes: int = _SCORE_CHUNK_BYTES,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of softmax probabilities per (query block, key block) pair, in plain PyTorch.

    `switch_step.block_importance` uses it wherever the fused Triton kernel does not apply
    (CPU, no Triton, a head_dim that is not a power of two).

    Rows are normalised over all attendable keys (the real softmax of the layer). Scores are
    computed in float32 a chunk of query rows at a time, so at most ``chunk_bytes`` of scores
    live at once.

    Args:
        query: (B, Hq, L, D).
        key: (B, Hkv, S, D), Hq % Hkv == 0 (GQA: no repetition is materialised).
        scaling: the attention's softmax scale (the module's ``scaling``).
        key_valid: (B, S) bool, True for real keys; None when all keys are real.
        lse: (B, Hq, L) natural-log log-sum-exp of the rows, or None: each row is normalised
            by its own sum here. Given, a row's probabilities are exp(score - lse), as the
            fused kernel computes them (a row with lse +inf adds nothing).
    Returns:
        (B, Hq, nQ, nKV) float32.
    """
    B, Hq, L, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    G = Hq // Hkv
    n_q, n_kv = num_blocks(L, block_size), num_blocks(S, block_size)
    k32 = key.float().unsqueeze(2)  # (B, Hkv, 1, S, D)
    masked = None if key_valid is None else ~key_valid.view(B, 1, 1, 1, S)

    # Rows per chunk: whole query blocks, as many as fit the score budget.
    rows = max(1, chunk_bytes // (4 * Hq * S * block_size)) * block_size
    full = (S // block_size) * block_size  # keys in whole blocks; the rest is the short tail block
    out = torch.empty(B, Hq, n_q, n_kv, device=query.device, dtype=torch.float32)
    for r0 in range(0, L, rows):
        r1 = min(L, r0 + rows)
        q32 = query[:, :, r0:r1].float().view(B, Hkv, G, r1 - r0, D)
        scores = torch.matmul(q32, k32.transpose(-1, -2)).mul_(scaling)  # (B, Hkv, G, r, S)
        if masked is not None:
            # masked_fill, not an additive bias: padded keys may hold NaN garbage.
            scores.masked_fill_(masked, float("-inf"))
        if lse is None:  # softmax in place, normalised after the key-block sums (one division per block)
            row_max = scores.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)
        else:
            row_max = lse[:, :, r0:r1].float().reshape(B, Hkv, G, r1 - r0, 1)
        probs = scores.sub_(row_max).exp_()
        per_key_block = probs[..., :full].unflatten(-1, (full // block_size, block_size)).sum(-1)
        if full < S:
            per_key_block = torch.cat([per_key_block, probs[..., full:].sum(-1, keepdim=True)], -1)
        if lse is None:
            denom = per_key_block.sum(-1, keepdim=True)
            # A query row whose keys are all masked has no distribution; it adds nothing.
            per_key_block = per_key_block.div_(denom)
        per_key_block = per_key_block.nan_to_num_(nan=0.0)  # (B, Hkv, G, r, nKV)
        nb = num_blocks(r1 - r0, block_size)
        per_key_block = torch.nn.functional.pad(per_key_block, (0, 0, 0, nb * block_size - (r1 - r0)))
        sums = per_key_block.view(B, Hkv, G, nb, block_size, n_kv).sum(4)
        out[:, :, r0 // block_size : r0 // block_size + nb] = sums.view(B, Hq, nb, n_kv)
    return out
