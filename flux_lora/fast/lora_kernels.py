"""Triton kernels for the LoRA branch's skinny matmuls (rank r ≤ 64 against a hidden size of
thousands), which cuBLAS runs far from the GPU's memory bandwidth. Three shapes cover the six
matmuls of a LoRA layer's forward and backward:

    narrow(X, W)        X [M, K] · W [K, r]  -> [M, r]   h = x·Aᵀ, dh = dy·B
    reduce_rows(X, H)   Xᵀ [K, M] · H [M, r] -> [K, r]   dB = dyᵀ·h, dAᵀ = xᵀ·dh (long M, split)
    widen(H, W, Y)      Y + H [M, r] · Wᵀ [r, N] -> [M, N]   y + h·Bᵀ, dx = dh·A

Each reads its large operand once at nearly full bandwidth; W (r × thousands) stays in L2. Tile
sizes follow from the shapes alone (no autotuning) and the split reduction sums fixed slices in a
fixed order: the same inputs give the same bits on every run, as exact resume needs.

Only CUDA tensors take these paths (`available`); everything else uses torch's matmuls."""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without triton
    triton = None


@functools.cache
def _triton_ok() -> bool:
    return triton is not None


def available(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels run for these tensors: CUDA, 16-bit, r at most 64."""
    return _triton_ok() and all(t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) for t in tensors)


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


if triton is not None:

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
    def _widen_kernel(h_ptr, w_ptr, y_ptr, out_ptr, M, N, R, shm, shr, swn, swr, sym, syn, som, son, alpha,
                      HAS_Y: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rr = tl.arange(0, BR)
        h = tl.load(h_ptr + rm[:, None] * shm + rr[None, :] * shr, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        w = tl.load(w_ptr + rr[:, None] * swr + rn[None, :] * swn, mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(h, w) * alpha
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        if HAS_Y:
            acc += tl.load(y_ptr + rm[:, None] * sym + rn[None, :] * syn, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _sm_count(device: torch.device) -> int:
    # (a CPU tensor runs only under TRITON_INTERPRET=1, in tests: an H100's count)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def narrow(x: torch.Tensor, w: torch.Tensor, alpha: float = 1.0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """alpha · x [M, K] · w [K, r] -> [M, r] (w may be a transposed view)."""
    m, k = x.shape
    r = w.shape[1]
    out = torch.empty((m, r), device=x.device, dtype=out_dtype or x.dtype)
    # rows per program: enough programs to fill every SM twice over, at most 64 rows
    bm = 64 if triton.cdiv(m, 64) >= 2 * _sm_count(x.device) else 32 if triton.cdiv(m, 32) >= _sm_count(x.device) else 16
    br = _rank_block(r)
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
    br = _rank_block(r)
    bk, bm = (64, 64) if br <= 32 else (32, 64)
    k_tiles = triton.cdiv(k, bk)
    splits = max(1, min(triton.cdiv(2 * _sm_count(x.device), k_tiles), triton.cdiv(m, 4 * bm)))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), bm) * bm
    splits = triton.cdiv(m, rows_per_split)
    part = torch.empty((splits, k, br), device=x.device, dtype=torch.float32)
    _reduce_rows_kernel[(k_tiles, splits)](x, h, part, m, k, r, rows_per_split, x.stride(0), x.stride(1),
                                           h.stride(0), h.stride(1), BM=bm, BK=bk, BR=br, num_warps=4, num_stages=3)
    total = part.sum(dim=0)[:, :r]
    if alpha != 1.0:
        total = total * alpha
    return total.to(out_dtype or x.dtype)


def widen(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    """(y +) alpha · h [M, r] · w [N, r]ᵀ -> [M, N], in y's dtype (h's without y); fp32 sum, one rounding."""
    m, r = h.shape
    n = w.shape[0]
    out = torch.empty((m, n), device=h.device, dtype=y.dtype if y is not None else h.dtype)
    br = _rank_block(r)
    bm, bn = 64, 128
    ys = (y.stride(0), y.stride(1)) if y is not None else (0, 0)
    _widen_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        h, w, y if y is not None else out, out, m, n, r, h.stride(0), h.stride(1), w.stride(0), w.stride(1), *ys,
        out.stride(0), out.stride(1), float(alpha), HAS_Y=y is not None, BM=bm, BN=bn, BR=br, num_warps=4, num_stages=2)
    return out
