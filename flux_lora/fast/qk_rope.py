"""FLUX.1's query/key RMSNorm and rotary embedding as one op: one read of q (or k) and one write,
token by token, in the layout flux_lora.fast.attention takes.

Per head, diffusers' FluxAttention computes `apply_rotary_emb(norm_q(q), (cos, sin))`: torch's
RMSNorm over the head dim (rounded to the activation dtype), then (y·cos + rot(y)·sin) in fp32,
with rot(y) = (-y₁, y₀, -y₃, y₂, ...); a double block first joins the text's and the image's
tokens (each normed by its own weight) into one sequence. Inductor fuses that maths into kernels
that run at ~1.1-1.4 TB/s on an H200 at 512 px, batch 4 (6.2 ms of a step for the single blocks'
alone). Here a Triton kernel reads one head of one token
per row, from either part, and writes the joined sequence as a contiguous [B, S, H, D] (the layout
the attention op takes and answers in), rows in the order it reads them: ~2.6 TB/s in the step with
16 rows and 2 warps a program (`TILE`; its first tile, 32 and 4, ran at 1.2: bench/README.md,
session 22). The backward is the same maths' gradient in torch ops (with the forward's 1/rms),
which inductor fuses as before.

FLUX.1's grouped single block (fast/single_block.py) calls `norm_rope`; `install` gives double
blocks' attention a processor that does. Both apply where diffusers' path is torch's RMSNorm (frozen
weight) and the real-valued, interleaved rotary embedding (`applies`); on a CPU the op's forward is
the same maths in torch.
"""

from __future__ import annotations

import functools

import torch

from flux_lora.fast import lora_kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without triton
    triton = None

ENABLED = True  # scripts/bench.py --compare-qk-rope toggles it


def applies(norm, x: torch.Tensor, rotary, tokens: int | None = None) -> bool:
    """Whether the op computes `apply_rotary_emb(norm(x), rotary, sequence_dim=1)` for x [B, S, H, D]
    (`tokens`: the joined sequence's length, where x is one part of it)."""
    return (ENABLED and type(norm) is torch.nn.RMSNorm and norm.weight is not None and not norm.weight.requires_grad
            and tuple(norm.normalized_shape) == (x.shape[-1],) and isinstance(rotary, tuple) and len(rotary) == 2
            and x.dim() == 4 and x.shape[-1] % 2 == 0
            and tuple(rotary[0].shape) == (tokens or x.shape[1], x.shape[-1]))


def _rotate(y: torch.Tensor) -> torch.Tensor:
    """(-y₁, y₀, -y₃, y₂, ...) over the last dim (diffusers' use_real_unbind_dim=-1)."""
    pairs = y.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def _rotate_adjoint(g: torch.Tensor) -> torch.Tensor:
    """The transpose of _rotate: (g₁, -g₀, g₃, -g₂, ...)."""
    pairs = g.unflatten(-1, (-1, 2))
    return torch.stack([pairs[..., 1], -pairs[..., 0]], dim=-1).flatten(-2)


