"""A Triton kernel for the LoRA up-projection's add, y + s·h·Bᵀ (rank r ≤ 64 against thousands of
output columns), which cuBLAS's addmm runs at about half the GPU's memory bandwidth (~1.5 TB/s on
an H200 at FLUX.1's shapes; this kernel 3.3-3.6 TB/s). Each program reads an [rows, r] slice of h
and an [r, columns] slice of Bᵀ (both small, from L2), adds y's tile and writes it once: one read
and one write of y, summed in fp32 and rounded once, as addmm's epilogue does.

The other five matmuls of a LoRA layer stay with cuBLAS: scripts/lora_kernel_speed.py measures
them against Triton candidates, which were no faster. Tile sizes follow from the shapes alone (no
autotuning): the same inputs give the same bits on every run, as exact resume needs.

Only CUDA tensors take this path (`available`); everything else uses torch's addmm."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without triton
    triton = None


def available(*tensors: torch.Tensor) -> bool:
    """Whether the kernel runs for these tensors: triton installed; plain CUDA tensors (not a
    DTensor shard) in bf16 or fp16."""
    return triton is not None and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.is_cuda
                                      and t.dtype in (torch.bfloat16, torch.float16) for t in tensors)


def rank_block(r: int) -> int:
    """The rank padded to a tile dimension tl.dot accepts (a power of two, at least 16)."""
    return max(16, triton.next_power_of_2(r))


if triton is not None:

    @triton.jit
    def _widen_kernel(h_ptr, w_ptr, y_ptr, bias_ptr, out_ptr, M, N, R, shm, shr, swn, swr, sym, syn, som, son, alpha,
                      HAS_Y: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
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
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, acc.to(out_ptr.dtype.element_ty), mask=mask)


WIDEN_TILE = (64, 128, 4, 2)  # rows, columns, warps, stages of a program (fixed: same bits each run)


def widen(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor | None = None, alpha: float = 1.0,
          bias: torch.Tensor | None = None) -> torch.Tensor:
    """(y +) (bias [N] +) alpha · h [M, r] · w [N, r]ᵀ -> [M, N], in y's dtype (h's without y); fp32
    sum, one rounding."""
    m, r = h.shape
    n = w.shape[0]
    out = torch.empty((m, n), device=h.device, dtype=y.dtype if y is not None else h.dtype)
    bm, bn, warps, stages = WIDEN_TILE
    ys = (y.stride(0), y.stride(1)) if y is not None else (0, 0)
    _widen_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        h, w, y if y is not None else out, bias if bias is not None else out, out, m, n, r,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), *ys, out.stride(0), out.stride(1), float(alpha),
        HAS_Y=y is not None, HAS_BIAS=bias is not None, BM=bm, BN=bn, BR=rank_block(r), num_warps=warps, num_stages=stages)
    return out
