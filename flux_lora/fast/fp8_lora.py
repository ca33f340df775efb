"""An fp8 base Linear and its LoRA down-projection as one autograd node: (x·Wᵀ + b, x·Aᵀ).

Both read x, and both send a gradient back to it. As two nodes, each backward writes its own
[tokens, in] tensor and autograd adds them (two writes and two reads of that size more, per LoRA
layer, for nothing). As one, the backward writes dx once:

    dx = dyq·W (fp8 tensor cores, bf16 out)  +  dh·A (added while written: lora_kernels.widen)

and dA = dhᵀ·x as before. The forward is unchanged (the same two matmuls). A q/k/v group passes
its members' per-column weight scales (`dy_scale`), folded into dy before it is quantized.
"""

from __future__ import annotations

import torch

from flux_lora.fast import fp8, lora_kernels


@torch.library.custom_op("flux_lora::lora_dx_add", mutates_args=())
def lora_dx_add(dx: torch.Tensor, dh: torch.Tensor, a: torch.Tensor, triton: bool) -> torch.Tensor:
    """dx [M, in] + dh [M, r] · a [r, in], in dx's dtype, summed in fp32 with one rounding."""
    if triton and lora_kernels.available(dx, dh, a):
        return lora_kernels.widen(dh, a.t(), dx)
    dtype = a.dtype if a.dtype != dx.dtype else dx.dtype
    return torch.addmm(dx.to(dtype), dh.to(dtype), a).to(dx.dtype)


@lora_dx_add.register_fake
def _(dx, dh, a, triton):
    return dx.new_empty(dx.shape)


class _Fp8MatmulAndDown(torch.autograd.Function):
    """(x Wᵀ + b, x Aᵀ) with the frozen fp8 W and the LoRA's A (already in the compute dtype:
    bf16 under autocast, else fp32, as peft computes it); gradients for x and A only."""

    @staticmethod
    def forward(ctx, x, a, weight, scale_out, scale_in, bias, out_dtype, weight_t, dy_scale, triton):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = fp8._base_forward(x2, weight, scale_out, bias, out_dtype)
        h = x2.to(a.dtype) @ a.t()
        ctx.save_for_backward(x2, a, weight, scale_in, weight_t, dy_scale)
        ctx.x_shape, ctx.triton = shape, triton
        return y.view(*shape[:-1], y.shape[-1]), h.view(*shape[:-1], h.shape[-1])

    @staticmethod
    def backward(ctx, dy, dh):
        x2, a, weight, scale_in, weight_t, dy_scale = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy_scale is not None:  # a group: each member's scale folded in before one quantization
            dy2 = dy2.float() * dy_scale
        dx = fp8._base_input_grad(dy2, weight, scale_in, weight_t, out_dtype=x2.dtype)
        da = None
        if dh is not None:
            dh2 = dh.reshape(-1, dh.shape[-1]).to(a.dtype)
            dx = lora_dx_add(dx, dh2, a, ctx.triton)
            da = dh2.t() @ x2.to(a.dtype)
        return dx.view(ctx.x_shape), da, None, None, None, None, None, None, None, None


def compute_weight(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The LoRA weight as its matmul uses it: in autocast's dtype under autocast (as F.linear would
    cast it), else as it is (x is then cast to it, as peft does)."""
    if torch.is_autocast_enabled(x.device.type):
        return weight.to(torch.get_autocast_dtype(x.device.type))
    return weight


def base_and_down(base: fp8.Fp8Linear, x: torch.Tensor, a: torch.Tensor, triton: bool = False):
    """(base(x), x·aᵀ) for an Fp8Linear base and a LoRA down weight `a` [r, in], as one node."""
    return _Fp8MatmulAndDown.apply(x, compute_weight(x, a), base.weight, base.scale_out, base.scale_in, base.bias,
                                   base.out_dtype, base.weight_t, None, triton)


def group_and_down(weight, scale_out, ones_in, bias, out_dtype, weight_t, x: torch.Tensor, a: torch.Tensor,
                   triton: bool = False):
    """The same for a q/k/v group's concatenated fp8 weight (members' scales per column)."""
    return _Fp8MatmulAndDown.apply(x, compute_weight(x, a), weight, scale_out, ones_in, bias, out_dtype, weight_t,
                                   scale_out, triton)
