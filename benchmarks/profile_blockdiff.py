"""Where a block-diffusion forward's time goes: torch.profiler over the decoding forwards of
`blockdiff_generate` on the SDAR-8B shape (Qwen3-8B, random bf16 weights).

    python benchmarks/profile_blockdiff.py --prefix 32768 --variants dense dense_gqa sparse   # H200
    python benchmarks/profile_blockdiff.py --prefix 300                                        # CPU smoke

For each variant one generation of --gen tokens after a --prefix-token prompt runs with the
profiler off for the prefill and on for every forward of --block queries (the denoising steps
and the commits). Printed per variant: the wall time per decoding forward (device synchronised at
the profiler's start and stop), the summed CUDA kernel time per forward (how busy the GPU is),
and the kernels and CPU ops that take the most time; then, from a second generation with every
forward synchronised (`KindTimer`, around the sampler's per-forward call, so graphed forwards
count too), the mean time per forward kind: prefill chunks, the selecting "score" step, "sparse"
steps, "dense" denoising steps and commits. Variants as in ``bench_blockdiff.py``
(``sparse_fused``: the fused scorer; ``--select-every`` for the sparse variants).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import sparsed_backend  # noqa: F401  (registers the "sparsed" attention)
from bench_blockdiff import graph_mode, qwen3_config, sdpa_grouped_heads
from sparsed_backend.attention.prefix_selection import PrefixSparseConfig
from sparsed_backend.sampling import block_diffusion
from sparsed_backend.sampling.block_diffusion import blockdiff_generate
from sparsed_backend.timing import sync


class DecodeProfiler:
    """Profiles the sampler's forwards of ``block`` tokens (decoding and commits, not the
    prefill), whether they run the model's forward or CUDA graphs (``cuda_graphs``): it wraps
    the sampler's per-forward call."""

    def __init__(self, block: int, device: torch.device) -> None:
        self.block, self.forwards, self.wall, self.device = block, 0, 0.0, device
        cuda = [ProfilerActivity.CUDA] if device.type == "cuda" else []
        self.prof = profile(activities=[ProfilerActivity.CPU, *cuda])
        self._started = None
        self._call = block_diffusion._BlockRunner.__call__
        profiler = self

        def call(runner, forward, ids, *args, **kwargs):
            if ids.shape[1] == profiler.block:
                if profiler._started is None:
                    sync(profiler.device)
                    profiler.prof.start()
                    profiler._started = time.perf_counter()
                profiler.forwards += 1
            return profiler._call(runner, forward, ids, *args, **kwargs)

        block_diffusion._BlockRunner.__call__ = call

    def finish(self) -> None:
        block_diffusion._BlockRunner.__call__ = self._call
        sync(self.device)
        if self._started is not None:
            self.wall = time.perf_counter() - self._started
            self.prof.stop()


class KindTimer:
    """Every forward of the sampler synchronised before and after and filed by kind: "prefill"
    (forwards wider than a block), "commit", or the denoising step's prefix-selection mode
    ("score", "sparse"; "dense" without sparse selection). Wraps the sampler's per-forward call,
    so forwards through CUDA graphs count as well."""

    def __init__(self, block: int, device: torch.device) -> None:
        self.records: dict[str, list[float]] = {}
        self._call = block_diffusion._BlockRunner.__call__
        timer = self

        def call(runner, forward, ids, *args, **kwargs):
            if ids.shape[1] != block:
                kind = "prefill"
            elif forward == "commit":
                kind = "commit"
            else:
                kind = "dense" if runner.state is None else runner.state.mode
            sync(device)
            t0 = time.perf_counter()
            out = timer._call(runner, forward, ids, *args, **kwargs)
            sync(device)
            timer.records.setdefault(kind, []).append(time.perf_counter() - t0)
            return out

        block_diffusion._BlockRunner.__call__ = call

    def finish(self) -> None:
        block_diffusion._BlockRunner.__call__ = self._call


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", type=int, default=32768)
    p.add_argument("--block", type=int, default=4)
    p.add_argument("--gen", type=int, default=16, help="generated tokens (gen / block blocks are profiled)")
    p.add_argument("--select", type=float, default=0.1)
    p.add_argument(
        "--variants",
        nargs="+",
        choices=[
            "dense",
            "dense_gqa",
            "sparse",
            "sparse_fused",
            "dense_graphs",
            "dense_gqa_graphs",
            "sparse_graphs",
            "sparse_fused_graphs",
            "dense_whole",
            "sparse_fused_whole",
        ],
        default=["dense", "sparse"],
        help='a _graphs suffix runs with cuda_graphs=True, _whole with cuda_graphs="whole"',
    )
    p.add_argument("--select-every", type=int, default=1, help="sparse variants: blocks per selection")
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from transformers import Qwen3ForCausalLM

    cfg = qwen3_config(dev.type == "cpu", args.prefix + args.gen + 64)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with dev:
        model = Qwen3ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype).eval()
    mask_id = cfg.vocab_size - 1
    ids = torch.randint(0, mask_id, (1, args.prefix), device=dev, generator=torch.Generator(dev).manual_seed(1))
    common = dict(block_length=args.block, denoising_steps=args.block, mask_id=mask_id)
    for variant in args.variants:
        name, graphs = graph_mode(variant)
        sparse = name in ("sparse", "sparse_fused")
        model.set_attn_implementation("sparsed" if sparse else "sdpa")
        scorer = "fused" if name == "sparse_fused" else "separate"
        config = PrefixSparseConfig(select=args.select, per_kv_head=True, select_every=args.select_every, scorer=scorer)
        extra = {"sparsed": config} if sparse else {}
        extra["cuda_graphs"] = graphs
        grouped = sdpa_grouped_heads() if name == "dense_gqa" or variant == "dense_whole" else contextlib.nullcontext()
        with grouped:
            blockdiff_generate(model, ids[:, : 4 * args.block], gen_length=2 * args.block, **common, **extra)
            hook = DecodeProfiler(args.block, dev)
            try:
                blockdiff_generate(model, ids, gen_length=args.gen, **common, **extra)
            finally:
                hook.finish()
            timer = KindTimer(args.block, dev)  # a second run: each forward synchronised, by kind
            try:
                blockdiff_generate(model, ids, gen_length=args.gen, **common, **extra)
            finally:
                timer.finish()
        events = hook.prof.key_averages()
        # GPU busy time: the kernels' own events (an aten op's self device time repeats its kernels').
        cuda_us = sum(e.self_device_time_total for e in hook.prof.events() if e.device_type == DeviceType.CUDA)
        n = hook.forwards
        print(f"\n## {variant}: prefix {args.prefix}, block {args.block}, {n} decoding forwards", flush=True)
        print(f"wall {1e3 * hook.wall / n:.2f} ms per forward; CUDA kernels {cuda_us / 1e3 / n:.2f} ms per forward")
        for kind, times in sorted(timer.records.items()):
            mean_ms = 1e3 * sum(times) / len(times)
            print(f"synchronised forwards, {kind}: {len(times)}, mean {mean_ms:.2f} ms")
        try:
            print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
        except (AttributeError, KeyError, ValueError):  # older profilers name it after CUDA
            print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
