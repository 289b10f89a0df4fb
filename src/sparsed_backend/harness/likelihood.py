"""Monte Carlo masked log-likelihood of a continuation under a masked diffusion LM.

A masked diffusion LM gives no exact ``log p(continuation | context)``; LLaDA's authors score
multiple-choice tasks with a Monte Carlo estimate of a lower bound on it (Nie et al., "Large
Language Diffusion Models", arXiv 2502.09992: the conditional likelihood estimate with the
number of masked tokens drawn uniformly). We use the same estimate for Dream, following its
shifted logits. For a continuation ``c`` of ``L`` tokens after a context ``p``, one sample

1. draws ``l`` uniformly from ``1..L``,
2. masks a uniformly random subset of ``l`` continuation tokens (the context stays visible),
3. scores ``(L / l) * sum over the masked positions i of log p_theta(c_i | p, masked c)``.

The estimate is the mean over ``mc_samples`` samples; its expectation is a lower bound on
``log p(c | p)``. Drawing the number of masked tokens (rather than a masking probability ``t``
with weight ``1 / t``) is the lower-variance form LLaDA's evaluation uses.

Rows (one per sample, plus one "greedy" row per request with the whole continuation masked)
are packed across requests into batches of ``batch_size``, LEFT padded, with position ids that
skip the padding, so a row computes what it would alone. Each request's masks come from its
own CPU generator seeded from ``seed`` and the request's token ids: the same request gets the
same masks whatever the batch size, request order or device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["draw_masks", "masked_loglikelihood", "request_seed"]


def request_seed(seed: int, context: Sequence[int], continuation: Sequence[int]) -> int:
    """A 63-bit generator seed from ``seed`` and the request's token ids (stable across runs)."""
    text = f"{seed}|{','.join(map(str, context))}|{','.join(map(str, continuation))}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def draw_masks(length: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """(samples, length) bool: each row masks ``l ~ U{1..length}`` positions, a uniform subset."""
    counts = torch.randint(1, length + 1, (samples, 1), generator=generator)
    # The rank of i.i.d. uniforms is a uniformly random permutation; rank < l picks l positions.
    rank = torch.rand(samples, length, generator=generator).argsort(-1).argsort(-1)
    return rank < counts


@dataclass(frozen=True)
class _Row:
    request: int  # index into the requests
    ids: torch.Tensor  # (T,) context + continuation, masked positions already replaced
    targets: torch.Tensor  # (L,) the continuation
    masked: torch.Tensor  # (L,) bool
    greedy: bool  # the all-masked row that decides the greedy flag


def _rows(requests, mc_samples: int, seed: int, mask_id: int) -> Iterator[_Row]:
    # Longest first, so that rows of similar length share a batch (little padding).
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    for i in order:
        context, continuation = requests[i]
        ctx = torch.tensor(context, dtype=torch.long)
        cont = torch.tensor(continuation, dtype=torch.long)
        g = torch.Generator().manual_seed(request_seed(seed, context, continuation))
        for m in draw_masks(len(continuation), mc_samples, g):
            yield _Row(i, torch.cat([ctx, cont.masked_fill(m, mask_id)]), cont, m, greedy=False)
        everything = torch.ones(len(continuation), dtype=torch.bool)
        yield _Row(i, torch.cat([ctx, cont.masked_fill(everything, mask_id)]), cont, everything, greedy=True)


def _batches(rows: Iterator[_Row], batch_size: int) -> Iterator[list[_Row]]:
    batch: list[_Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _score(model: nn.Module, batch: list[_Row], pad_id: int, shifted: bool, device) -> tuple[list, list]:
    """One forward of a packed batch -> per-row weighted masked log-prob sum, per-row greedy match."""
    B = len(batch)
    T = max(len(r.ids) for r in batch)
    Lmax = max(len(r.targets) for r in batch)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    real = torch.zeros(B, T, dtype=torch.long)
    targets = torch.zeros(B, Lmax, dtype=torch.long)
    masked = torch.zeros(B, Lmax, dtype=torch.bool)
    for b, r in enumerate(batch):  # everything right aligned: the continuations end at T
        ids[b, T - len(r.ids) :] = r.ids
        real[b, T - len(r.ids) :] = 1
        targets[b, Lmax - len(r.targets) :] = r.targets
        masked[b, Lmax - len(r.targets) :] = r.masked
    ids, real, targets, masked = ids.to(device), real.to(device), targets.to(device), masked.to(device)
    kwargs = {}
    if not bool(real.all()):
        kwargs = {"attention_mask": real, "position_ids": (real.cumsum(-1) - 1).clamp_min(0)}
    # Dream predicts token j from position j - 1 (shifted logits); LLaDA from position j.
    shift = 1 if shifted else 0
    keep = torch.arange(T - Lmax - shift, T - shift, device=device)
    logits = model(input_ids=ids, logits_to_keep=keep, **kwargs).logits  # (B, Lmax, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(-1, targets[..., None]).squeeze(-1)  # (B, Lmax)
    picked = torch.where(masked, token_logp, 0.0).sum(-1)  # (B,)
    n_masked = masked.sum(-1)
    lengths = torch.tensor([len(r.targets) for r in batch], device=device)
    value = picked * lengths / n_masked.clamp_min(1)  # (B,) weight L / l
    argmax_ok = ((logp.argmax(-1) == targets) | ~masked).all(-1)  # (B,)
    return value.double().cpu().tolist(), argmax_ok.cpu().tolist()


@torch.inference_mode()
def masked_loglikelihood(
    model: nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    mask_id: int,
    pad_id: int,
    mc_samples: int,
    batch_size: int,
    seed: int,
    shifted: bool = False,
    device: torch.device | str | None = None,
) -> list[tuple[float, bool]]:
    """Monte Carlo masked log-likelihood of each (context ids, continuation ids) request.

    Args:
        model: a bidirectional masked diffusion LM taking ``input_ids``, ``attention_mask``,
            ``position_ids`` and ``logits_to_keep`` (LLaDAModelLM, DreamModel).
        requests: (context, continuation) token id lists; the context must hold at least one
            token (Dream reads the first continuation token's logits at the last context token).
        mask_id: the mask token; must not occur in the requests.
        pad_id: token put in the left padding (never attended to).
        mc_samples: samples per request.
        batch_size: rows per forward (a request takes ``mc_samples + 1`` rows).
        seed: with the request's ids, seeds its masks.
        shifted: True for Dream's shifted logits.
        device: where the forwards run; None: the model's device.

    Returns:
        One ``(estimate, greedy)`` per request, in order: the estimate in nats, and whether the
        argmax at every continuation position equals the continuation when all of it is masked.
    """
    if device is None:
        device = next(model.parameters()).device
    for i, (context, continuation) in enumerate(requests):
        if len(context) == 0:
            raise ValueError(f"requests[{i}]: the context must hold at least one token, got none")
        if len(continuation) == 0:
            raise ValueError(f"requests[{i}]: the continuation must hold at least one token, got none")
        if mask_id in context or mask_id in continuation:
            raise ValueError(f"requests[{i}] contains the mask token (id {mask_id})")
    sums = [0.0] * len(requests)
    greedy = [False] * len(requests)
    for batch in _batches(_rows(requests, mc_samples, seed, mask_id), batch_size):
        values, ok = _score(model, batch, pad_id, shifted, device)
        for row, v, g in zip(batch, values, ok, strict=True):
            if row.greedy:
                greedy[row.request] = bool(g)
            else:
                sums[row.request] += v
    return [(s / mc_samples, g) for s, g in zip(sums, greedy, strict=True)]
