"""Frozen base Linears in fp8 (e4m3) that also multiply in fp8.

The base of a LoRA run never changes, so its weight is quantized once, with one scale per tensor,
and kept at 1 byte per parameter (half of bf16). Each forward scales the activation per row
(per token) on the fly and multiplies on the fp8 tensor cores (`torch._scaled_mm`); the backward
does the same for the incoming gradient against the transposed weight. No gradient is computed
for the weight and no activation is saved for it: the LoRA branch beside it keeps its own input.

One scale per weight tensor (not per row) is what lets the backward reuse the same bytes: the
input gradient contracts over the output channels, where per-row weight scales cannot factor out.
"""

from __future__ import annotations

import functools

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
_TINY = 1e-12  # an all-zero row gets this amax (and quantizes to zeros), not a division by zero
# Hopper's fast fp8 accumulation in the input gradient's matmul too: its error against fp32 is
# 2.58e-2 beside 2.57e-2 without it (the quantization's own; bf16: 2.4e-3) at FLUX.1's shapes, and
# it saves ~5 ms of a 512-px step on an H200 (scripts/fp8_accuracy.py, bench/README.md, session 18)
BACKWARD_FAST_ACCUM = True


def quantize_tensorwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w -> (fp8 w / s, s) with s = amax(|w|) / 448, a 0-dim fp32 scale."""
    scale = w.detach().abs().amax().float().clamp(min=_TINY) / E4M3_MAX
    return (w.detach().float() / scale).to(E4M3), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 x / s, s [M, 1] fp32), one scale per row: |x / s| <= 448 by construction."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=_TINY) / E4M3_MAX
    return (x.float() / scale).to(E4M3), scale


@functools.cache
def matmul_works(device_type: str) -> bool:
    """Whether this torch build runs the row-scaled fp8 matmul (with bias) on this device type:
    CUDA needs fp8 tensor cores (H100/H200/Ada); the CPU kernel is complete from torch 2.13."""
    try:
        a = torch.ones(16, 16, device=device_type).to(E4M3)
        s = torch.ones(16, 1, device=device_type)
        torch._scaled_mm(a, a.t(), scale_a=s, scale_b=s.t().contiguous(), bias=torch.zeros(16, device=device_type,
                         dtype=torch.bfloat16), out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def fp8_supported_shape(linear: torch.nn.Linear) -> bool:
    """fp8 tensor-core matmuls need both dimensions to be multiples of 16."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def _base_forward(x2, weight, scale_out, bias, out_dtype):
    """x2 [M, K] -> x2 Wᵀ + b [M, N]: x scaled per row; fast accumulation (as the float8 training
    recipe's forward; the backward's too: BACKWARD_FAST_ACCUM); the bias is added in the epilogue."""
    xq, xs = quantize_rows(x2)
    return torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale_out, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=True)


def _base_input_grad(dy2, weight, scale_in, weight_t=None, out_dtype=None):
    """dy2 [M, N] -> dy W [M, K]; the second operand must be column-major: W as the transpose of a
    contiguous Wᵀ, the kept copy `weight_t` when there is one (keep_transposed), else made per call
    (a copy of the weight each backward: 8.5 ms of a 322 ms step at 512 px, batch 4, on an H200)."""
    dyq, dys = quantize_rows(dy2)
    w = weight_t.t() if weight_t is not None else weight.t().contiguous().t()
    return torch._scaled_mm(dyq, w, scale_a=dys, scale_b=scale_in, out_dtype=out_dtype or dy2.dtype,
                            use_fast_accum=BACKWARD_FAST_ACCUM)


def apply_keeping_dtypes(module: torch.nn.Module, apply, fn, recurse: bool) -> torch.nn.Module:
    """Module._apply for modules holding fp8 weights and fp32 scales as buffers: Module.to(dtype)
    would cast every float tensor; these keep their dtypes and only change device."""
    kept = {k: t for k, t in module._buffers.items() if t is not None}
    apply(fn, recurse)
    for k, old in kept.items():
        if module._buffers[k].dtype != old.dtype:
            module._buffers[k] = old.to(module._buffers[k].device)
    return module


