"""Associative-recall probe: does a small model learn to look a key up in context, and when?

Sequences are ``k1 v1 k2 v2 ... kR vR`` followed by ``nq`` questions ``Q kq M``; the model
predicts each question's value at its ``M`` position (cross-entropy there only). Keys are
distinct per sequence; keys and values are single tokens. Chance is 1/nv; answering "one of
the R values in the prompt" gives about 1/R, the plateau the retrieval demo model never left
(training/EXPERIMENTS.md).

    python training/probe_recall.py --r 2 --nq 2                       # our LLaDA architecture
    python training/probe_recall.py --r 2 --nq 2 --vanilla --causal    # torch.nn encoder, causal mask

Prints loss and accuracy (averaged since the last line) every --every steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from sparsed_backend.models.llada import LLaDAConfig, LLaDAModelLM  # noqa: E402


class Vanilla(nn.Module):
    """Pre-norm torch.nn Transformer encoder with learned absolute positions (a control)."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, causal: bool) -> None:
        super().__init__()
        self.emb, self.pos, self.causal = nn.Embedding(vocab, d), nn.Embedding(1024, d), causal
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, 0.0, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=ids.device) if self.causal else None
        return self.out(self.enc(self.emb(ids) + self.pos.weight[:n], mask=mask, is_causal=self.causal))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--nk", type=int, default=64, help="key vocabulary")
    a("--nv", type=int, default=64, help="value vocabulary")
    a("--r", type=int, default=8, help="records per sequence")
    a("--nq", type=int, default=1, help="questions per sequence (distinct records)")
    a("--batch", type=int, default=64)
    a("--steps", type=int, default=30000)
    a("--lr", type=float, default=1e-3)
    a("--warmup", type=int, default=200)
    a("--d", type=int, default=128)
    a("--heads", type=int, default=4)
    a("--layers", type=int, default=2)
    a("--rope-theta", type=float, default=500000.0)
    a("--vanilla", action="store_true", help="torch.nn encoder instead of the LLaDA architecture")
    a("--causal", action="store_true", help="causal mask (vanilla only)")
    a("--bf16", action="store_true", help="bf16 autocast")
    a("--every", type=int, default=1000)
    args = p.parse_args()
    if not 1 <= args.nq <= args.r <= args.nk:
        p.error(f"need 1 <= nq <= r <= nk, got nq={args.nq} r={args.r} nk={args.nk}")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    vocab = args.nk + args.nv + 2
    q_tok, m_tok = args.nk + args.nv, args.nk + args.nv + 1
    if args.vanilla:
        model = Vanilla(vocab, args.d, args.heads, args.layers, args.causal).to(dev)
    else:
        cfg = LLaDAConfig(d_model=args.d, n_heads=args.heads, n_kv_heads=args.heads, n_layers=args.layers,
                          mlp_hidden_size=2 * args.d, vocab_size=vocab, embedding_size=vocab,
                          rope_theta=args.rope_theta, mask_token_id=m_tok, eos_token_id=0, pad_token_id=0,
                          weight_tying=False)  # fmt: skip
        model = LLaDAModelLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).to(dev)

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        out = model(ids) if args.vanilla else model(input_ids=ids).logits
        return out[:, 2 * args.r + 2 :: 3].float()  # the M positions, (B, nq, V)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    b = args.batch

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.rand(b, args.nk, device=dev).argsort(1)[:, : args.r]
        vals = args.nk + torch.randint(0, args.nv, (b, args.r), device=dev)
        q = torch.rand(b, args.r, device=dev).argsort(1)[:, : args.nq]
        records = torch.stack([keys, vals], 2).reshape(b, 2 * args.r)
        questions = torch.stack([torch.full_like(q, q_tok), keys.gather(1, q), torch.full_like(q, m_tok)], 2)
        return torch.cat([records, questions.reshape(b, 3 * args.nq)], 1), vals.gather(1, q)

    t0, losses, accs = time.time(), [], []
    for step in range(args.steps + 1):
        ids, ans = batch()
        with torch.autocast(dev.type, torch.bfloat16, enabled=args.bf16):
            logits = logits_of(ids)
        loss = F.cross_entropy(logits.flatten(0, 1), ans.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.detach())
        accs.append((logits.argmax(-1) == ans).float().mean())
        if step % args.every == 0:
            print(f"step {step:7d}  loss {torch.stack(losses).mean():.3f}  acc {torch.stack(accs).mean():.3f}  "
                  f"{time.time() - t0:.0f}s", flush=True)  # fmt: skip
            losses, accs = [], []


if __name__ == "__main__":
    main()
