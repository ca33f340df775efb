"""The fp8 base's matmuls at FLUX.1-dev's shapes, with and without Hopper's fast fp8 accumulation:
the error of the forward (y = x·Wᵀ) and of the input gradient (dx = dy·W) against fp32, beside a
bf16 matmul's error, and each one's time. The product uses fast accumulation where this shows it
costs no accuracy that matters next to the quantization's own (flux_lora/fast/fp8.py). One GPU.

    python scripts/fp8_accuracy.py --resolution 512 --batch 4 --out OUT.json"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from flux_lora.fast import fp8

# (name, in_features K, out_features N, tokens a sample it sees at 512 px: image, text or both)
LAYERS = [("double q/k/v group (image)", 3072, 9216, "image"), ("double ff up (image)", 3072, 12288, "image"),
          ("double ff down (image)", 12288, 3072, "image"), ("double to_out (text)", 3072, 3072, "text"),
          ("single q/k/v group", 3072, 9216, "joint"), ("single proj_mlp", 3072, 12288, "joint"),
          ("single proj_out", 15360, 3072, "joint")]


def activations(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Rows of varied size with a few outlier channels, as transformer activations have."""
    x = torch.randn(m, k, generator=g, device="cuda") * torch.rand(m, 1, generator=g, device="cuda").add(0.1)
    x[:, torch.randperm(k, generator=g, device="cuda")[: k // 100]] *= 20
    return x.bfloat16()


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).norm() / ref.norm()).item()


def timed(fn, reps: int = 20) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def measure(name: str, k: int, n: int, m: int, g: torch.Generator) -> dict:
    weight = (torch.randn(n, k, generator=g, device="cuda") * 0.02).bfloat16()
    layer = fp8.Fp8Linear(weight, None)
    x, dy = activations(m, k, g), activations(m, n, g) * 1e-3
    w8 = layer.weight.float() * layer.scale_out[0, 0]  # what the fp8 matmuls multiply: quantization apart
    y_ref, dx_ref = x.float() @ w8.t(), dy.float() @ w8
    out = {"layer": name, "m": m, "k": k, "n": n,
           "bf16_forward_error": rel_error(x @ w8.bfloat16().t(), y_ref),
           "bf16_input_grad_error": rel_error(dy @ w8.bfloat16(), dx_ref)}
    weight_t = layer.weight.t().contiguous()
    for fast in (False, True):
        tag = "fast" if fast else "exact"
        xq, xs = fp8.quantize_rows(x)
        forward = lambda: torch._scaled_mm(xq, layer.weight.t(), scale_a=xs, scale_b=layer.scale_out,  # noqa: E731
                                           out_dtype=torch.bfloat16, use_fast_accum=fast)
        dyq, dys = fp8.quantize_rows(dy)
        backward = lambda: torch._scaled_mm(dyq, weight_t.t(), scale_a=dys, scale_b=layer.scale_in,  # noqa: E731
                                            out_dtype=torch.bfloat16, use_fast_accum=fast)
        out[f"fp8_{tag}_forward_error"] = rel_error(forward(), y_ref)
        out[f"fp8_{tag}_input_grad_error"] = rel_error(backward(), dx_ref)
        out[f"fp8_{tag}_forward_ms"], out[f"fp8_{tag}_input_grad_ms"] = timed(forward), timed(backward)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--out", default="")
    args = p.parse_args()
    image = (args.resolution // 16) ** 2
    tokens = {"image": image, "text": args.text_len, "joint": image + args.text_len}
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = [measure(name, k, n, args.batch * tokens[kind], g) for name, k, n, kind in LAYERS]
    for r in rows:
        print(f"{r['layer']:28s} M={r['m']:5d} K={r['k']:5d} N={r['n']:5d} | forward error bf16 {r['bf16_forward_error']:.2e} "
              f"fp8 {r['fp8_exact_forward_error']:.2e} fast {r['fp8_fast_forward_error']:.2e} | input grad error bf16 "
              f"{r['bf16_input_grad_error']:.2e} fp8 {r['fp8_exact_input_grad_error']:.2e} fast {r['fp8_fast_input_grad_error']:.2e} "
              f"| dx ms {r['fp8_exact_input_grad_ms']:.3f} -> {r['fp8_fast_input_grad_ms']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(["scripts/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
                       "resolution": args.resolution, "batch": args.batch, "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
