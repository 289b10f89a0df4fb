"""Where one denoising step's time goes: torch.profiler over dense and sparse steps of a LLaDA-8B layer stack.

    python benchmarks/profile_step.py --length 65536 --layers 4      # H100

Prints, per step kind, the CUDA kernels that take the most time and the per-layer split into
attention and the rest, and times FlexAttention alone on the model's (B, L, H, D)-strided views
against contiguous (B, H, L, D) copies of the same tensors (the layout question).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sparsed_backend import SparseDConfig, SparseDState
from sparsed_backend.attention.backend import sparse_attention
from sparsed_backend.models import LLaDAConfig, LLaDAModelLM
from sparsed_backend.timing import kernel_ms


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=65536)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--select", type=float, default=0.3)
    p.add_argument("--rows", type=int, default=18)
    args = p.parse_args()
    dev = torch.device("cuda")
    n = args.length
    with dev:
        model = LLaDAModelLM._from_config(LLaDAConfig(n_layers=args.layers), attn_implementation="sparsed",
                                          dtype=torch.bfloat16).eval()  # fmt: skip
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=dev)
    cfg = SparseDConfig(skip=0.2, select=args.select, block_size=128, min_sparse_len=0)
    state = SparseDState(cfg, steps=1000, gen_start=n - 256)
    switch = cfg.switch_step(1000)

    def dense():
        model(ids, logits_to_keep=256)

    def sparse():
        state.step = switch + 1
        model(ids, logits_to_keep=256, sparsed_state=state)

    state.step = switch
    model(ids, logits_to_keep=256, sparsed_state=state)  # the switch step builds the masks
    for name, fn in (("dense", dense), ("sparse", sparse)):
        ms = kernel_ms(fn, dev)
        print(f"{name} step: {ms:.1f} ms for {args.layers} layers = {ms / args.layers:.1f} ms/layer", flush=True)
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))

    # Layout: FlexAttention on the model's strided views vs contiguous tensors.
    h, d = model.config.n_heads, model.config.d_model // model.config.n_heads
    x = torch.randn(1, n, 3, h, d, device=dev, dtype=torch.bfloat16)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) views of (B, L, H, D) storage
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    bm = state.layers[0].block_mask
    scale = d**-0.5
    t_strided = kernel_ms(lambda: sparse_attention(q, k, v, bm, scale), dev)
    t_contig = kernel_ms(lambda: sparse_attention(qc, kc, vc, bm, scale), dev)
    t_copy = kernel_ms(lambda: sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), bm, scale), dev)
    print(f"flex alone, N={n}, select {args.select}: strided views {t_strided:.2f} ms, contiguous {t_contig:.2f} ms, "
          f"copy then contiguous {t_copy:.2f} ms, density {state.density():.3f}")  # fmt: skip
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch.__version__, torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
