"""Train the demo model: a small LLaDA-architecture masked-diffusion LM on long-context retrieval.

The task, the curriculum, the masking and the loss live in `sparsed_backend.demo.task` and
`recipe.py` (unit-tested); this script runs them: one seed, one process,
bf16 autocast, AdamW, a gated curriculum, a checkpoint (one .pt file, bf16 weights and the
curriculum position, no optimizer state) written every --save-every-s seconds and at the end.
``training/run_seeds.py`` runs several seeds side by side on one GPU.

    PYTHONPATH=src python training/train_retrieval.py --seed 0 --minutes 8 --ckpt out/s0.pt
    PYTHONPATH=src python training/train_retrieval.py --resume out/s0.pt --ckpt out/s0b.pt --minutes 8
    PYTHONPATH=src python training/train_retrieval.py --export-only --resume out/s0b.pt \
        --export src/sparsed_backend/assets/retrieval_llada
    PYTHONPATH=src python training/train_retrieval.py --smoke      # CPU, seconds

A resumed run starts a fresh AdamW with a --resume-warmup step warm-up, and draws its data from
a generator seeded with (seed, step), so it never replays the earlier run's batches.

Multi-key fine-tune (``--init``: an exported model directory or a .pt checkpoint, weights only):
every step draws a prompt length from --lengths and keys per question k from 1..--max-keys
(questions ``? k1 .. kk`` answered in place by the k values; `recipe.py`),
with no curriculum; a quarter of the steps (--p-single) ask one question, the evaluation format.
The gates log held-out accuracy at the longest length for 1 and --max-keys keys; the final
evaluation gives greedy exact match for every k. Its checkpoints resume in the same mode.

    PYTHONPATH=src python training/train_retrieval.py --init src/sparsed_backend/assets/retrieval_llada \
        --max-keys 4 --lr 3e-4 --cooldown --minutes 6 --ckpt out/mk.pt --export out/retrieval_llada_multikey
    PYTHONPATH=src python training/train_retrieval.py --smoke --init out/smoke_model --max-keys 3   # CPU
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "src") not in sys.path:  # PYTHONPATH=src is the documented way; this is a guard
    sys.path.insert(0, str(REPO / "src"))

from blockdiff_recipe import blockdiff_answer_logits, build_qwen3  # noqa: E402
from recipe import (  # noqa: E402
    Curriculum,
    Stage,
    default_stages,
    masked_answer_loss,
    sample_training_batch,
)

from sparsed_backend.demo.task import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    MASK_ID,
    VOCAB_SIZE,
    sample_prompts,
)
from sparsed_backend.models.llada import LLaDAConfig, LLaDAModelLM  # noqa: E402

GATE_SEED_OFFSET = 1_000_000  # held-out gate batches: generator seed = this + run seed
# A fine-tune's data and gates: generators seeded apart from every from-scratch run's.
FINETUNE_SEED_OFFSET = 2**40
FINAL_EVAL_SEED = 5000  # final evaluation prompts of length n: seed 5000 + n (benchmarks use others)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--seed", type=int, default=0, help="model init and data (training data: seed; gates: 1e6 + seed)")
    a("--ckpt", default=None, help="checkpoint file to write (.pt)")
    a("--resume", default=None, help="checkpoint to continue from")
    a("--export", default=None, help="after training, save_pretrained the model + tokenizer here")
    a("--export-only", action="store_true", help="only export --resume to --export")
    a("--init", default=None, help="fine-tune: start from this exported model directory or .pt checkpoint")
    a(
        "--max-keys",
        type=int,
        default=None,
        help="keys per question drawn from 1..this every step (default 1; a resumed fine-tune keeps its own)",
    )
    a("--minutes", type=float, default=8.0, help="wall-clock budget of the training loop")
    a("--max-steps", type=int, default=0, help="0: no step limit")
    a("--d-model", type=int, default=256)
    a("--n-heads", type=int, default=8)
    a("--n-layers", type=int, default=6)
    a("--mlp-hidden-size", type=int, default=512)
    a("--rope-theta", type=float, default=500000.0)
    a("--lr", type=float, default=1e-3)
    a("--warmup", type=int, default=500, help="linear warm-up steps")
    a("--cooldown", action="store_true", help="cosine decay of the lr to 0 over --minutes (a final run)")
    a("--resume-warmup", type=int, default=100, help="warm-up steps after --resume (fresh optimizer)")
    a("--beta2", type=float, default=0.98)
    a("--grad-clip", type=float, default=1.0)
    a("--batch", type=int, default=256, help="most sequences per step")
    a("--tokens-per-step", type=int, default=2**18, help="batch = min(--batch, this // sequence length)")
    a("--p-single", type=float, default=0.25, help="share of haystack steps with one question (the eval format)")
    a("--p-full-mask", type=float, default=0.5)
    a("--final-records", type=int, default=64)
    a("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="prompt lengths of phase 2")
    a("--gate", type=float, default=0.9, help="held-out token accuracy that moves the curriculum on")
    a("--gate-every", type=int, default=200, help="steps between gate checks")
    a("--gate-examples", type=int, default=512)
    a("--final-eval-prompts", type=int, default=256, help="greedy exact match per length at the end (0: none)")
    a("--save-every-s", type=float, default=60.0)
    a("--log-every", type=int, default=100)
    a("--status", default=None, help="JSON file updated at every gate check (for run_seeds.py)")
    a(
        "--arch",
        choices=["llada", "qwen3-blockdiff"],
        default="llada",
        help="llada: the shipped masked-diffusion model; qwen3-blockdiff: a block-diffusion Qwen3 (SDAR's "
        "layout, blockdiff_recipe.py), block-causal with noisy copies of the answer blocks",
    )
    a("--block-length", type=int, default=4, help="qwen3-blockdiff: tokens per diffusion block (SDAR: 4)")
    a("--n-kv-heads", type=int, default=None, help="qwen3-blockdiff: key/value heads (default: --n-heads)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--smoke", action="store_true", help="tiny model and stages on CPU, a few seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.d_model, args.n_heads, args.n_layers, args.mlp_hidden_size = 32, 2, 2, 64
        args.final_records, args.lengths, args.batch = 4, [64], 8
        args.gate, args.gate_every, args.gate_examples, args.max_steps = 0.0, 5, 8, 20
        args.final_eval_prompts, args.warmup, args.device = 4, 5, "cpu"
    if args.export_only and not (args.resume and args.export):
        p.error("--export-only needs --resume (the checkpoint) and --export (the directory)")
    if args.init and args.resume:
        p.error("give --init (start a fine-tune) or --resume (continue a run), not both")
    if args.max_keys is not None and args.max_keys < 1:
        p.error(f"--max-keys must be >= 1, got {args.max_keys}")
    if args.block_length < 1:
        p.error(f"--block-length must be >= 1, got {args.block_length}")
    if args.arch == "qwen3-blockdiff" and args.init:
        p.error("--init fine-tunes the shipped LLaDA model; --arch qwen3-blockdiff trains from scratch or --resume")
    return args


def trained_positions(args: argparse.Namespace) -> int:
    """Longest training sequence: the longest prompt followed by its questions and answers. The
    model's ``max_sequence_length`` (its position limit, which the samplers enforce)."""
    return max(s.seq_len(s.questions()) for s in default_stages(args.final_records, tuple(args.lengths)))


