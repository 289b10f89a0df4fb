"""Train the demo model: a small LLaDA-architecture masked-diffusion LM on key-value retrieval.

The task (`sparsed_backend.demo.task`) puts a few hundred random ``key:value;`` records in a
prompt and asks for one key's value at the end; the value is random, so the model can only
answer by attending to the matching record. The answer (4 tokens) sits right after the
question, as LLaDA's SFT layout has it (prompt, then response). Training prompts may ask up to
--max-queries questions, the earlier ones answered in the prompt (``?k1:v1;?k2:``); every
answer is a response token, which multiplies the supervision per sequence. Evaluation asks one.

Objective: LLaDA's SFT loss. Per example draw t ~ U(eps, 1), mask each answer token with
probability t (the prompt is never masked), cross-entropy on masked tokens weighted 1/t,
normalised by the answer length. We also require at least one masked token, sampling the mask
exactly from its distribution given that condition; the weight P(>=1 masked | t) / t keeps
the estimator unbiased for the same 1/t objective and bounds it by the answer length (plain
forcing with 1/t gives weights up to 1/eps = 1000 on the easiest examples).

Schedule: the learning rate (warm-up + cosine) is a function of progress = elapsed / budget,
so the run always completes its schedule inside --max-minutes on any device; --max-steps, when
set, can end it earlier (progress = max of both fractions). The length curriculum moves to
longer prompts as soon as the model retrieves well at the current longest one (see
`Curriculum`), and at the latest on a time schedule.
Each step draws one sequence length (rectangular batch, no padding) and
batch = batch_tokens // length, so short sequences give many answers per step early on.

Evaluation: greedy low-confidence remasking over the answer (LLaDA's rule with block_length =
gen_length = 4, one token per step) with dense SDPA attention, on held-out prompts at several
lengths. The final numbers come from the checkpoint reloaded from --out.

    PYTHONPATH=src python3 training/train_retrieval.py            # H100, ~7 minutes
    PYTHONPATH=src python3 training/train_retrieval.py --smoke    # CPU, < 1 minute
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "src") not in sys.path:  # PYTHONPATH=src is the documented way; this is a guard
    sys.path.insert(0, str(REPO / "src"))

from sparsed_backend.demo.task import (  # noqa: E402
    ANSWER_LEN,
    KEY_ALPHABET,
    KV_SEP,
    QUESTION,
    RECORD_SEP,
    VALUE_ALPHABET,
    exact_match,
    make_batch,
    make_record_example,
    min_tokens,
)
from sparsed_backend.demo.tokenizer import build_tokenizer  # noqa: E402

CONFIG_PATH = Path(__file__).resolve().with_name("config.json")
GEN_LEN = ANSWER_LEN  # the response is exactly the answer: no EOS padding


# --------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every default comes from training/config.json."""
    defaults = json.loads(CONFIG_PATH.read_text())
    smoke = defaults.pop("smoke")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--smoke", action="store_true", help="tiny CPU run (config.json 'smoke' overrides)")
    a("--seed", type=int, help="seeds model init, masking and data")
    a("--init-from", help="start from this checkpoint directory (e.g. to train a saved model longer)")
    # model (LLaDAConfig fields)
    a("--d-model", type=int)
    a("--n-heads", type=int, help="query = key/value heads (MHA, as LLaDA-8B)")
    a("--n-layers", type=int)
    a("--mlp-hidden-size", type=int, help="SwiGLU width")
    a("--embedding-size", type=int, help="rows of wte / LM head (vocab rounded up)")
    a("--rope-theta", type=float)
    a("--max-sequence-length", type=int, help="recorded in the config; RoPE has no limit")
    # optimisation
    a("--lr", type=float, help="peak AdamW learning rate")
    a("--min-lr-ratio", type=float, help="final lr / peak lr of the cosine")
    a("--warmup", type=float, help="warm-up as a fraction of progress")
    a("--weight-decay", type=float, help="on weight matrices (not norms)")
    a("--decay-embeddings", action=argparse.BooleanOptionalAction, help="also decay the token embedding")
    a("--beta1", type=float)
    a("--beta2", type=float)
    a("--grad-clip", type=float)
    a("--mask-eps", type=float, help="t ~ U(eps, 1) as in LLaDA")
    a("--p-full-mask", type=float, help="share of sequences with t = 1 (every answer token masked)")
    a("--p-prompt-mask", type=float, help="prompt tokens masked with probability this * t (0: never)")
    a("--p-few-records", type=float, help="share of steps with prompts of only 2..--few-records records")
    a("--few-records", type=int, help="most records in such a prompt")
    a("--batch-tokens", type=int, help="tokens per step; batch = this // length")
    a("--train-lengths", type=int, nargs="+", help="sequence lengths (BOS+prompt+answer)")
    a("--curriculum-start", type=int, help="longest length allowed at first")
    a("--curriculum-end", type=float, help="progress by which every length is allowed")
    a("--promote-em", type=float, help="exact match at the longest length that unlocks the next")
    a("--gate-every-s", type=float, help="seconds between curriculum checks")
    a("--gate-examples", type=int, help="held-out prompts per curriculum check")
    a("--p-longest", type=float, help="share of steps at the longest allowed length")
    a("--max-queries", type=int, help="training prompts ask 1..this many questions")
    a("--p-single-query", type=float, help="share of batches with one question (the eval format)")
    a("--tokens-per-query", type=int, help="at most one question per this many tokens")
    a("--max-minutes", type=float, help="wall-clock budget of the whole run")
    a("--final-reserve-s", type=float, help="part of the budget kept for final eval + save")
    a("--max-steps", type=int, help="0: no step limit (time only)")
    # logging / eval
    a("--log-every", type=int, help="steps between loss lines")
    a("--eval-every-s", type=float, help="seconds between periodic evals")
    a("--eval-lengths", type=int, nargs="+", help="sequence lengths evaluated")
    a("--eval-examples", type=int, help="held-out prompts per length, final eval")
    a("--eval-examples-periodic", type=int, help="held-out prompts per length, periodic")
    a("--eval-batch-tokens", type=int)
    # systems
    a("--workers", type=int, help="data processes (0: in the main process)")
    a("--prefetch", type=int, help="batches requested ahead")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    a("--amp-dtype", choices=["bfloat16", "float32"], help="autocast dtype (CUDA)")
    a("--save-dtype", choices=["float32", "bfloat16"])
    a("--device", help="auto | cpu | cuda | cuda:N")
    a("--out", help="checkpoint + tokenizer directory (save_pretrained)")
    a("--log", help="log file")
    a("--summary", help="final JSON summary")
    known = {action.dest for action in p._actions}
    unknown = sorted(set(defaults) - known) + sorted(set(smoke) - known)
    if unknown:
        raise ValueError(f"{CONFIG_PATH}: unknown keys {unknown}")
    p.set_defaults(**defaults)
    args = p.parse_args(argv)
    if args.smoke:
        given = {s.lstrip("-").split("=")[0].replace("-", "_") for s in (argv or sys.argv[1:])}
        for k, v in smoke.items():
            if k not in given:  # explicit flags still win over the smoke preset
                setattr(args, k, v)
        if args.out is None:
            args.out = tempfile.mkdtemp(prefix="retrieval_smoke_")
        args.log = args.log or str(Path(args.out) / "log.txt")
        args.summary = args.summary or str(Path(args.out) / "summary.json")
    for name in ("out", "log", "summary"):  # relative paths are relative to the repo root
        path = Path(getattr(args, name))
        setattr(args, name, str(path if path.is_absolute() else REPO / path))
    min_len = min(args.train_lengths + args.eval_lengths)
    if min_len < 64:
        p.error(f"lengths must be >= 64 (the task needs >= 56 prompt characters), got {min_len}")
    if args.p_few_records > 0:
        record, question = len(f"k{KV_SEP}{'v' * ANSWER_LEN}{RECORD_SEP}"), len(f"{QUESTION}k{KV_SEP}")
        need = args.few_records * record + question
        if args.few_records < 2 or need > min(args.train_lengths) - 1 - GEN_LEN:
            p.error(
                f"--few-records must be >= 2 and its prompts ({need} characters) must fit the shortest "
                f"training length {min(args.train_lengths)} minus BOS and answer, got {args.few_records}"
            )
    if args.d_model % args.n_heads:
        p.error(f"--d-model {args.d_model} is not divisible by --n-heads {args.n_heads}")
    return args


