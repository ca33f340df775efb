"""A LoRA layer's up-projection and its add to the base output as one matmul: y + s·h·Bᵀ is one
addmm, whose epilogue adds y while the result is written.

peft computes h·Bᵀ into a new [tokens, out] tensor and adds it to y afterwards (a kernel of its
own, or folded into the next one, which then reads both tensors); addmm writes the sum once. At
512 px, batch 4 LoRA's matmuls are memory-bound (rank 16). Measured on one H100, same process:
+3.9% samples/s at 512 px, +3.2% at 1024 px (README, bench --compare-up-add).

The op is a torch.library custom op, opaque to inductor: an addmm that inductor sees is lowered
with a copy of y first (measured slower than peft's forward). Its backward is plain matmuls.

With `triton` (train.lora_triton) the forward is flux_lora.lora_kernels.widen on CUDA instead:
cuBLAS runs this rank-r addmm at ~1.5 TB/s on an H200, the Triton kernel at 3.2-3.5 TB/s at
FLUX.1's large shapes (scripts/lora_kernel_speed.py).

A base of the compute dtype (bf16 under autocast) takes flux_lora.fast.lora_linear instead, which
also folds the base matmul in; this op serves the fp8 base, whose matmul cannot add a matrix.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.utils.flop_counter import register_flop_formula

from flux_lora.fast import lora_kernels, lora_linear


@torch.library.custom_op("flux_lora::lora_up_add", mutates_args=())
def lora_up_add(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scaling: float, triton: bool = False) -> torch.Tensor:
    """y [..., out] + scaling · h [..., r] · b [out, r]ᵀ; all three of one dtype."""
    y2, h2 = y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1])
    if triton and lora_kernels.available(y2, h2, b):
        return lora_kernels.widen(h2, b, y2, alpha=scaling).view(y.shape)
    return torch.addmm(y2, h2, b.t(), alpha=scaling).view(y.shape)


@lora_up_add.register_fake
def _(y, h, b, scaling, triton=False):
    return y.new_empty(y.shape)


# FlopCounterMode (bench.py's MFU) sees an opaque op: count its matmul as peft's would be counted
@register_flop_formula(torch.ops.flux_lora.lora_up_add)
def _lora_up_add_flops(y_shape, h_shape, b_shape, *args, **kwargs) -> int:
    return 2 * math.prod(h_shape) * b_shape[0]


def _setup(ctx, inputs, output):
    _, h, b, scaling, _ = inputs
    ctx.save_for_backward(h, b)
    ctx.scaling = scaling


def _backward(ctx, dy):
    h, b = ctx.saved_tensors
    dy2 = dy.reshape(-1, dy.shape[-1])
    dh = dy2 @ b
    db = dy2.t() @ h.reshape(-1, h.shape[-1])
    if ctx.scaling != 1.0:
        dh, db = dh * ctx.scaling, db * ctx.scaling
    return dy, dh.view(h.shape), db, None, None


lora_up_add.register_autograd(_backward, setup_context=_setup)


def lora_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The LoRA branch's input: cast to the (fp32) LoRA weight's dtype as peft does, except under
    autocast, which casts it back to bf16 for the matmul anyway."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(weight.dtype)


def up_add(y: torch.Tensor, h: torch.Tensor, b_weight: torch.Tensor, scaling: float, triton: bool = False) -> torch.Tensor:
    """y + scaling · h · b_weightᵀ in y's dtype, summed in h's dtype (peft's order: bf16 under
    autocast, fp32 otherwise) with one rounding; `triton`: by lora_kernels where it runs."""
    dtype = h.dtype
    return lora_up_add(y.to(dtype), h, b_weight.to(dtype), float(scaling), triton).to(y.dtype)


def _peft_linear():
    from peft.tuners.lora.layer import Linear

    return Linear


def eligible(layer) -> bool:
    """A peft LoRA Linear whose forward is exactly base + B·A·x·scaling with one active adapter."""
    adapters = getattr(layer, "active_adapters", None)
    if not adapters or len(adapters) != 1 or getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return False
    name = adapters[0]
    return (name in layer.lora_A and not layer.use_dora.get(name, False) and name not in getattr(layer, "lora_variant", {})
            and isinstance(layer.lora_dropout[name], torch.nn.Identity)
            and not getattr(layer, "lora_bias", {}).get(name, False))


@functools.cache
def _up_add_class() -> type:
    """peft's Linear with this forward (a subclass: isinstance checks, keys and export unchanged)."""
    base_cls = _peft_linear()

    def forward(self, x, *args, **kwargs):
        if args or kwargs or not eligible(self):
            return base_cls.forward(self, x, *args, **kwargs)
        name = self.active_adapters[0]
        lora_a = self.lora_A[name]
        base = self.base_layer
        if type(base) is torch.nn.Linear and (dtype := lora_linear.compute_dtype(x, base.weight, lora_a.weight)):
            return lora_linear.lora_linear(x, base.weight, base.bias, lora_a.weight, self.lora_B[name].weight,
                                           self.scaling[name], getattr(self, "flux_lora_triton", False), dtype)
        h = lora_a(lora_input(x, lora_a.weight))
        return up_add(self.base_layer(x), h, self.lora_B[name].weight, self.scaling[name],
                      getattr(self, "flux_lora_triton", False))

    cls = type("UpAdd" + base_cls.__name__, (base_cls,), {"forward": forward, "__module__": __name__})
    globals()[cls.__name__] = cls  # findable by name: a pickled model loads
    return cls


def install(model: torch.nn.Module, triton: bool = False) -> int:
    """Give every peft LoRA Linear (a bf16 or fp8 base; not 4-bit) the one-addmm forward (`triton`:
    the Triton kernel where it runs); layers with dropout, DoRA or several adapters keep peft's path
    at run time. Returns how many."""
    linear = _peft_linear()
    n = 0
    for module in model.modules():
        if type(module) is linear:
            module.__class__ = _up_add_class()
            module.flux_lora_triton = triton
            n += 1
    return n
