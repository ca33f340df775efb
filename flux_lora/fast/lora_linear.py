"""A LoRA layer over a plain (bf16) base as one op, whose base matmul adds the LoRA's share in its
epilogue, in the forward and in the backward.

    forward:   c = bias + s·(x·Aᵀ)·Bᵀ       (lora_kernels.widen: written once)
               y = c + x·Wᵀ                (cuBLAS, beta = 1: c is read in the matmul's epilogue)
    backward:  dh = s·dy·B,  dB = s·dyᵀ·h,  dA = dhᵀ·x
               dx = dh·A + dy·W            (the same: the base's input gradient adds the LoRA's)

flux_lora.fast.lora_up's path writes the base output and then reads it back to add the LoRA's; here
the sum is written first and the base matmul, which is compute-bound, reads it for free. Likewise the
two input gradients are summed inside the base's matmul instead of by the kernel after it. Both ops
are opaque to inductor: an addmm it can see is lowered with a copy of its input first.

Measured at 512 px, batch 4 on an H200 (bench/README.md, session 21): the GPU's busy time 368.8 ->
354.5 ms a step, 10.72 -> 10.86 samples/s in the same process.

Only a base of the compute dtype takes this path (under autocast: its dtype; without: x, W, A and B
all of one dtype); an fp8 or 4-bit base keeps lora_up's (torch._scaled_mm cannot add a matrix).
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from flux_lora.fast import lora_kernels

ENABLED = True  # scripts/bench.py --compare-lora-linear toggles it


@torch.library.custom_op("flux_lora::lora_linear", mutates_args=())
def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
             scaling: float, triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h): y = x·Wᵀ + bias + scaling·h·Bᵀ with h = x·Aᵀ kept for the backward."""
    x2 = x.reshape(-1, x.shape[-1])
    h = x2 @ a.t()
    if triton and lora_kernels.available(h, b):
        c = lora_kernels.widen(h, b, alpha=scaling, bias=bias)
    else:
        c = torch.addmm(bias if bias is not None else h.new_zeros(b.shape[0]), h, b.t(), alpha=scaling)
    y = c.addmm_(x2, weight.t())
    return y.view(*x.shape[:-1], weight.shape[0]), h.view(*x.shape[:-1], a.shape[0])


@_forward.register_fake
def _(x, weight, bias, a, b, scaling, triton):
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(*x.shape[:-1], a.shape[0])


@torch.library.custom_op("flux_lora::lora_linear_backward", mutates_args=())
def _backward_op(dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, scaling: float, triton: bool, need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB) of _forward's y; dx empty unless need_dx."""
    dy2, x2, h2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
    dh = dy2 @ b
    db = dy2.t() @ h2
    if scaling != 1.0:
        dh, db = dh.mul_(scaling), db.mul_(scaling)
    if not need_dx:
        return x.new_empty(0), dh.t() @ x2, db
    # dh·A [M, K] by the Triton kernel: cuBLAS writes this rank-r product at ~1.2 TB/s on an H200
    dx = lora_kernels.widen(dh, a.t()) if triton and lora_kernels.available(dh, a) else dh @ a
    dx.addmm_(dy2, weight)
    return dx.view(x.shape), dh.t() @ x2, db


@_backward_op.register_fake
def _(dy, x, h, weight, a, b, scaling, triton, need_dx):
    return x.new_empty(x.shape if need_dx else 0), a.new_empty(a.shape), b.new_empty(b.shape)


def _setup(ctx, inputs, output):
    x, weight, _, a, b, scaling, triton = inputs
    ctx.save_for_backward(x, output[1], weight, a, b)
    ctx.scaling, ctx.triton = scaling, triton
    ctx.set_materialize_grads(False)  # h's gradient is never used: no zero-filled tensor a layer (228 a step)


def _backward(ctx, dy, _dh_unused):
    if dy is None:
        return None, None, None, None, None, None, None
    x, h, weight, a, b = ctx.saved_tensors
    # the first block's q/k/v read inputs that need no gradient: the opaque op would compute dx anyway
    need_dx = ctx.needs_input_grad[0]
    dx, da, db = _backward_op(dy, x, h, weight, a, b, ctx.scaling, ctx.triton, need_dx)
    return dx if need_dx else None, None, None, da, db, None, None


_forward.register_autograd(_backward, setup_context=_setup)


# FlopCounterMode (bench.py's MFU) sees opaque ops: count their matmuls
@register_flop_formula(torch.ops.flux_lora.lora_linear)
def _forward_flops(x_shape, w_shape, bias_shape, a_shape, b_shape, *args, **kwargs) -> int:
    m, k, n, r = math.prod(x_shape[:-1]), x_shape[-1], w_shape[0], a_shape[0]
    return 2 * m * k * n + 2 * m * k * r + 2 * m * r * n


@register_flop_formula(torch.ops.flux_lora.lora_linear_backward)
def _backward_flops(dy_shape, x_shape, h_shape, w_shape, a_shape, b_shape, scaling, triton, need_dx, **kwargs) -> int:
    m, k, n, r = math.prod(x_shape[:-1]), x_shape[-1], w_shape[0], a_shape[0]
    dx = 2 * m * n * k + 2 * m * r * k
    return 2 * (2 * m * n * r) + 2 * m * r * k + (dx if need_dx else 0)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor, lora_weight: torch.Tensor) -> torch.dtype | None:
    """The dtype the op would run in for this input, base weight and LoRA weight, or None where
    it does not apply (a base of another dtype: peft's order of casts must stay)."""
    if not ENABLED:
        return None
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return dtype if weight.dtype == dtype else None
    return x.dtype if x.dtype == weight.dtype == lora_weight.dtype else None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                scaling: float, triton: bool, dtype: torch.dtype) -> torch.Tensor:
    """x·Wᵀ + bias + scaling·(x·Aᵀ)·Bᵀ in `dtype` (compute_dtype's), one op."""
    cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))
    return _forward(cast(x), weight, cast(bias), cast(a), cast(b), float(scaling), bool(triton))[0]
