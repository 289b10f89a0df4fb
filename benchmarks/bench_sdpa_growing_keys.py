"""Does an SDPA kernel pay per key length? Block diffusion's denoising forwards attend a prefix that
grows by one block at every block, so the dense kernel sees a new key length every few calls.

    python benchmarks/bench_sdpa_growing_keys.py     # CUDA only

One layer's shape of SDAR-8B at a 32k prefix, bf16: 4 queries, 32 query / 8 key-value heads
(``enable_gqa``), head_dim 128. For each SDPA backend (cuDNN, FlashAttention-2, memory-efficient),
with the sampler's all-True bool mask and without a mask, 180 calls are timed (synchronised
once, mean per call) at a fixed key length 32,768 (``grow=False``) and with the key length
growing by 4 every 5 calls (``grow=True``: a block of 4 tokens, its 4 denoising steps and its
commit). A backend that cannot run the inputs prints its error.
"""

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DEV, DTYPE = "cuda", torch.bfloat16
BASE = 32768
T = BASE + 1024 + 64


def run(q, k, v, full, backend, masked: bool, grow: bool, calls: int = 180) -> float:
    """Mean ms per call over ``calls`` calls."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(calls):
        s = BASE + 4 * (i // 5) if grow else BASE
        with sdpa_kernel([backend]):
            F.scaled_dot_product_attention(
                q, k[:, :, :s], v[:, :, :s], attn_mask=full[..., :s] if masked else None, enable_gqa=True
            )
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / calls


def main() -> None:
    torch.manual_seed(0)
    q = torch.randn(1, 32, 4, 128, device=DEV, dtype=DTYPE)
    k = torch.randn(1, 8, T, 128, device=DEV, dtype=DTYPE)
    v = torch.randn_like(k)
    full = torch.ones(1, 1, 4, T, dtype=torch.bool, device=DEV)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, cudnn {torch.backends.cudnn.version()}")
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for masked in (True, False):
            for grow in (False, True):
                name = f"{backend.name} mask={masked} grow={grow}"
                try:
                    run(q, k, v, full, backend, masked, grow, 10)  # warm-up
                    print(f"{name:40s} {run(q, k, v, full, backend, masked, grow):8.3f} ms/call", flush=True)
                except RuntimeError as err:
                    print(name, "ERROR", type(err).__name__, str(err).splitlines()[0][:100])


if __name__ == "__main__":
    main()