class _Fp8Matmul(torch.autograd.Function):
    """y = x Wᵀ + b with the frozen fp8 W; only dx is computed."""

    @staticmethod
    def forward(ctx, x, weight, scale_out, scale_in, bias, out_dtype, weight_t=None):
        shape = x.shape
        y = _base_forward(x.reshape(-1, shape[-1]), weight, scale_out, bias, out_dtype)
        ctx.save_for_backward(weight, scale_in, weight_t)
        ctx.x_shape, ctx.x_dtype = shape, x.dtype
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        weight, scale_in, weight_t = ctx.saved_tensors
        dx = _base_input_grad(dy.reshape(-1, dy.shape[-1]), weight, scale_in, weight_t)
        return dx.view(ctx.x_shape).to(ctx.x_dtype), None, None, None, None, None, None


class Fp8Linear(torch.nn.Module):
    """Drop-in for a frozen nn.Linear: fp8 weight (1 byte/param), fp8 matmuls, output in the
    original weight's dtype. Not trainable (the weight is a buffer)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.out_dtype = weight.dtype  # bf16 on GPUs (_scaled_mm's row-wise scaling writes bf16 there)
        w8, scale = quantize_tensorwise(weight)
        self.register_buffer("weight", w8)
        # the same tensor scale, laid out as _scaled_mm's row-wise scales want it (fp32 [1, N])
        self.register_buffer("scale_out", scale.expand(1, self.out_features).contiguous())
        self.register_buffer("scale_in", scale.expand(1, self.in_features).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(self.out_dtype))
        self.register_buffer("weight_t", None, persistent=False)  # keep_transposed's copy

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Fp8Linear":
        return cls(linear.weight.data, linear.bias.data if linear.bias is not None else None)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.scale_out[0, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Matmul.apply(x, self.weight, self.scale_out, self.scale_in, self.bias, self.out_dtype, self.weight_t)

    def _apply(self, fn, recurse=True):
        return apply_keeping_dtypes(self, super()._apply, fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3, bias={self.bias is not None}"


def _transposable(module: torch.nn.Module) -> bool:
    """An fp8 layer (Fp8Linear or a q/k/v group) owning its weight: a group's members hold views
    of the group's weight and are not what runs."""
    w = module._buffers.get("weight")
    return (module._buffers.get("weight_t", 0) is None and w is not None and w.dtype == E4M3
            and w.untyped_storage().nbytes() == w.numel() * w.element_size())


def transposed_bytes(model: torch.nn.Module) -> int:
    """What keep_transposed would add: 1 byte per fp8 base parameter."""
    return sum(m.weight.numel() for m in model.modules() if _transposable(m))


def keep_transposed(model: torch.nn.Module) -> int:
    """Give every fp8 layer a kept transposed copy of its weight for the backward's input gradient
    (+1 byte per parameter; no copy of the weight each backward). Returns the bytes added."""
    added = 0
    for m in model.modules():
        if _transposable(m):
            m.weight_t = m.weight.t().contiguous()
            added += m.weight_t.numel()
    return added


def convert_frozen_linears(blocks: list[torch.nn.Module], device: torch.device) -> int:
    """Replace every frozen nn.Linear inside the blocks (a peft LoRA layer's `base_layer`
    included; its lora_A/lora_B stay) by an Fp8Linear, one block at a time on `device`, so a
    base loaded on the CPU never sits on the GPU in bf16 all at once. Returns how many.

    (An addmm for the LoRA add placed inside this op measured slower under torch.compile:
    inductor copied the addmm input first. flux_lora.lora_up does it as an opaque custom op.)"""
    n = 0
    for block in blocks:
        block.to(device)
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear and not child.weight.requires_grad and fp8_supported_shape(child):
                    setattr(parent, name, Fp8Linear.from_linear(child))
                    n += 1
    return n