# --------------------------------------------------------------------------- data


class Encoder:
    """Character -> token id lookup (the tokenizer's vocabulary), fast enough for workers."""

    def __init__(self, tokenizer) -> None:
        vocab = tokenizer.get_vocab()
        self.lut = np.full(0x10000, tokenizer.unk_token_id, dtype=np.int64)
        for tok, i in vocab.items():
            if len(tok) == 1 and ord(tok) < 0x10000:
                self.lut[ord(tok)] = i
        self.bos = tokenizer.bos_token_id

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Equal-length strings (Basic Multilingual Plane) -> (B, 1 + len) int64 with BOS first."""
        flat = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
        ids = self.lut[flat].reshape(len(texts), -1)
        return np.concatenate([np.full((len(texts), 1), self.bos, np.int64), ids], axis=1)


_ENCODER: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _ENCODER
    _ENCODER = encoder
    torch.set_num_threads(1)


FILLER = "."  # left padding of few-record prompts (in the tokenizer, in no key or value)


def few_record_example(rng: random.Random, n_tokens: int, n_records: int) -> tuple[str, str]:
    """A prompt of ``n_tokens`` characters with only ``n_records`` records (single-symbol keys)
    and one question, left-padded with FILLER; returns (prompt, answer)."""
    keys = rng.sample(KEY_ALPHABET, n_records)
    values = ["".join(rng.choices(VALUE_ALPHABET, k=ANSWER_LEN)) for _ in range(n_records)]
    q = rng.randrange(n_records)
    records = "".join(f"{k}{KV_SEP}{v}{RECORD_SEP}" for k, v in zip(keys, values, strict=True))
    body = records + f"{QUESTION}{keys[q]}{KV_SEP}"
    return FILLER * (n_tokens - len(body)) + body, values[q]


def make_train_batch(
    seed: int, seq_len: int, batch: int, n_queries: int, few: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (batch, seq_len), BOS + prompt + answer, and the answer positions.

    ``few`` > 0 draws prompts of 2..few records (left-padded, one question) instead: lookups
    among a handful of records (the recall probe learnt 2-record lookup quickly with 4 layers;
    mixed into this task it did not help, EXPERIMENTS.md).

    Returns:
        ids (B, L) int64 and answer positions (B, n_queries * GEN_LEN) int64: every question's
        answer (the open one last, at the end of the sequence).
    """
    assert _ENCODER is not None
    rng = random.Random(seed)
    n_prompt = seq_len - 1 - GEN_LEN
    if few:
        exs = [few_record_example(rng, n_prompt, rng.randint(2, few)) for _ in range(batch)]
        ids = _ENCODER([p + a for p, a in exs])
        starts = np.full((batch, 1), n_prompt + 1, dtype=np.int64)  # the answer ends every row
    else:
        recs = [make_record_example(rng, n_prompt, n_queries) for _ in range(batch)]
        ids = _ENCODER([ex.prompt + ex.answer for ex in recs])
        starts = np.array([ex.answer_offsets for ex in recs], dtype=np.int64) + 1  # + BOS
    pos = (starts[:, :, None] + np.arange(GEN_LEN)).reshape(batch, -1)  # (B, Q * G)
    return ids, pos