def _wide(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32 as diffusers' rope (fp64 stays: gradcheck)


# Rows (one head of one token each) a program, warps: chosen by `python scripts/qk_rope_speed.py`
# on an H200 at FLUX.1's shapes (bench/README.md, session 22).
TILE = dict(rows=16, warps=2)

if triton is not None:

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, x2_ptr, w2_ptr, cos_ptr, sin_ptr, out_ptr, rstd_ptr, R, H, S, S1,
                        sxb, sxs, sxh, s2b, s2s, s2h, eps, D: tl.constexpr, BR: tl.constexpr):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)  # row = (b·S + s)·H + h: one head of one token
        ok = rows < R
        h = (rows % H).to(tl.int64)
        s = ((rows // H) % S).to(tl.int64)
        b = (rows // (H * S)).to(tl.int64)
        first = s < S1  # tokens [0, S1) come from x, the rest from x2
        d = tl.arange(0, D)
        x = tl.load(x_ptr + (b * sxb + s * sxs + h * sxh)[:, None] + d[None, :], mask=(ok & first)[:, None], other=0.0)
        x2 = tl.load(x2_ptr + (b * s2b + (s - S1) * s2s + h * s2h)[:, None] + d[None, :],
                     mask=(ok & ~first)[:, None], other=0.0)
        x = tl.where(first[:, None], x, x2).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        tl.store(rstd_ptr + rows, rstd, mask=ok)
        w = tl.where(first[:, None], tl.load(w_ptr + d)[None, :], tl.load(w2_ptr + d)[None, :]).to(tl.float32)
        y = (x * rstd[:, None] * w).to(out_ptr.dtype.element_ty).to(tl.float32)  # the norm's rounding
        even, odd = tl.split(tl.reshape(y, (BR, D // 2, 2)))
        rotated = tl.reshape(tl.join(-odd, even), (BR, D))
        c = tl.load(cos_ptr + s[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        sn = tl.load(sin_ptr + s[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        # [B, S, H, D] memory: the rows in the order they were read
        tl.store(out_ptr + rows[:, None] * D + d[None, :], (y * c + rotated * sn).to(out_ptr.dtype.element_ty),
                 mask=ok[:, None])


def launch(x, weight, x2, weight2, eps, cos, sin, out, rstd, rows: int, warps: int) -> None:
    """The Triton forward into out [B, S, H, D] and rstd [B, S, H] (scripts/qk_rope_speed.py times
    the tile choices)."""
    y, w2 = (x2, weight2) if x2 is not None else (x, weight)
    b, s1, h, d = x.shape
    s = out.shape[1]
    _forward_kernel[(triton.cdiv(b * s * h, rows),)](
        x, weight, y, w2, cos, sin, out, rstd, b * s * h, h, s, s1 if x2 is not None else s, *x.stride()[:3],
        *y.stride()[:3], float(eps), D=d, BR=rows, num_warps=warps)


def _reference(x, weight, eps, cos, sin):
    """The op's maths in torch for one part: rope(rms_norm(x)) in the wide dtype, and 1/rms."""
    xf = x.to(_wide(x))
    y = torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps).to(xf.dtype)
    return y * cos[:, None] + _rotate(y) * sin[:, None], torch.rsqrt(xf.square().mean(-1) + eps)


@torch.library.custom_op("flux_lora::qk_norm_rope", mutates_args=())
def _forward(x: torch.Tensor, weight: torch.Tensor, x2: torch.Tensor | None, weight2: torch.Tensor | None, eps: float,
             cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, S1, H, D] (then x2 [B, S2, H, D], normed by weight2) -> (rope(rms_norm(...)) of the joined
    sequence, a contiguous [B, S, H, D]; the norm's 1/rms [B, S, H] fp32)."""
    parts = [(x, weight)] + ([(x2, weight2)] if x2 is not None else [])
    b, s1, h, d = x.shape
    s = s1 + (x2.shape[1] if x2 is not None else 0)
    out = torch.empty((b, s, h, d), device=x.device, dtype=x.dtype)
    rstd = torch.empty((b, s, h), device=x.device, dtype=torch.float32)
    if triton is not None and all(lora_kernels.available(t) and t.stride(-1) == 1 for t, _ in parts) and d & (d - 1) == 0:
        launch(x, weight, x2, weight2, eps, cos.float().contiguous(), sin.float().contiguous(), out, rstd, **TILE)
        return out, rstd
    start = 0
    for t, w in parts:
        n = t.shape[1]
        value, rstd[:, start:start + n] = _reference(t, w, eps, cos[start:start + n], sin[start:start + n])
        out[:, start:start + n] = value
        start += n
    return out, rstd


@_forward.register_fake
def _(x, weight, x2, weight2, eps, cos, sin):
    b, s, h, d = x.shape
    s += x2.shape[1] if x2 is not None else 0
    return x.new_empty((b, s, h, d)), x.new_empty((b, s, h), dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, weight, x2, weight2, eps, cos, sin = inputs
    ctx.save_for_backward(x, weight, x2, weight2, cos, sin, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for 1/rms


def _part_grad(x, weight, rstd, dout, cos, sin):
    """d/dx of rope(rms_norm(x)) against dout, for one part (its rows of rstd, cos and sin)."""
    xf = x.to(_wide(x))
    rstd = rstd.unsqueeze(-1).to(xf.dtype)
    x_hat = xf * rstd
    g = dout.to(xf.dtype)
    dy = g * cos[:, None] + _rotate_adjoint(g * sin[:, None])
    dx_hat = dy * weight.to(xf.dtype)
    return (rstd * (dx_hat - x_hat * (dx_hat * x_hat).mean(-1, keepdim=True))).to(x.dtype)


def _backward(ctx, dout, _drstd):
    """The gradient in torch ops (traced: inductor fuses it as it fused diffusers' version)."""
    if dout is None:
        return None, None, None, None, None, None, None
    x, weight, x2, weight2, cos, sin, rstd = ctx.saved_tensors
    n = x.shape[1]
    dx = _part_grad(x, weight, rstd[:, :n], dout[:, :n], cos[:n], sin[:n])
    dx2 = None if x2 is None else _part_grad(x2, weight2, rstd[:, n:], dout[:, n:], cos[n:], sin[n:])
    return dx, None, dx2, None, None, None, None


_forward.register_autograd(_backward, setup_context=_setup)


def norm_rope(norm: torch.nn.RMSNorm, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
              norm2: torch.nn.RMSNorm | None = None, x2: torch.Tensor | None = None) -> torch.Tensor:
    """apply_rotary_emb(cat([norm(x), norm2(x2)], dim=1), rotary, sequence_dim=1) for x, x2
    [B, S, H, D] (x2 optional), as one op (check `applies` first)."""
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    weight2 = norm2.weight.to(x.dtype) if x2 is not None else None
    return _forward(x, norm.weight.to(x.dtype), x2, weight2, eps, rotary[0], rotary[1])[0]


@functools.cache
def _joint_processor_class() -> type:
    """diffusers' FluxAttnProcessor whose double-block call norms, joins and rotates q and k with
    the op (a subclass: the same backend, parallel config and pickling)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

    def call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None or encoder_hidden_states is None or attn.added_kv_proj_dim is None:
            return FluxAttnProcessor.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask,
                                              image_rotary_emb)
        q, k, v, eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim))
                               for t in _get_qkv_projections(attn, hidden_states, encoder_hidden_states))
        tokens = hidden_states.shape[1] + encoder_hidden_states.shape[1]
        if attn.norm_q.eps != attn.norm_added_q.eps or attn.norm_k.eps != attn.norm_added_k.eps or not all(
                applies(norm, t, image_rotary_emb, tokens) for norm, t in
                ((attn.norm_q, q), (attn.norm_k, k), (attn.norm_added_q, eq), (attn.norm_added_k, ek))):
            return FluxAttnProcessor.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask,
                                              image_rotary_emb)
        query = norm_rope(attn.norm_added_q, eq, image_rotary_emb, attn.norm_q, q)  # the text first, as diffusers
        key = norm_rope(attn.norm_added_k, ek, image_rotary_emb, attn.norm_k, k)
        out = dispatch_attention_fn(query, key, torch.cat([ev, v], dim=1), attn_mask=None, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        encoder_out, out = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(encoder_out.contiguous())

    cls = type("JointNormRope" + FluxAttnProcessor.__name__, (FluxAttnProcessor,),
               {"__call__": call, "__module__": __name__})
    globals()[cls.__name__] = cls  # findable by name: a pickled model loads
    return cls


def install(model: torch.nn.Module) -> int:
    """Give every attention layer of a FLUX.1 double block that runs diffusers' own FluxAttnProcessor
    the processor that calls the op; returns how many."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    n = 0
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if type(processor) is FluxAttnProcessor and getattr(module, "added_kv_proj_dim", None) is not None:
            processor.__class__ = _joint_processor_class()
            n += 1
    return n
