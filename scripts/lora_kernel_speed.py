"""The LoRA branch's six matmuls at FLUX.1-dev's shapes, torch (cuBLAS) against Triton: time
(from CUDA graphs, as the training step replays them), bandwidth and error of each, and the sum
over one training step's layers. The up-add's kernel is flux_lora's (fast.lora_kernels.widen,
which also serves dx = dh·A here); `narrow` and `reduce_rows` below are the candidates for the
other four, which cuBLAS matched or beat (so they stay here, not in the package). One GPU; prints a
line per op and writes a JSON.

    python scripts/lora_kernel_speed.py --resolution 512 --batch 4 --out OUT.json"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton
import triton.language as tl

from flux_lora.fast import lora_kernels as lk


@triton.jit
def _narrow_kernel(x_ptr, w_ptr, out_ptr, M, K, R, sxm, sxk, swk, swr, som, sor, alpha,
                   BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + kk[:, None] * swk + rr[None, :] * swr, mask=(kk[:, None] < K) & (rr[None, :] < R), other=0.0)
        acc += tl.dot(x, w)
    acc = acc * alpha
    tl.store(out_ptr + rm[:, None] * som + rr[None, :] * sor, acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _reduce_rows_kernel(x_ptr, h_ptr, part_ptr, M, K, R, rows_per_split, sxm, sxk, shm, shr,
                        BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    rk = pid_k * BK + tl.arange(0, BK)
    rr = tl.arange(0, BR)
    rm0 = tl.arange(0, BM)
    acc = tl.zeros((BK, BR), dtype=tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    for m0 in range(start, stop, BM):
        rm = m0 + rm0
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < stop) & (rk[None, :] < K), other=0.0)
        h = tl.load(h_ptr + rm[:, None] * shm + rr[None, :] * shr, mask=(rm[:, None] < stop) & (rr[None, :] < R), other=0.0)
        acc += tl.dot(tl.trans(x), h)
    offs = split * K * BR + rk[:, None] * BR + rr[None, :]
    tl.store(part_ptr + offs, acc, mask=rk[:, None] < K)


def narrow(x: torch.Tensor, w: torch.Tensor, alpha: float = 1.0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """alpha · x [M, K] · w [K, r] -> [M, r] (w may be a transposed view)."""
    m, k = x.shape
    r = w.shape[1]
    out = torch.empty((m, r), device=x.device, dtype=out_dtype or x.dtype)
    # rows per program: enough programs to fill every SM twice over, at most 64 rows
    sm_count = torch.cuda.get_device_properties(x.device).multi_processor_count
    bm = 64 if triton.cdiv(m, 64) >= 2 * sm_count else 32 if triton.cdiv(m, 32) >= sm_count else 16
    br = lk.rank_block(r)
    bk = 128 if br <= 32 else 64
    _narrow_kernel[(triton.cdiv(m, bm),)](x, w, out, m, k, r, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                                          out.stride(0), out.stride(1), float(alpha), BM=bm, BK=bk, BR=br,
                                          num_warps=4, num_stages=4)
    return out


def reduce_rows(x: torch.Tensor, h: torch.Tensor, alpha: float = 1.0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """alpha · x [M, K]ᵀ · h [M, r] -> [K, r]: M is split into a fixed number of slices (by shape
    alone) whose fp32 partial sums are added in order."""
    m, k = x.shape
    r = h.shape[1]
    br = lk.rank_block(r)
    bk, bm = (64, 64) if br <= 32 else (32, 64)
    k_tiles = triton.cdiv(k, bk)
    sm_count = torch.cuda.get_device_properties(x.device).multi_processor_count
    splits = max(1, min(triton.cdiv(2 * sm_count, k_tiles), triton.cdiv(m, 4 * bm)))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), bm) * bm
    splits = triton.cdiv(m, rows_per_split)
    part = torch.empty((splits, k, br), device=x.device, dtype=torch.float32)
    _reduce_rows_kernel[(k_tiles, splits)](x, h, part, m, k, r, rows_per_split, x.stride(0), x.stride(1),
                                           h.stride(0), h.stride(1), BM=bm, BK=bk, BR=br, num_warps=4, num_stages=3)
    total = part.sum(dim=0)[:, :r]
    if alpha != 1.0:
        total = total * alpha
    return total.to(out_dtype or x.dtype)


def layer_shapes(resolution: int, batch: int, text_len: int = 512, rank: int = 16) -> list[tuple]:
    """(name, tokens M, in K, out N, LoRA rank r, layers a step) with q/k/v grouped (r × 3)."""
    image = (resolution // 16) ** 2 * batch
    text = text_len * batch
    shapes = []
    for stream, m in (("img", image), ("txt", text)):
        shapes += [(f"double.{stream}.qkv", m, 3072, 9216, 3 * rank, 19), (f"double.{stream}.out", m, 3072, 3072, rank, 19),
                   (f"double.{stream}.ff0", m, 3072, 12288, rank, 19), (f"double.{stream}.ff2", m, 12288, 3072, rank, 19)]
    m = image + text
    shapes += [("single.qkv", m, 3072, 9216, 3 * rank, 38), ("single.mlp", m, 3072, 12288, rank, 38),
               ("single.proj_out", m, 15360, 3072, rank, 38)]
    return shapes


def timed_ms(fn, calls: int = 20, replays: int = 10) -> float:
    """GPU time of one call, from a CUDA graph of `calls` calls: as the training step replays
    them, without the host's launch cost (which dominates these small kernels launched eagerly)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * calls)