class Loader:
    """Keeps ``prefetch`` batches in flight in worker processes; lengths chosen at request."""

    def __init__(self, args: argparse.Namespace, encoder: Encoder, choose_len) -> None:
        self.args, self.choose_len, self.count = args, choose_len, 0
        self.pool = None
        if args.workers > 0:
            # spawn: never fork a process that may hold a CUDA context.
            ctx = mp.get_context("spawn")
            self.pool = ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker, initargs=(encoder,))
        else:
            _init_worker(encoder)
        self.queue: deque[Future | tuple[np.ndarray, np.ndarray]] = deque()

    def _request(self) -> None:
        seq_len, n_queries, few = self.choose_len()
        batch = max(1, self.args.batch_tokens // seq_len)
        seed = self.args.seed * 1_000_003 + self.count  # batch i: a function of (seed, i, shape)
        self.count += 1
        job = (seed, seq_len, batch, n_queries, few)
        if self.pool is None:
            self.queue.append(make_train_batch(*job))
        else:
            self.queue.append(self.pool.submit(make_train_batch, *job))

    def warm(self) -> None:
        """Fill the prefetch queue and wait for its first batch (workers started and importing)."""
        while len(self.queue) < max(1, self.args.prefetch):
            self._request()
        first = self.queue[0]
        if isinstance(first, Future):
            first.result()

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        while len(self.queue) < max(1, self.args.prefetch):
            self._request()
        item = self.queue.popleft()
        self._request()
        return item.result() if isinstance(item, Future) else item

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def eval_sets(args, tokenizer, n: int, lengths: list[int] | None = None) -> dict[int, tuple[torch.Tensor, list[str]]]:
    """Held-out prompts per length, tokenised by the real tokenizer: (n, L - GEN_LEN) ids."""
    out = {}
    for seq_len in lengths or args.eval_lengths:
        rng = random.Random(f"eval-{args.seed}-{seq_len}")  # disjoint from training seeds
        prompts, answers = make_batch(rng, seq_len - 1 - GEN_LEN, n)
        ids = torch.tensor(tokenizer(prompts)["input_ids"], dtype=torch.long)
        assert ids.shape == (n, seq_len - GEN_LEN), ids.shape
        out[seq_len] = (ids, answers)
    return out


# --------------------------------------------------------------------------- model


def build_model(args, tokenizer, device: torch.device):
    from sparsed_backend.models.llada import LLaDAConfig, LLaDAModelLM

    assert args.embedding_size >= len(tokenizer)
    cfg = LLaDAConfig(
        d_model=args.d_model,
        n_heads=args.n_heads,
        n_kv_heads=args.n_heads,
        n_layers=args.n_layers,
        mlp_hidden_size=args.mlp_hidden_size,
        vocab_size=len(tokenizer),
        embedding_size=args.embedding_size,
        max_sequence_length=args.max_sequence_length,
        rope_theta=args.rope_theta,
        rms_norm_eps=1e-5,
        include_bias=False,
        weight_tying=False,
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        demo_gen_length=GEN_LEN,  # the answer span; read by the demo and the fidelity benchmark
    )
    torch.manual_seed(args.seed)
    model = LLaDAModelLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    init_weights(model, args.n_layers)
    if args.init_from:
        # Shapes come from the command line / config.json and must match the checkpoint's.
        state = LLaDAModelLM.from_pretrained(args.init_from, dtype=torch.float32).state_dict()
        model.load_state_dict(state, strict=True)
    return model.to(device)


@torch.no_grad()
def init_weights(model: torch.nn.Module, n_layers: int, std: float = 0.02) -> None:
    """N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 n_layers) (GPT-2)."""
    for name, p in model.named_parameters():
        if p.dim() == 1:
            torch.nn.init.ones_(p)  # RMSNorm weights
        elif ".blocks." in name and name.endswith(("attn_out.weight", "ff_out.weight")):
            torch.nn.init.normal_(p, 0.0, std / math.sqrt(2 * n_layers))
        else:
            torch.nn.init.normal_(p, 0.0, std)


def make_optimizer(model, args, device) -> torch.optim.AdamW:
    # Norm weights never decay; the token embedding only with --decay-embeddings: each key
    # symbol appears in a small share of batches, so decoupled decay applied at every step
    # shrinks key embeddings between their rare gradient updates.
    emb = model.get_input_embeddings().weight
    decay = [p for p in model.parameters() if p.dim() >= 2 and (args.decay_embeddings or p is not emb)]
    ids = {id(p) for p in decay}
    no_decay = [p for p in model.parameters() if id(p) not in ids]
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=fused)


