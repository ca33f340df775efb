"""flux_lora.fast.qk_rope's Triton forward at FLUX.1-dev's shapes: time, bandwidth and bits of each
tile choice (rows a program, warps), of `_heads_kernel` below (the dropped candidate: a program per
few tokens, every head in turn, their cos/sin read once) and of inductor's fusion of the torch
maths. Each is timed two ways: replayed back to back from a CUDA graph (its input then partly in
L2), and as in the training step, right after the matmul that writes the projection it reads.
One GPU; prints a line per choice and writes a JSON.

    python scripts/qk_rope_speed.py --resolution 512 --batch 4 --out OUT.json"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch
import triton
import triton.language as tl

from flux_lora.fast import qk_rope
from lora_kernel_speed import timed_ms  # scripts/: a CUDA graph of calls, replayed


@triton.jit
def _heads_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rstd_ptr, S, H, sxb, sxs, sxh, eps,
                  D: tl.constexpr, BT: tl.constexpr):
    blocks = tl.cdiv(S, BT)
    b = (tl.program_id(0) // blocks).to(tl.int64)
    s = (tl.program_id(0) % blocks) * BT + tl.arange(0, BT)
    ok = s < S
    s = s.to(tl.int64)
    d = tl.arange(0, D)
    c = tl.load(cos_ptr + s[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    sn = tl.load(sin_ptr + s[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    w = tl.load(w_ptr + d)[None, :].to(tl.float32)
    for h in range(H):
        x = tl.load(x_ptr + (b * sxb + s * sxs + h * sxh)[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        x = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        rows = (b * S + s) * H + h
        tl.store(rstd_ptr + rows, rstd, mask=ok)
        y = (x * rstd[:, None] * w).to(out_ptr.dtype.element_ty).to(tl.float32)
        even, odd = tl.split(tl.reshape(y, (BT, D // 2, 2)))
        rotated = tl.reshape(tl.join(-odd, even), (BT, D))
        tl.store(out_ptr + rows[:, None] * D + d[None, :], (y * c + rotated * sn).to(out_ptr.dtype.element_ty),
                 mask=ok[:, None])


def heads_kernel(x, weight, eps, cos, sin, out, rstd, tokens: int, warps: int):
    b, s, h, d = x.shape
    _heads_kernel[(b * triton.cdiv(s, tokens),)](x, weight, cos, sin, out, rstd, s, h, *x.stride()[:3], float(eps),
                                                 D=d, BT=tokens, num_warps=warps)


def after_matmul_us(fn, produce, calls: int = 30) -> float:
    """Median microseconds of a call made right after `produce` (the matmul writing its input)."""
    fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for start, stop in events:
        produce()
        start.record()
        fn()
        stop.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(stop) * 1e3 for start, stop in events)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--out", default="")
    args = p.parse_args()
    dev = torch.device("cuda")
    h, d = 24, 128
    s = args.text_len + (args.resolution // 16) ** 2
    g = torch.Generator(dev).manual_seed(0)
    # q of a FLUX.1 single block: a slice of the grouped projection's output (q, k, v, mlp)
    normed = torch.randn(args.batch * s, h * d, device=dev, dtype=torch.bfloat16, generator=g)
    grouped = torch.randn(7 * h * d, h * d, device=dev, dtype=torch.bfloat16, generator=g) / (h * d) ** 0.5
    proj = torch.empty(args.batch, s, 7 * h * d, device=dev, dtype=torch.bfloat16)
    produce = (lambda: torch.mm(normed, grouped.t(), out=proj.view(-1, proj.shape[-1])))
    produce()
    x = proj[..., : h * d].unflatten(-1, (h, d))
    weight = (torch.rand(d, device=dev, generator=g) + 0.5).to(torch.bfloat16)
    angles = torch.rand(s, d // 2, device=dev, generator=g, dtype=torch.float64) * 6
    cos, sin = (t.repeat_interleave(2, -1).float().contiguous() for t in (angles.cos(), angles.sin()))
    out, rstd = torch.empty(args.batch, s, h, d, device=dev, dtype=torch.bfloat16), torch.empty(args.batch, s, h, device=dev)
    moved = 2 * x.numel() * x.element_size()
    rows = []

    def record(name, fn, compare=True):
        row = {"kernel": name}
        for how, us in (("graphed", timed_ms(fn) * 1e3), ("after_matmul", after_matmul_us(fn, produce))):
            row[f"{how}_us"], row[f"{how}_tb_s"] = round(us, 2), round(moved / us / 1e6, 2)
        if compare:
            row["bits_equal_to_default"] = bool(torch.equal(out, want))
        rows.append(row)
        print(json.dumps(row), flush=True)

    qk_rope.launch(x, weight, None, None, 1e-6, cos, sin, out, rstd, **qk_rope.TILE)
    want = out.clone()
    reference = torch.compile(lambda t: qk_rope._reference(t, weight, 1e-6, cos, sin)[0].to(t.dtype))
    err = (reference(x).float() - want.float()).abs().max().item()
    print(json.dumps({"max_abs_diff_vs_torch_maths": err}))
    record("inductor (torch maths)", lambda: reference(x), compare=False)
    for n, warps in itertools.product((16, 32, 64), (2, 4, 8)):
        record(f"rows={n} warps={warps}", lambda: qk_rope.launch(x, weight, None, None, 1e-6, cos, sin, out, rstd, n, warps))
    for tokens, warps in ((8, 4), (16, 4)):
        record(f"heads kernel tokens={tokens} warps={warps}",
               lambda: heads_kernel(x, weight, 1e-6, cos, sin, out, rstd, tokens, warps))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"kind": "qk_rope_speed", "resolution": args.resolution, "batch": args.batch,
                       "default": qk_rope.TILE, "max_abs_diff_vs_torch_maths": err, "rows": rows,
                       "device": torch.cuda.get_device_name()}, f, indent=1)


if __name__ == "__main__":
    main()
