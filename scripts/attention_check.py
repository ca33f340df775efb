"""Which SDPA backends run FLUX-shaped attention forward+backward on this GPU, and how fast.

    python scripts/attention_check.py [--seq 1536 --batch 4]

Each backend runs in its own subprocess: a crashing kernel takes down only that child. Prints one
JSON line per backend and layout. On H100 / torch 2.11 (2026-11-26) cuDNN ran these isolated
shapes 1.8× faster than flash (432 vs 240 TFLOP/s at 4×1536 tokens) and correctly, yet the
first backward of the real compiled FLUX step through SDPA's cuDNN path died with an illegal
memory access (likely torch's cache of cuDNN backward plans, keyed on q/k/v's strides but not the
output gradient's). Training reaches cuDNN through flux_lora/fast/attention.py's opaque op instead,
which hands the kernels one of these two layouts, and the output gradient in the output's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def child(backend: str, layout: str, batch: int, seq: int, heads: int = 24, dim: int = 128) -> dict:
    import time

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    g = torch.Generator(device="cuda").manual_seed(0)

    def make():
        if layout == "bshd-transposed":  # what diffusers' attention processor passes: [B, S, H, D] viewed as [B, H, S, D]
            t = torch.randn(batch, seq, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
        else:
            t = torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=g)
        return t.requires_grad_(True)

    q, k, v = make(), make(), make()
    with sdpa_kernel([kind]):
        def step():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            out.backward(torch.ones_like(out))
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 20
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / n * 1e3
    with sdpa_kernel([SDPBackend.MATH]):
        ref = torch.nn.functional.scaled_dot_product_attention(q[:1].float(), k[:1].float(), v[:1].float())
    with sdpa_kernel([kind]):
        got = torch.nn.functional.scaled_dot_product_attention(q[:1], k[:1], v[:1]).float()
    flops = 4 * batch * heads * seq * seq * dim * 3.5  # forward + backward (2.5× forward)
    return {"backend": backend, "layout": layout, "ms_fwd_bwd": ms, "tflops": flops / ms / 1e9,
            "max_abs_err_vs_fp32": (got - ref).abs().max().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=1536)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--child", nargs=2, metavar=("BACKEND", "LAYOUT"))
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.batch, args.seq)))
        return
    for backend in ("flash", "cudnn", "efficient"):
        for layout in ("bhsd", "bshd-transposed"):
            r = subprocess.run([sys.executable, __file__, "--seq", str(args.seq), "--batch", str(args.batch),
                                "--child", backend, layout], capture_output=True, text=True, timeout=120)
            line = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else \
                json.dumps({"backend": backend, "layout": layout, "failed": (r.stderr.strip().splitlines() or ["?"])[-1][:200]})
            print(line, flush=True)


if __name__ == "__main__":
    main()
