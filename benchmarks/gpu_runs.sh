#!/usr/bin/env bash
# GPU runs planned for the open issues' tables, one section per device call (each fits the
# device tool's 10-minute limit on one H200). Block diffusion (SDAR-8B shape, random bf16
# weights, block 4, select 0.1, per KV head, 1,024 generated tokens):
#
#   bash benchmarks/gpu_runs.sh tests      # the CUDA tests of the kernels and graphs (~3 min)
#   bash benchmarks/gpu_runs.sh attention  # one layer's attention, eager and CUDA-graphed kernels
#   bash benchmarks/gpu_runs.sh 32k        # 32k, batch 1 and 8: piecewise vs whole graphs
#   bash benchmarks/gpu_runs.sh 128k       # 128k, batch 1: the same, then select_every=4 + sparse_commit
#   bash benchmarks/gpu_runs.sh profile    # 128k, per forward kind, whole graphs
#
# LLaDA with a K/V cache (LLaDA-8B shape):
#
#   bash benchmarks/gpu_runs.sh window     # where a 64k windowed step's time goes (8 layers)
#   bash benchmarks/gpu_runs.sh cache      # 64k, gen 256, block 32: dual cache, SDPA / kernel windows, sparsed
#
# Each section writes its tables (.md/.json) and log into $OUT (default benchmarks/results).
# Every table's variants run side by side in one process, dense first (a dense run after the
# sparse ones once ran out of memory in its prefill: blockdiff_session12.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="$(realpath -m "${OUT:-benchmarks/results}")"
mkdir -p "$OUT"
COMMON=(--parts e2e --blocks 4 --gen 1024 --select 0.1 --per-kv-head)

case "${1:-}" in
  tests)
    python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_decode_graphs.py \
      tests/test_prefix_selection.py tests/test_block_diffusion.py tests/test_kv_cache.py 2>&1 | tee "$OUT/tests_cuda_blockdiff.log" | tail -5
    ;;
  attention)
    python benchmarks/bench_blockdiff.py --parts attention --prefixes 32768 131072 --blocks 4 --batches 1 8 \
      --select 0.1 --name bench_blockdiff_attention_graphed --out "$OUT" 2>&1 \
      | tee "$OUT/bench_blockdiff_attention_graphed.log" | tail -40
    ;;
  32k)
    (python benchmarks/bench_blockdiff.py "${COMMON[@]}" --prefixes 32768 --batches 1 \
      --variants dense_gqa_graphs dense_whole sparse_fused_graphs sparse_fused_whole \
      --name bench_blockdiff_whole_32k_b1 --out "$OUT") 2>&1 | tee "$OUT/bench_blockdiff_whole_32k_b1.log" | tail -8
    (python benchmarks/bench_blockdiff.py "${COMMON[@]}" --prefixes 32768 --batches 8 \
      --variants dense_cudnn_graphs dense_whole sparse_fused_whole \
      --name bench_blockdiff_whole_32k_b8 --out "$OUT") 2>&1 | tee "$OUT/bench_blockdiff_whole_32k_b8.log" | tail -8
    ;;
  128k)
    (python benchmarks/bench_blockdiff.py "${COMMON[@]}" --prefixes 131072 --batches 1 \
      --variants dense_gqa_graphs dense_whole sparse_fused_graphs sparse_fused_whole \
      --name bench_blockdiff_whole_128k_b1 --out "$OUT") 2>&1 | tee "$OUT/bench_blockdiff_whole_128k_b1.log" | tail -8
    (python benchmarks/bench_blockdiff.py "${COMMON[@]}" --prefixes 131072 --batches 1 \
      --select-every 4 --sparse-commit --variants dense_whole sparse_fused_whole \
      --name bench_blockdiff_whole_128k_b1_every4_commit --out "$OUT") 2>&1 \
      | tee "$OUT/bench_blockdiff_whole_128k_b1_every4_commit.log" | tail -8
    ;;
  profile)
    (python benchmarks/profile_blockdiff.py --prefix 131072 --gen 64 \
      --variants dense_whole sparse_fused_whole) > "$OUT/profile_blockdiff_whole_128k.txt" 2>&1
    tail -40 "$OUT/profile_blockdiff_whole_128k.txt"
    ;;
  window)
    python benchmarks/profile_window.py --length 65536 --layers 8 > "$OUT/profile_window_64k.txt" 2>&1
    grep "^## \|^attention kernels" "$OUT/profile_window_64k.txt"
    ;;
  cache)
    python benchmarks/bench_cache.py --lengths 65536 --variants sdpa+dual dense+dual sparsed+dual \
      --name bench_cache_llada_64k_kernel_windows --out "$OUT" 2>&1 | tee "$OUT/bench_cache_llada_64k_kernel_windows.log" \
      | tail -8
    ;;
  *)
    echo "usage: $0 tests|attention|32k|128k|profile|window|cache" >&2
    exit 2
    ;;
esac
