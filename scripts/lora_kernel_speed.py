"""The LoRA branch's six matmuls at FLUX.1-dev's shapes, torch (cuBLAS) against Triton: time
(from CUDA graphs, as the training step replays them), bandwidth and error of each, and the sum
over one training step's layers. The up-add's kernel is flux_lora's (fast.lora_kernels.widen,
which also serves dx = dh·A here); `narrow` and `reduce_rows` below are the candidates for the
other four, and `fused_up_grads` for dh and dB from one read of dy; cuBLAS matched or beat them
(so they stay here, not in the package). One GPU; prints a line per op and writes a JSON.
`--sweep` times the tile choices of `fused_up_grads` and of the write-only widen
(flux_lora.fast.lora_linear's forward) over a step's layers.

    python scripts/lora_kernel_speed.py --resolution 512 --batch 4 [--sweep] --out OUT.json"""

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


@triton.jit
def _up_grads_kernel(dy_ptr, h_ptr, b_ptr, ws_dh_ptr, ws_db_ptr, M, N, R, sdm, sdn, shm, shr, sbn, sbr,
                     bound1, bound2, bound3, COLS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BR: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    c0 = pn * COLS
    # the member whose columns these are: its rank slice of h and B (block-diagonal B)
    r0 = ((c0 >= bound1).to(tl.int32) + (c0 >= bound2).to(tl.int32) + (c0 >= bound3).to(tl.int32)) * R
    row_ok = rm < M
    h = tl.load(h_ptr + rm[:, None] * shm + (r0 + rr)[None, :] * shr, mask=row_ok[:, None] & (rr[None, :] < R),
                other=0.0)
    dh = tl.zeros((BM, BR), dtype=tl.float32)
    for j in range(0, COLS, BN):
        rn = c0 + j + tl.arange(0, BN)
        col_ok = rn < N
        dy = tl.load(dy_ptr + rm[:, None] * sdm + rn[None, :] * sdn, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rn[:, None] * sbn + (r0 + rr)[None, :] * sbr, mask=col_ok[:, None] & (rr[None, :] < R),
                    other=0.0)
        dh += tl.dot(dy, b)
        db = tl.dot(tl.trans(dy), h)
        tl.store(ws_db_ptr + pm * N * BR + rn[:, None] * BR + rr[None, :], db, mask=col_ok[:, None])
    tl.store(ws_dh_ptr + pn * M * BR + rm[:, None] * BR + rr[None, :], dh, mask=row_ok[:, None])


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

UP_GRADS_TILE = [256, 512, 64, 8, 3]  # rows and columns a program covers, column tile, warps, stages


def fused_up_grads(dy: torch.Tensor, h: torch.Tensor, b: torch.Tensor, alpha: float = 1.0,
             splits: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A candidate that lost to cuBLAS (bench/README.md, session 21: 12.9 against 10.3 ms a step at
    512 px, batch 4, on an H200; cuBLAS reads dy twice at ~3.5-3.9 TB/s, this kernel once at ~1.7).
    (alpha · dy·B, alpha · dyᵀ·h) from one read of dy [M, N]; h [M, R], B [N, R]. `splits`: the
    output columns of each member of a group whose B is block-diagonal (member i: columns splits[i],
    rank R / len(splits)); the zero blocks are neither read nor written. Partial sums go to fp32
    buffers (per row block for dB, per column block for dh) and are added in a fixed order."""
    m, n = dy.shape
    splits = list(splits or [n])
    r = h.shape[1] // len(splits)
    bm, cols, bn, warps, stages = UP_GRADS_TILE
    br = lk.rank_block(r)
    bounds = [sum(splits[:i + 1]) for i in range(len(splits) - 1)] + [n] * (4 - len(splits))
    pm, pn = triton.cdiv(m, bm), triton.cdiv(n, cols)
    ws_dh = torch.empty((pn, m, br), device=dy.device, dtype=torch.float32)
    ws_db = torch.empty((pm, n, br), device=dy.device, dtype=torch.float32)
    _up_grads_kernel[(pm, pn)](dy, h, b, ws_dh, ws_db, m, n, r, dy.stride(0), dy.stride(1), h.stride(0), h.stride(1),
                               b.stride(0), b.stride(1), *bounds[:3], COLS=cols, BM=bm, BN=bn, BR=br,
                               num_warps=warps, num_stages=stages)
    db_members = ws_db.sum(0)[:, :r].mul_(alpha).to(dy.dtype)  # [N, r]: each column's own member's rank
    if len(splits) == 1:
        return ws_dh.sum(0)[:, :r].mul_(alpha).to(dy.dtype), db_members
    dh = dy.new_empty((m, h.shape[1]))
    db = b.new_zeros(b.shape, dtype=dy.dtype)
    start = 0
    for i, size in enumerate(splits):
        blocks = slice(start // cols, triton.cdiv(start + size, cols))
        dh[:, i * r:(i + 1) * r] = ws_dh[blocks].sum(0)[:, :r].mul_(alpha)
        db[start:start + size, i * r:(i + 1) * r] = db_members[start:start + size]
        start += size
    return dh, db


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


def graph_of(fn, calls: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `calls` calls of fn (warmed up on a side stream, as capture wants), replayed once."""
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
    return graph


def timed_ms(fn, calls: int = 20, replays: int = 10) -> float:
    """GPU time of one call, from a CUDA graph of `calls` calls: as the training step replays
    them, without the host's launch cost (which dominates these small kernels launched eagerly)."""
    graph = graph_of(fn, calls)
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


def grouped_shapes(resolution: int, batch: int, text_len: int = 512, rank: int = 16) -> list[tuple]:
    """(name, M, N, rank of the layer, layers a step, member columns) of the up-projections as the
    step runs them: q/k/v grouped, FLUX.1's single blocks' q/k/v/proj_mlp grouped."""
    image, text = (resolution // 16) ** 2 * batch, text_len * batch
    shapes = []
    for stream, m in (("img", image), ("txt", text)):
        shapes += [(f"double.{stream}.qkv", m, 9216, 3 * rank, 19, [3072] * 3), (f"double.{stream}.out", m, 3072, rank, 19, None),
                   (f"double.{stream}.ff0", m, 12288, rank, 19, None), (f"double.{stream}.ff2", m, 3072, rank, 19, None)]
    return shapes + [("single.qkv_mlp", image + text, 21504, 4 * rank, 38, [3072] * 3 + [12288]),
                     ("single.proj_out", image + text, 3072, rank, 38, None)]


UP_GRADS_TILES = [(256, 512, 64, 8, 3), (128, 512, 64, 8, 3), (256, 512, 32, 8, 3), (256, 1024, 64, 8, 3),
                  (256, 512, 64, 4, 3), (512, 512, 32, 8, 2), (128, 512, 128, 8, 3)]
WIDEN_TILES = [(64, 128, 4, 2), (128, 128, 8, 2), (64, 256, 8, 2), (128, 64, 4, 2), (32, 256, 4, 2), (128, 256, 8, 2)]


def sweep(args, dev) -> dict:
    """A step's dh + dB (cuBLAS, two reads of dy) against lora_kernels.up_grads at each tile choice,
    and the write-only widen (bias + s·h·Bᵀ, lora_linear's forward) at each of its tile choices."""
    bf = torch.bfloat16
    totals = {"cublas dh+dB": 0.0, **{f"up_grads {t}": 0.0 for t in UP_GRADS_TILES}, **{f"widen {t}": 0.0 for t in WIDEN_TILES}}
    for name, m, n, r, count, splits in grouped_shapes(args.resolution, args.batch, rank=args.rank):
        dy, h = torch.randn(m, n, device=dev, dtype=bf), torch.randn(m, r, device=dev, dtype=bf)
        b = (torch.block_diag(*[torch.randn(c, r // len(splits), device=dev, dtype=bf) for c in splits]) if splits
             else torch.randn(n, r, device=dev, dtype=bf))
        bias = torch.randn(n, device=dev, dtype=bf)
        line = {"cublas dh+dB": timed_ms(lambda: (dy @ b, dy.t() @ h))}
        want = (dy.float() @ b.float(), (dy.float().t() @ h.float()) * (b != 0) if splits else dy.float().t() @ h.float())
        for tile in UP_GRADS_TILES:
            UP_GRADS_TILE[:] = tile
            got = fused_up_grads(dy, h, b, 1.0, splits)
            assert all((g.float() - w.float()).abs().max() <= 1e-2 * w.float().abs().max() for g, w in zip(got, want)), tile
            line[f"up_grads {tile}"] = timed_ms(lambda: fused_up_grads(dy, h, b, 1.0, splits))
        for tile in WIDEN_TILES:
            lk.WIDEN_TILE = tile
            line[f"widen {tile}"] = timed_ms(lambda: lk.widen(h, b, alpha=0.5, bias=bias))
        for key, ms in line.items():
            totals[key] += ms * count
        print(name, " ".join(f"{k}={v * 1e3:.1f}us" for k, v in line.items()), flush=True)
    for key, ms in totals.items():
        print(f"a step: {key:40s} {ms:7.2f} ms")
    return totals


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--sweep", action="store_true", help="tile choices of up_grads and the write-only widen, a step's sum each")
    p.add_argument("--out", default="")
    args = p.parse_args()
    dev = torch.device("cuda")
    if args.sweep:
        totals = sweep(args, dev)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"kind": "lora_kernels_sweep", "resolution": args.resolution, "batch": args.batch,
                           "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "ms_per_step": totals}, f, indent=1)
        return
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