def ops(m, k, n, r, dev):
    bf = torch.bfloat16
    x, dy, y = (torch.randn(m, k, device=dev, dtype=bf), torch.randn(m, n, device=dev, dtype=bf),
                torch.randn(m, n, device=dev, dtype=bf))
    a, b = torch.randn(r, k, device=dev, dtype=bf) / k ** 0.5, torch.randn(n, r, device=dev, dtype=bf) / r ** 0.5
    h, dh = x @ a.t(), dy @ b
    e = 2  # bytes an element
    return {  # name: (torch, triton, fp32 reference, bytes moved at the least)
        "down h=x·Aᵀ": (lambda: x @ a.t(), lambda: narrow(x, a.t()), lambda: x.float() @ a.float().t(), e * m * k),
        "up+add y+h·Bᵀ": (lambda: torch.addmm(y, h, b.t()), lambda: lk.widen(h, b, y), lambda: y.float() + h.float() @ b.float().t(), 2 * e * m * n),
        "dh=dy·B": (lambda: dy @ b, lambda: narrow(dy, b), lambda: dy.float() @ b.float(), e * m * n),
        "dB=dyᵀ·h": (lambda: dy.t() @ h, lambda: reduce_rows(dy, h), lambda: dy.float().t() @ h.float(), e * m * n),
        "dA=dhᵀ·x": (lambda: dh.t() @ x, lambda: reduce_rows(x, dh).t(), lambda: dh.float().t() @ x.float(), e * m * k),
        "dx=dh·A": (lambda: dh @ a, lambda: lk.widen(dh, a.t()), lambda: dh.float() @ a.float(), e * m * k),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", default="")
    args = p.parse_args()
    dev = torch.device("cuda")
    rows, totals = [], {"torch": 0.0, "triton": 0.0}
    for name, m, k, n, r, count in layer_shapes(args.resolution, args.batch, rank=args.rank):
        for op, (f_torch, f_triton, f_ref, nbytes) in ops(m, k, n, r, dev).items():
            ref = f_ref()
            scale = ref.abs().max().item()
            err = {kind: (f().float() - ref).abs().max().item() / scale for kind, f in (("torch", f_torch), ("triton", f_triton))}
            ms = {"torch": timed_ms(f_torch), "triton": timed_ms(f_triton)}
            for kind in totals:
                totals[kind] += ms[kind] * count
            row = {"layer": name, "op": op, "M": m, "K": k, "N": n, "r": r, "layers": count,
                   **{f"{kind}_us": round(ms[kind] * 1e3, 1) for kind in ms},
                   **{f"{kind}_TBps": round(nbytes / ms[kind] / 1e9, 2) for kind in ms},
                   **{f"{kind}_rel_err": float(f"{err[kind]:.2e}") for kind in err}}
            rows.append(row)
            print(f"{name:18s} {op:14s} torch {row['torch_us']:8.1f} us {row['torch_TBps']:5.2f} TB/s | "
                  f"triton {row['triton_us']:8.1f} us {row['triton_TBps']:5.2f} TB/s | err {err['torch']:.1e} {err['triton']:.1e}",
                  flush=True)
    print(f"a step's LoRA matmuls: torch {totals['torch']:.1f} ms, triton {totals['triton']:.1f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"kind": "lora_kernels", "resolution": args.resolution, "batch": args.batch, "rank": args.rank,
                       "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "ms_per_step": totals, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