def build_model(args: argparse.Namespace):
    if args.arch == "qwen3-blockdiff":
        return build_qwen3(args, trained_positions(args))
    cfg = LLaDAConfig(
        d_model=args.d_model, n_heads=args.n_heads, n_kv_heads=args.n_heads, n_layers=args.n_layers,
        mlp_hidden_size=args.mlp_hidden_size, vocab_size=VOCAB_SIZE, embedding_size=64 * math.ceil(VOCAB_SIZE / 64),
        rope_theta=args.rope_theta, max_sequence_length=trained_positions(args), mask_token_id=MASK_ID,
        eos_token_id=EOS_ID, pad_token_id=EOS_ID, bos_token_id=BOS_ID, weight_tying=False,
    )  # fmt: skip
    return LLaDAModelLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)


def save_checkpoint(path: Path, model, trainer: dict) -> None:
    state = {k: v.detach().to("cpu", torch.bfloat16) for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    torch.save({"config": model.config.to_dict(), "state_dict": state, "trainer": trainer}, tmp)
    tmp.replace(path)


def load_checkpoint(path: str) -> tuple:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    fields = {k: v for k, v in ckpt["config"].items() if k not in ("architectures", "transformers_version")}
    if fields.get("model_type") == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        model = Qwen3ForCausalLM._from_config(Qwen3Config(**fields), attn_implementation="sdpa", dtype=torch.float32)
    else:
        model = LLaDAModelLM._from_config(LLaDAConfig(**fields), attn_implementation="sdpa", dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()})
    return model, ckpt["trainer"]


def positions_of(model) -> int:
    """The model's position limit (LLaDA's max_sequence_length, Qwen3's max_position_embeddings)."""
    return getattr(model.config, "max_sequence_length", None) or model.config.max_position_embeddings


def answer_logits(model, batch, args) -> torch.Tensor:
    """(B, K, V) logits at the answer tokens: LLaDA reads the masked sequence; a block-diffusion
    Qwen3 the noisy copies of the answer blocks (blockdiff_recipe.py)."""
    if model.config.model_type == "qwen3":
        return blockdiff_answer_logits(model, batch, model.config.block_size)
    return model(input_ids=batch.input_ids, logits_to_keep=batch.answer_pos).logits


