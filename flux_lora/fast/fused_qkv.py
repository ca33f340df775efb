"""q, k and v of one attention layer as one projection: one base matmul and one LoRA-down matmul
instead of three of each, because the three read the same input.

At 512 px, batch 4 the host only just keeps up with the GPU: a step queues ~2,500 LoRA matmuls
and ~900 fp8 matmuls. Grouping q/k/v (and the text stream's add_q/k/v) removes a third of those
launches and two of every three reads of the input. The peft LoRA layers stay where they are,
with their parameters, keys and export; the group only reads them:

    base:  x · [W_q; W_k; W_v]ᵀ + [b_q; b_k; b_v]            (fp8 or bf16, weights concatenated once,
                                                             the members' weights become views of it)
    LoRA:  (x · [A_q; A_k; A_v]ᵀ) · blockdiag(B_q, B_k, B_v)ᵀ · scaling

diffusers' FluxAttention already asks for `attn.to_qkv` / `attn.to_added_qkv` when
`attn.fused_projections` is set; `fuse_attention(model)` installs the groups there.
"""

from __future__ import annotations

import torch

from flux_lora.fast import fp8, lora_linear, lora_up


class _Fp8GroupMatmul(torch.autograd.Function):
    """y = x Wᵀ + b for a concatenated fp8 weight whose members have their own tensor scales
    (scale_out [1, N], one value per member's columns); only dx is computed. The backward folds
    the scales into dy before quantizing it, so one matmul contracts over all members."""

    @staticmethod
    def forward(ctx, x, weight, scale_out, ones_in, bias, out_dtype, weight_t=None):
        shape = x.shape
        y = fp8._base_forward(x.reshape(-1, shape[-1]), weight, scale_out, bias, out_dtype)
        ctx.save_for_backward(weight, scale_out, ones_in, weight_t)
        ctx.x_shape, ctx.x_dtype = shape, x.dtype
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        weight, scale_out, ones_in, weight_t = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).float() * scale_out
        dx = fp8._base_input_grad(dy2, weight, ones_in, weight_t, out_dtype=ctx.x_dtype)  # (bf16 written, not fp32)
        return dx.view(ctx.x_shape), None, None, None, None, None, None


def _base(layer):
    return layer.base_layer if hasattr(layer, "base_layer") else layer


class FusedProjection(torch.nn.Module):
    """The members' outputs concatenated on the last dim, computed as one projection. Members are
    read, not owned (kept out of the module tree, so their parameters are not listed twice)."""

    def __init__(self, members: list[torch.nn.Module], up_add: bool = False, triton: bool = False):
        super().__init__()
        self.__dict__["members"] = tuple(members)
        self.up_add = up_add  # the LoRA up-projection and its add as one addmm (flux_lora.lora_up)
        self.triton = triton  # that add as a Triton kernel where one runs (flux_lora.lora_kernels)
        bases = [_base(m) for m in members]
        self.split_sizes = [b.out_features for b in bases]  # the members' columns of the output
        self.use_fp8 = isinstance(bases[0], fp8.Fp8Linear)
        dev = bases[0].weight.device
        weight = torch.cat([b.weight.detach() for b in bases])
        bias = torch.cat([b.bias.detach() for b in bases]) if bases[0].bias is not None else None
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        if self.use_fp8:
            self.out_dtype = bases[0].out_dtype
            self.register_buffer("scale_out", torch.cat([b.scale_out for b in bases], dim=1), persistent=False)
            self.register_buffer("ones_in", torch.ones(1, bases[0].in_features, device=dev), persistent=False)
            self.register_buffer("weight_t", None, persistent=False)  # fp8.keep_transposed's copy
        # the members now read slices of the concatenated tensors: no second copy of the base
        row = 0
        for b in bases:
            n = b.out_features
            if self.use_fp8:
                b._buffers["weight"] = weight[row:row + n]
                if bias is not None:
                    b._buffers["bias"] = bias[row:row + n]
            else:
                b.weight = torch.nn.Parameter(weight[row:row + n], requires_grad=False)
                if bias is not None:
                    b.bias = torch.nn.Parameter(bias[row:row + n], requires_grad=False)
            row += n

    def _apply(self, fn, recurse=True):
        # like Fp8Linear: a dtype cast of the model must not touch the fp8 weight and its scales
        if not self.use_fp8:
            return super()._apply(fn, recurse)
        return fp8.apply_keeping_dtypes(self, super()._apply, fn, recurse)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fp8:
            return _Fp8GroupMatmul.apply(x, self.weight, self.scale_out, self.ones_in, self.bias, self.out_dtype,
                                         self.weight_t)
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        members = self.members
        has_lora = [hasattr(m, "lora_A") for m in members]
        if not any(has_lora):
            return self._base_forward(x)
        if not all(has_lora) or not all(lora_up.eligible(m) for m in members) \
                or len({m.scaling[m.active_adapters[0]] for m in members}) != 1:
            return torch.cat([m(x) for m in members], dim=-1)  # anything unusual: the members' own forward
        name = members[0].active_adapters[0]
        a = torch.cat([m.lora_A[name].weight for m in members])  # [members × r, in]
        b = torch.block_diag(*[m.lora_B[name].weight for m in members])  # [out total, members × r]
        scaling = members[0].scaling[name]
        if self.up_add and not self.use_fp8 and (dtype := lora_linear.compute_dtype(x, self.weight, a)):
            return lora_linear.lora_linear(x, self.weight, self.bias, a, b, scaling, self.triton, dtype)
        h = torch.nn.functional.linear(lora_up.lora_input(x, a), a)
        y = self._base_forward(x)
        if self.up_add:
            return lora_up.up_add(y, h, b, scaling, self.triton)
        delta = torch.nn.functional.linear(h, b) * scaling
        return (y + delta).to(y.dtype)  # as peft: the sum in the wider dtype, one rounding


# (attention attribute, its members) for FLUX's double and single blocks
GROUPS = (("to_qkv", ("to_q", "to_k", "to_v")), ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")))


def fusable(layers: list[torch.nn.Module]) -> bool:
    bases = [_base(m) for m in layers]
    same_kind = all(type(b) is type(bases[0]) for b in bases) and type(bases[0]) in (torch.nn.Linear, fp8.Fp8Linear)
    return (same_kind and len({b.in_features for b in bases}) == 1 and len({b.bias is None for b in bases}) == 1
            and len({hasattr(m, "lora_A") for m in layers}) == 1 and not any(b.weight.requires_grad for b in bases))


def fuse_attention(model: torch.nn.Module, up_add: bool = False, triton: bool = False) -> int:
    """Install q/k/v groups on every FLUX attention layer whose projections allow it (same input
    size, same base kind: fp8 or plain Linear, LoRA on all or none) and not in a group already
    (flux_lora.fast.single_block's). Returns how many groups."""
    n = 0
    grouped = {id(m.attn) for m in model.modules() if hasattr(m, "to_qkv_mlp")}
    for module in model.modules():
        if not hasattr(module, "fused_projections") or module.fused_projections or id(module) in grouped:
            continue
        # diffusers reads both groups of a joint (image + text) attention, or neither
        wanted = GROUPS if getattr(module, "added_kv_proj_dim", None) is not None else GROUPS[:1]
        groups = [(attr, [getattr(module, name, None) for name in names]) for attr, names in wanted]
        if not all(all(x is not None for x in layers) and fusable(layers) for _, layers in groups):
            continue
        for attr, layers in groups:
            setattr(module, attr, FusedProjection(layers, up_add, triton))
            n += 1
        module.fused_projections = True
    return n
