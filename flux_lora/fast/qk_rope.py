"""FLUX's query/key RMSNorm and rotary embedding as one op: one read of q (or k) and one write, in
the layout attention takes.

Per head, diffusers' FluxAttention computes `apply_rotary_emb(norm_q(q), (cos, sin))`: torch's
RMSNorm over the head dim (rounded to the activation dtype), then (y·cos + rot(y)·sin) in fp32,
with rot(y) = (-y₁, y₀, -y₃, y₂, ...). Inductor fuses the same maths into one kernel, but at
FLUX.1's single-block shapes it runs at ~1.4 TB/s on an H200 (162 µs a call, 6.2 ms of a 512-px
step). The forward here is a Triton kernel over rows of one head each; the backward is the same
maths' gradient in torch ops, which inductor fuses with the kernels around it as before.

The op applies where diffusers' path is torch's RMSNorm (frozen weight) and the real-valued,
interleaved rotary embedding (`applies`); on a CPU the forward is the same maths in torch.
"""

from __future__ import annotations

import torch

from flux_lora.fast import lora_kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without triton
    triton = None

ENABLED = True  # scripts/bench.py --compare-qk-rope toggles it


def applies(norm, x: torch.Tensor, rotary) -> bool:
    """Whether the op computes `apply_rotary_emb(norm(x), rotary, sequence_dim=1)` for x [B, S, H, D]."""
    return (ENABLED and type(norm) is torch.nn.RMSNorm and norm.weight is not None and not norm.weight.requires_grad
            and tuple(norm.normalized_shape) == (x.shape[-1],) and isinstance(rotary, tuple) and len(rotary) == 2
            and x.dim() == 4 and x.shape[-1] % 2 == 0 and rotary[0].shape == (x.shape[1], x.shape[-1]))


def _rotate(y: torch.Tensor) -> torch.Tensor:
    """(-y₁, y₀, -y₃, y₂, ...) over the last dim (diffusers' use_real_unbind_dim=-1)."""
    pairs = y.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def _rotate_adjoint(g: torch.Tensor) -> torch.Tensor:
    """The transpose of _rotate: (g₁, -g₀, g₃, -g₂, ...)."""
    pairs = g.unflatten(-1, (-1, 2))
    return torch.stack([pairs[..., 1], -pairs[..., 0]], dim=-1).flatten(-2)


if triton is not None:

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rstd_ptr, R, H, S, sxb, sxs, sxh, eps,
                        D: tl.constexpr, BR: tl.constexpr):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)  # row = (b·S + s)·H + h: one head of one token
        ok = rows < R
        h = (rows % H).to(tl.int64)
        s = ((rows // H) % S).to(tl.int64)
        b = (rows // (H * S)).to(tl.int64)
        d = tl.arange(0, D)
        x = tl.load(x_ptr + (b * sxb + s * sxs + h * sxh)[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        tl.store(rstd_ptr + rows, rstd, mask=ok)
        w = tl.load(w_ptr + d).to(tl.float32)
        y = (x * rstd[:, None] * w[None, :]).to(out_ptr.dtype.element_ty).to(tl.float32)  # the norm's rounding
        even, odd = tl.split(tl.reshape(y, (BR, D // 2, 2)))
        rotated = tl.reshape(tl.join(-odd, even), (BR, D))
        c = tl.load(cos_ptr + s[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        sn = tl.load(sin_ptr + s[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        out_row = (b * H + h) * S + s  # [B, H, S, D] memory: the layout flux_lora.fast.attention takes
        tl.store(out_ptr + out_row[:, None] * D + d[None, :], (y * c + rotated * sn).to(out_ptr.dtype.element_ty),
                 mask=ok[:, None])


@torch.library.custom_op("flux_lora::qk_norm_rope", mutates_args=())
def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, S, H, D] (any strides, the last dim contiguous) -> (rope(rms_norm(x)) [B, S, H, D], laid
    out as a contiguous [B, H, S, D]; the norm's 1/rms [B, S, H] fp32, for the backward)."""
    b, s, h, d = x.shape
    rstd = torch.empty((b, s, h), device=x.device, dtype=torch.float32)
    out = torch.empty((b, h, s, d), device=x.device, dtype=x.dtype)
    if triton is not None and lora_kernels.available(x) and x.stride(-1) == 1 and d & (d - 1) == 0:
        block = 32
        _forward_kernel[(triton.cdiv(b * s * h, block),)](
            x, weight, cos.float().contiguous(), sin.float().contiguous(), out, rstd, b * s * h, h, s,
            x.stride(0), x.stride(1), x.stride(2), float(eps), D=d, BR=block, num_warps=4)
        return out.transpose(1, 2), rstd
    xf = x.to(_wide(x))
    rstd.copy_(torch.rsqrt(xf.square().mean(-1) + eps))
    y = torch.nn.functional.rms_norm(x, (d,), weight, eps).to(xf.dtype)
    out.copy_((y * cos[:, None] + _rotate(y) * sin[:, None]).transpose(1, 2))
    return out.transpose(1, 2), rstd


def _wide(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32 as diffusers' rope (fp64 stays: gradcheck)


@_forward.register_fake
def _(x, weight, eps, cos, sin):
    b, s, h, d = x.shape
    return x.new_empty((b, h, s, d)).transpose(1, 2), x.new_empty((b, s, h), dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, weight, eps, cos, sin = inputs
    ctx.save_for_backward(x, weight, cos, sin, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dout, _drstd):
    """The gradient in torch ops (traced: inductor fuses it as it fused diffusers' version)."""
    x, weight, cos, sin, rstd = ctx.saved_tensors
    xf = x.to(_wide(x))
    rstd = rstd.unsqueeze(-1).to(xf.dtype)
    x_hat = xf * rstd
    g = dout.to(xf.dtype)
    dy = g * cos[:, None] + _rotate_adjoint(g * sin[:, None])
    dx_hat = dy * weight.to(xf.dtype)
    dx = rstd * (dx_hat - x_hat * (dx_hat * x_hat).mean(-1, keepdim=True))
    return dx.to(x.dtype), None, None, None, None


_forward.register_autograd(_backward, setup_context=_setup)


def norm_rope(norm: torch.nn.RMSNorm, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """apply_rotary_emb(norm(x), rotary, sequence_dim=1) for x [B, S, H, D], as one op (`applies`)."""
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    return _forward(x, norm.weight.to(x.dtype), eps, rotary[0], rotary[1])[0]