def load_initial(path: str) -> LLaDAModelLM:
    """The weights a fine-tune starts from: an exported directory (``save_pretrained``) or a .pt
    checkpoint of this script, in float32 (the bf16 weights are the shipped form)."""
    if Path(path).is_dir():
        return LLaDAModelLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    return load_checkpoint(path)[0]


def export(model: LLaDAModelLM, trainer: dict, out: Path) -> None:
    """The shipped form: bf16 safetensors, config, tokenizer, and how it was trained."""
    from sparsed_backend.demo.tokenizer import build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    build_tokenizer(model_max_length=positions_of(model)).save_pretrained(out)
    (out / "training_summary.json").write_text(json.dumps(trainer, indent=1) + "\n")


@torch.no_grad()
def gate_accuracy(model, stage: Stage, n: int, generator: torch.Generator, args, n_keys: int = 1) -> float:
    """Held-out token accuracy at ``stage`` (questions of ``n_keys`` keys) with every answer token masked."""
    model.eval()
    right = total = 0
    per = max(1, min(args.batch, args.tokens_per_step // stage.seq_len(stage.questions(n_keys), n_keys)))
    for i in range(0, n, per):
        b = sample_training_batch(stage, min(per, n - i), generator, n_keys=n_keys, p_full_mask=1.0, device=args.device)
        with torch.autocast(args.device.split(":")[0], torch.bfloat16, enabled=args.device.startswith("cuda")):
            logits = answer_logits(model, b, args)
        right += int((logits.argmax(-1) == b.targets).sum())
        total += b.targets.numel()
    model.train()
    return right / total


def final_eval(model, args, lengths: list[int], max_keys: int = 1) -> dict:
    """Greedy exact match (dense SDPA, the LLaDA sampler, one token per step, one block per key)
    on fresh prompts of every length: ``{n: {...}}`` for single-key questions only (the shipped
    summary's form), else ``{n: {k: {...}}}`` for k = 1..max_keys keys."""
    from sparsed_backend.demo.evaluate import answer_blockdiff_prompts, answer_prompts, wilson_interval

    model.eval()
    res = {}
    for n in lengths:
        for k in range(1, max_keys + 1):
            prompts = sample_prompts(n, args.final_eval_prompts, n_records=args.final_records, n_keys=k,
                                     seed=FINAL_EVAL_SEED + n)  # fmt: skip
            batch = max(1, args.tokens_per_step // n // 4)
            if model.config.model_type == "qwen3":  # blockdiff_generate, one token per step
                correct = answer_blockdiff_prompts(model, prompts, batch=batch).n_correct
            else:
                correct = answer_prompts(model, prompts, batch=batch).n_correct
            lo, hi = wilson_interval(correct, args.final_eval_prompts)
            cell = {"correct": correct, "prompts": args.final_eval_prompts, "ci95": [lo, hi]}
            if max_keys == 1:
                res[n] = cell
            else:
                res.setdefault(n, {})[k] = cell
    model.train()
    return res


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.resume:
        model, trainer = load_checkpoint(args.resume)
        trainer.setdefault("resumed_from", []).append(args.resume)
    elif args.init:
        torch.manual_seed(args.seed)
        model = load_initial(args.init)
        trainer = {"seed": args.seed, "step": 0, "stage_index": 0, "elapsed_s": 0.0, "history": [], "calls": [],
                   "finetune": {"init": args.init}}  # fmt: skip
    else:
        torch.manual_seed(args.seed)
        model = build_model(args)
        trainer = {"seed": args.seed, "step": 0, "stage_index": 0, "elapsed_s": 0.0, "history": [], "calls": []}
    if args.export_only:
        export(model, trainer, Path(args.export))
        return
    finetune = trainer.get("finetune")
    max_keys = args.max_keys or (finetune or {}).get("max_keys", 1)
    if finetune is not None:
        # The phase-2 stages, one drawn per step: no curriculum, the model already retrieves.
        stages = [s for s in default_stages(args.final_records, tuple(args.lengths)) if s.prompt_tokens is not None]
        finetune.update(max_keys=max_keys, lengths=args.lengths)
        longest = max(s.seq_len(s.questions(k), k) for s in stages for k in range(1, max_keys + 1))
        if longest > positions_of(model):
            raise SystemExit(f"--lengths {args.lengths} give training sequences of {longest} tokens, more than the "
                             f"model's position limit {positions_of(model)}")  # fmt: skip
    else:
        stages = default_stages(args.final_records, tuple(args.lengths))
    trainer["calls"].append({"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    trainer["stages"] = [str(s) for s in stages]
    curriculum = Curriculum(stages, args.gate, min(trainer["stage_index"], len(stages) - 1))
    device = torch.device(args.device)
    model.to(device).train()
    seed, step0 = trainer["seed"], trainer["step"]
    offset = FINETUNE_SEED_OFFSET if finetune is not None else 0
    gen = torch.Generator(device=device).manual_seed(offset + seed * 1_000_003 + step0)
    gate_gen = torch.Generator(device=device).manual_seed(offset + GATE_SEED_OFFSET + seed)
    decay, no_decay = [], []  # weight decay on matrices, not on norms or the token embedding
    for n, p in model.named_parameters():
        (decay if p.dim() >= 2 and "wte" not in n else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, args.beta2), fused=device.type == "cuda",
    )  # fmt: skip
    warm = args.resume_warmup if args.resume or args.init else args.warmup
    amp = device.type == "cuda"
    t0, last_save, step = time.time(), time.time(), step0
    log_loss, log_acc = [], []
    mode = f"fine-tune, 1..{max_keys} keys per question, lengths {args.lengths}" if finetune else curriculum.stage
    print(f"seed {seed} from step {step0} at stage {curriculum.index}: {mode}", flush=True)
    while time.time() - t0 < args.minutes * 60 and not (args.max_steps and step - step0 >= args.max_steps):
        if finetune is not None:
            stage = stages[int(torch.randint(len(stages), (1,), generator=gen, device=device))]
        else:
            stage = curriculum.stage
        k = 1 if max_keys == 1 else int(torch.randint(1, min(max_keys, stage.n_records) + 1, (1,), generator=gen,
                                                      device=device))  # fmt: skip
        m = 1 if stage.prompt_tokens is not None and torch.rand(1).item() < args.p_single else stage.questions(k)
        b_size = max(1, min(args.batch, args.tokens_per_step // stage.seq_len(m, k)))
        batch = sample_training_batch(
            stage, b_size, gen, n_questions=m, n_keys=k, p_full_mask=args.p_full_mask, device=device
        )
        lr = args.lr * min(1.0, (step - step0 + 1) / warm)
        if args.cooldown:
            lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, (time.time() - t0) / (args.minutes * 60))))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = answer_logits(model, batch, args)
        loss, acc = masked_answer_loss(logits, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        log_loss.append(loss.detach())
        log_acc.append(acc.detach())
        if step % args.log_every == 0:
            mean_loss, mean_acc = torch.stack(log_loss).mean(), torch.stack(log_acc).mean()
            print(f"step {step:6d} stage {curriculum.index} loss {mean_loss:.3f} acc {mean_acc:.3f} "
                  f"batch {b_size} {time.time() - t0:.0f}s", flush=True)  # fmt: skip
            log_loss, log_acc = [], []
        if step % args.gate_every == 0:
            if finetune is not None:  # the longest prompts, single-key and max-key questions
                gate_stage = stages[-1]
                accs = {kk: gate_accuracy(model, gate_stage, args.gate_examples, gate_gen, args, kk)
                        for kk in sorted({1, max_keys})}  # fmt: skip
                held, moved = min(accs.values()), False
                extra = {"heldout_acc_by_keys": {kk: round(a, 4) for kk, a in accs.items()}}
            else:
                gate_stage, extra = stage, {}
                held = gate_accuracy(model, stage, args.gate_examples, gate_gen, args)
                moved = curriculum.update(held)
            event = {"step": step, "elapsed_s": round(trainer["elapsed_s"] + time.time() - t0, 1),
                     "stage": gate_stage.__dict__, "heldout_acc": round(held, 4), "promoted": moved,
                     **extra}  # fmt: skip
            trainer["history"].append(event)
            print(f"gate {json.dumps(event)}", flush=True)
            if args.status:
                Path(args.status).write_text(json.dumps({"seed": seed, "stage_index": curriculum.index,
                                                         "acc": held, "step": step}))  # fmt: skip
        if args.ckpt and time.time() - last_save > args.save_every_s:
            trainer.update(step=step, stage_index=curriculum.index)
            save_checkpoint(Path(args.ckpt), model, {**trainer, "elapsed_s": trainer["elapsed_s"] + time.time() - t0})
            last_save = time.time()
    trainer.update(step=step, stage_index=curriculum.index, elapsed_s=round(trainer["elapsed_s"] + time.time() - t0, 1))
    trainer["device"] = torch.cuda.get_device_name() if amp else "cpu"
    if args.final_eval_prompts and (curriculum.last or finetune is not None):
        lengths = [n for n in args.lengths if n >= 1024] or args.lengths
        trainer["final_eval"] = final_eval(model, args, lengths, max_keys)
        print(f"final {json.dumps(trainer['final_eval'])}", flush=True)
    if args.ckpt:
        save_checkpoint(Path(args.ckpt), model, trainer)
    if args.export:
        export(model, trainer, Path(args.export))
    where = mode if finetune is not None else curriculum.stage
    print(f"done: step {step}, stage {curriculum.index} ({where}), {trainer['elapsed_s']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