# --------------------------------------------------------------------------- objective


def sample_answer_mask(t: torch.Tensor, gen_len: int, gen: torch.Generator) -> torch.Tensor:
    """Bernoulli(t) mask over gen_len answer tokens, conditioned on at least one masked.

    Exact: the first masked index J has P(J = j) proportional to (1 - t)^j t (inverse CDF),
    positions before J stay, positions after J are i.i.d. Bernoulli(t).

    Args:
        t: (B,) masking probabilities in (0, 1).
    Returns:
        (B, gen_len) bool.
    """
    b = t.shape[0]
    q = (1.0 - t).clamp_min(1e-12)
    z = 1.0 - q.pow(gen_len)  # P(at least one masked)
    u = torch.rand(b, device=t.device, generator=gen)
    first = torch.ceil(torch.log1p(-u * z) / torch.log(q)) - 1
    first = first.nan_to_num(0).clamp(0, gen_len - 1).long()  # (B,)
    pos = torch.arange(gen_len, device=t.device)
    rest = torch.rand(b, gen_len, device=t.device, generator=gen) < t[:, None]
    return (pos == first[:, None]) | ((pos > first[:, None]) & rest)


def diffusion_loss(
    model,
    ids: torch.Tensor,
    ans: torch.Tensor,
    mask_id: int,
    eps: float,
    gen: torch.Generator,
    p_full: float = 0.0,
    p_prompt: float = 0.0,
):
    """LLaDA SFT loss on the response tokens of ids.

    Args:
        ids: (B, L) clean token ids.
        ans: (B, K) positions of the response tokens (every question's answer).
        p_prompt: also mask each prompt token (not BOS) with probability p_prompt * t and add
            their 1/t-weighted cross-entropy, averaged over prompt tokens (LLaDA pre-training
            masks every position). Separators are predictable from their neighbours and a value
            answered in the prompt from its record, so this rewards the positional and matching
            attention that retrieval is built from.
    Returns:
        (loss, masked-token accuracy on the answers), both 0-dim tensors (no host sync).
    """
    b, k = ans.shape
    t = (1 - eps) * torch.rand(b, device=ids.device, generator=gen) + eps  # (B,)
    # t = 1 for a share of rows: the state greedy decoding starts from (all masked), where only
    # the key can find the record; otherwise visible answer characters offer a shortcut.
    t = torch.where(torch.rand(b, device=ids.device, generator=gen) < p_full, 1.0, t)
    masked = sample_answer_mask(t, k, gen)  # (B, K)
    target = ids.gather(1, ans)  # (B, K)
    noisy = ids.scatter(1, ans, torch.where(masked, mask_id, target))
    if p_prompt > 0:
        prompt = torch.ones_like(ids, dtype=torch.bool).scatter(1, ans, False)
        prompt[:, 0] = False  # BOS
        hide = prompt & (torch.rand(ids.shape, device=ids.device, generator=gen) < p_prompt * t[:, None])
        noisy = noisy.masked_fill(hide, mask_id)
    full = model(input_ids=noisy).logits  # (B, L, V)
    logits = full.gather(1, ans[:, :, None].expand(-1, -1, full.shape[-1]))
    logits = logits.float()  # (B, K, V)
    ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (B, K)
    # 1/t of the ELBO times P(>=1 masked | t), the probability of the conditioning event.
    weight = (1.0 - (1.0 - t).pow(k)) / t  # (B,) in [1, K]
    loss = (ce * masked * weight[:, None]).sum() / (k * b)
    if p_prompt > 0:
        ce_all = F.cross_entropy(full.float().transpose(1, 2), ids, reduction="none")  # (B, L)
        loss = loss + (ce_all * hide / t[:, None]).sum() / prompt.sum()
    acc = ((logits.argmax(-1) == target) & masked).sum() / masked.sum()
    return loss, acc


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy_answer(model, prompt_ids: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Low-confidence remasking, one token per step: (B, P) prompt -> (B, GEN_LEN) answer ids."""
    b, n_prompt = prompt_ids.shape
    g = GEN_LEN
    x = torch.cat([prompt_ids, prompt_ids.new_full((b, g), mask_id)], dim=1)  # (B, P + G)
    rows = torch.arange(b, device=x.device)
    for _ in range(g):
        logits = model(input_ids=x, logits_to_keep=g).logits.float()  # (B, G, V)
        conf, pred = logits.softmax(-1).max(-1)  # (B, G)
        conf = conf.masked_fill(x[:, n_prompt:] != mask_id, -1.0)
        j = conf.argmax(-1)  # (B,) the most confident still-masked position
        x[rows, n_prompt + j] = pred[rows, j]
    return x[:, n_prompt:]


def evaluate(model, sets, tokenizer, args, device, amp, n: int | None = None) -> dict[int, float]:
    """Greedy exact match per sequence length (first n prompts of each set)."""
    was_training = model.training
    model.eval()
    result = {}
    for seq_len, (ids, answers) in sets.items():
        ids, answers = ids[:n], answers[:n]
        bs = max(1, args.eval_batch_tokens // seq_len)
        preds = []
        for i in range(0, len(answers), bs):
            with amp:
                out = greedy_answer(model, ids[i : i + bs].to(device), tokenizer.mask_token_id)
            preds += tokenizer.batch_decode(out.cpu(), skip_special_tokens=True)
        hits = [exact_match(p, a) for p, a in zip(preds, answers, strict=True)]
        result[seq_len] = sum(hits) / len(hits)
    model.train(was_training)
    return result


# --------------------------------------------------------------------------- schedule


def lr_at(progress: float, args) -> float:
    if progress < args.warmup:
        return args.lr * progress / args.warmup
    x = min(1.0, (progress - args.warmup) / max(1e-9, 1 - args.warmup))
    lo = args.lr * args.min_lr_ratio
    return lo + (args.lr - lo) * 0.5 * (1 + math.cos(math.pi * x))


class Curriculum:
    """Which training lengths are allowed: all up to a cap that moves up the length grid.

    The cap moves one length up as soon as greedy exact match at the cap reaches promote_em
    (a retrieval circuit learnt on short prompts transfers to long ones, so there is no point
    in paying for long sequences before it exists), and in any case follows a geometric time
    schedule reaching the longest length at progress curriculum_end.
    """

    def __init__(self, args) -> None:
        self.lengths = sorted(args.train_lengths)
        self.start = max(0, sum(n <= args.curriculum_start for n in self.lengths) - 1)
        self.level = self.start
        self.end = args.curriculum_end

    def _time_level(self, progress: float) -> int:
        frac = min(1.0, progress / self.end) if self.end > 0 else 1.0
        top = len(self.lengths) - 1
        return self.start + math.floor(frac * (top - self.start) + 1e-9)

    def cap(self, progress: float) -> int:
        return self.lengths[max(self.level, self._time_level(progress))]

    def allowed(self, progress: float) -> list[int]:
        cap = self.cap(progress)
        return [n for n in self.lengths if n <= cap]

    def promote(self, progress: float) -> None:
        self.level = min(len(self.lengths) - 1, max(self.level, self._time_level(progress)) + 1)


# --------------------------------------------------------------------------- main


class Logger:
    def __init__(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", buffering=1)  # noqa: SIM115 - lives for the whole run

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        self.file.write(msg + "\n")


def main(argv: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    args = parse_args(argv)
    log = Logger(args.log)
    budget_s = args.max_minutes * 60.0
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")  # TF32 for the few fp32 matmuls on CUDA
    amp_dtype = getattr(torch, args.amp_dtype)
    use_amp = device.type == "cuda" and amp_dtype != torch.float32

    def amp():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp)

    tokenizer = build_tokenizer(model_max_length=args.max_sequence_length)
    encoder = Encoder(tokenizer)
    probe = make_batch(random.Random(0), 100, 2)
    texts = [p + a for p, a in zip(*probe, strict=True)]
    assert encoder(texts).tolist() == tokenizer(texts)["input_ids"], "encoder != tokenizer"

    rng = random.Random(args.seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    progress_box = [0.0]
    curriculum = Curriculum(args)
    gate_sets: dict[int, tuple[torch.Tensor, list[str]]] = {}

    def choose_len() -> tuple[int, int, int]:
        allowed = curriculum.allowed(progress_box[0])
        if rng.random() < args.p_few_records:  # short, few-record lookups at the shortest length
            return allowed[0], 1, args.few_records
        seq_len = allowed[-1] if rng.random() < args.p_longest else rng.choice(allowed)
        q_max = max(1, min(args.max_queries, seq_len // args.tokens_per_query))
        while q_max > 1 and min_tokens(q_max) > seq_len - 1 - GEN_LEN:
            q_max -= 1
        single = q_max == 1 or rng.random() < args.p_single_query
        return seq_len, 1 if single else rng.randint(2, q_max), 0

    loader = Loader(args, encoder, choose_len)
    model = build_model(args, tokenizer, device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model, args, device)
    fwd = torch.compile(model, dynamic=True) if args.compile else model
    sets = eval_sets(args, tokenizer, args.eval_examples)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"device {dev_name}  torch {torch.__version__}  amp {use_amp} ({args.amp_dtype})")
    log(f"params {n_params:,}  ({n_params * 4 / 2**20:.1f} MiB fp32)  vocab {len(tokenizer)}")
    log("config " + json.dumps({k: v for k, v in vars(args).items()}, sort_keys=True))

    # Start the clock once the data workers deliver (spawning them and importing torch there
    # took 85 s on the lent H100 machine; counted as training time it skipped the warm-up and
    # moved the time-based curriculum on before the first step).
    loader.warm()
    train_budget = budget_s - args.final_reserve_s - (time.perf_counter() - t_start)
    log(f"set-up {time.perf_counter() - t_start:.1f}s; training budget {train_budget:.1f}s")
    t0 = time.perf_counter()
    step = tokens = answers_seen = 0
    loss_acc = torch.zeros((), device=device)
    acc_acc = torch.zeros((), device=device)
    n_acc = 0
    next_eval = args.eval_every_s
    next_gate = args.gate_every_s
    history = []
    model.train()
    while True:
        elapsed = time.perf_counter() - t0
        progress = elapsed / train_budget
        if args.max_steps:
            progress = max(progress, step / args.max_steps)
        if progress >= 1.0:
            break
        progress_box[0] = progress
        lr = lr_at(progress, args)
        for group in opt.param_groups:
            group["lr"] = lr

        batch, ans = (torch.from_numpy(x) for x in loader.next())
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
            ans = ans.pin_memory().to(device, non_blocking=True)
        with amp():
            loss, acc = diffusion_loss(
                fwd, batch, ans, tokenizer.mask_token_id, args.mask_eps, gen, args.p_full_mask, args.p_prompt_mask
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += batch.numel()
        answers_seen += ans.numel() // GEN_LEN
        loss_acc += loss.detach()
        acc_acc += acc.detach()
        n_acc += 1

        if step % args.log_every == 0:
            el = time.perf_counter() - t0
            log(
                f"step {step:6d}  prog {progress:.3f}  {el:6.1f}s  lr {lr:.2e}  "
                f"len {batch.shape[1]:5d}x{batch.shape[0]:<4d}  loss {loss_acc.item() / n_acc:.4f}  "
                f"masked-acc {acc_acc.item() / n_acc:.3f}  tok/s {tokens / el:,.0f}"
            )
            loss_acc.zero_()
            acc_acc.zero_()
            n_acc = 0
        if time.perf_counter() - t0 >= next_eval:
            em = evaluate(model, sets, tokenizer, args, device, amp(), n=args.eval_examples_periodic)
            el = time.perf_counter() - t0
            history.append({"step": step, "seconds": round(el, 1), "exact_match": em})
            log(f"eval  step {step:6d}  {el:6.1f}s  max-len {curriculum.cap(progress)}  " + _fmt(em))
            next_eval = el + args.eval_every_s
        if time.perf_counter() - t0 >= next_gate:
            cap = curriculum.cap(progress)
            if cap < curriculum.lengths[-1]:
                if cap not in gate_sets:
                    gate_sets.update(eval_sets(args, tokenizer, args.gate_examples, [cap]))
                em = evaluate(model, {cap: gate_sets[cap]}, tokenizer, args, device, amp())
                if em[cap] >= args.promote_em:
                    curriculum.promote(progress)
                    log(
                        f"curriculum step {step}: EM@{cap} {em[cap]:.3f} >= {args.promote_em}"
                        f" -> max-len {curriculum.cap(progress)}"
                    )
            next_gate = time.perf_counter() - t0 + args.gate_every_s
    loader.close()
    train_s = time.perf_counter() - t0
    log(f"trained {step} steps, {tokens:,} tokens, {answers_seen:,} answers in {train_s:.1f}s")

    # Save, reload from disk, evaluate the reloaded checkpoint.
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, args.save_dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model, fwd, opt
    from transformers import AutoTokenizer

    from sparsed_backend.models.llada import LLaDAModelLM

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = LLaDAModelLM.from_pretrained(out, attn_implementation="sdpa", dtype=torch.float32)
    model.to(device)
    assert model.config.mask_token_id == tokenizer.mask_token_id
    em = evaluate(model, sets, tokenizer, args, device, amp())
    log("final " + _fmt(em) + f"  ({args.eval_examples} prompts per length)")
    ckpt_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    summary = {
        "exact_match": {str(k): v for k, v in em.items()},
        "eval_examples_per_length": args.eval_examples,
        "decode": "greedy low-confidence remasking, 1 token/step, dense sdpa",
        "params": n_params,
        "checkpoint_bytes": ckpt_bytes,
        "steps": step,
        "tokens_seen": tokens,
        "answers_seen": answers_seen,
        "train_minutes": round(train_s / 60, 3),
        "total_minutes": round((time.perf_counter() - t_start) / 60, 3),
        "device": dev_name,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "history": history,
        "args": vars(args),
    }
    text = json.dumps(summary, indent=2) + "\n"
    Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
    Path(args.summary).write_text(text)
    (out / "training_summary.json").write_text(text)
    log(f"saved {out} ({ckpt_bytes / 2**20:.1f} MiB); summary {args.summary}")
    log(f"total {summary['total_minutes']:.2f} min")
    return summary


def _fmt(em: dict[int, float]) -> str:
    return "  ".join(f"EM@{k} {v:.3f}" for k, v in em.items())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
