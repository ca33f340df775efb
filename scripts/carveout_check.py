"""What a Triton kernel's shared-memory carveout costs the cuBLAS or cuDNN kernel after it, at
FLUX.1-dev's shapes on one GPU: lora_linear's forward (widen, then the base matmul that reads its
output) and the q/k norm-rope before cuDNN's attention, each replayed from a CUDA graph with
flux_lora.fast.lora_kernels.SHARED_CARVEOUT at the driver's choice and at 100% shared memory,
beside each kernel alone. Prints a line per case and writes a JSON.

    python scripts/carveout_check.py --resolution 512 --batch 4 --out OUT.json"""

from __future__ import annotations

import argparse
import json

import torch

from flux_lora.fast import attention, lora_kernels, qk_rope
from lora_kernel_speed import timed_ms  # scripts/: a CUDA graph of calls, replayed


def cases(resolution: int, batch: int, rank: int, dev) -> dict:
    """name: (first kernel, the kernel after it) as zero-argument calls."""
    bf = torch.bfloat16
    m = batch * (512 + (resolution // 16) ** 2)
    out = {}
    for n, k, r in ((3072, 15360, rank), (21504, 3072, 4 * rank)):  # a single block's proj_out, its q/k/v/mlp
        x, w = torch.randn(m, k, device=dev, dtype=bf), torch.randn(n, k, device=dev, dtype=bf) / k ** 0.5
        h, b, bias = torch.randn(m, r, device=dev, dtype=bf), torch.randn(n, r, device=dev, dtype=bf), torch.randn(n, device=dev, dtype=bf)
        c = lora_kernels.widen(h, b, alpha=0.5, bias=bias)
        out[f"widen [{m}, {n}] then the base matmul (K {k})"] = (
            lambda h=h, b=b, bias=bias: lora_kernels.widen(h, b, alpha=0.5, bias=bias),
            lambda c=c, x=x, w=w: torch.addmm(c, x, w.t()))
    heads, d = 24, 128
    q = torch.randn(batch, m // batch, heads, d, device=dev, dtype=bf)
    weight = torch.ones(d, device=dev, dtype=bf)
    cos, sin = torch.ones(m // batch, d, device=dev), torch.zeros(m // batch, d, device=dev)
    rope_out, rstd = torch.empty_like(q), torch.empty(q.shape[:3], device=dev)
    qt = q.transpose(1, 2)
    out[f"q/k norm-rope [{batch}, {m // batch}, {heads}, {d}] then cuDNN attention"] = (
        lambda: qk_rope.launch(q, weight, None, None, 1e-6, cos, sin, rope_out, rstd, **qk_rope.TILE),
        lambda: attention.attention(qt, qt, qt))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", default="")
    args = p.parse_args()
    rows = []
    for name, (first, then) in cases(args.resolution, args.batch, args.rank, torch.device("cuda")).items():
        row = {"case": name}
        for carveout in (None, 100):
            lora_kernels.SHARED_CARVEOUT = carveout
            first()  # sets the carveout of the kernel it launches, before the graphs are captured
            pair = timed_ms(lambda: (first(), then())) * 1e3
            alone = timed_ms(first) * 1e3 + timed_ms(then) * 1e3
            row[f"carveout={carveout}"] = {"pair_us": round(pair, 2), "sum_alone_us": round(alone, 2),
                                           "between_us": round(pair - alone, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lora_kernels.SHARED_CARVEOUT = 100
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"kind": "carveout_check", "resolution": args.resolution, "batch": args.batch, "rows": rows,
                       "device": torch.cuda.get_device_name(), "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
