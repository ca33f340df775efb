"""Fused attention behind one opaque custom op, so torch.compile cannot change what the kernel sees.

On CUDA the op runs cuDNN's fused attention; on the CPU, ATen's flash kernel (so the op, its
backward and its fake implementation are tested without a GPU). cuDNN attention runs FLUX's
shapes ~1.8× faster than flash on H100, but reached through SDPA inside a compiled block its first
backward died with an illegal memory access (torch 2.11, 2026-11-26). torch caches cuDNN's backward
plan by q/k/v's shapes and strides only, not the output gradient's, which inductor lays out as it
likes; a plan built for one layout then runs on another. Here inductor sees a black box that hands
the kernels one of two layouts: [B, H, S, D] memory, or diffusers' own [B, S, H, D] (heads side by
side in a token's row; a token's row may sit inside a wider projection output, as v does), and the
output gradient always in the output's layout. [B, S, H, D] is what the FLUX blocks produce and
consume: no transposing copies around the op (bench/README.md, session 22).

`use(transformer)` routes diffusers' attention dispatch to the op for calls it supports (no mask,
no dropout, not causal); anything else falls back to SDPA.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count


def _token_rows(t: Tensor) -> bool:
    """Whether [B, H, S, D] t lies in [B, S, H, D] memory: a token's heads side by side."""
    return t.stride(3) == 1 and t.stride(1) == t.shape[3] and t.stride(2) >= t.shape[1] * t.shape[3] \
        and t.stride(0) >= t.shape[2] * t.stride(2)


def _dense(shape, like: Tensor, token_rows: bool) -> Tensor:
    """An empty [B, H, S, D] tensor in the op's layout."""
    b, h, s, d = shape
    if token_rows:
        return like.new_empty((b, s, h, d)).transpose(1, 2)
    return like.new_empty((b, h, s, d))


def _in_layout(t: Tensor, token_rows: bool, dense: bool = False) -> Tensor:
    """t as the kernels take it: in the op's layout, 16-byte aligned (a copy only where not)."""
    fits = _token_rows(t) if token_rows else t.is_contiguous()
    if fits and dense and token_rows:
        fits = t.stride(2) == t.shape[1] * t.shape[3] and t.stride(0) == t.shape[2] * t.stride(2)
    if fits and t.device.type == "cuda":
        fits = t.data_ptr() % 16 == 0 and all(x % 8 == 0 for x in t.stride()[:3])
    return t if fits else _dense(t.shape, t, token_rows).copy_(t)


def _as(t: Tensor, like: Tensor) -> Tensor:
    """t with like's strides (a copy only where they differ)."""
    return t if t.stride() == like.stride() else torch.empty_strided(like.shape, like.stride(), dtype=t.dtype,
                                                                      device=t.device).copy_(t)


@torch.library.custom_op("flux_lora::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(q kᵀ/√d) v for [B, H, S, D] inputs; returns (out [B, H, S, D] in q's layout (token
    rows if q has them, else contiguous), lse [B, H, S] fp32)."""
    rows = _token_rows(q)
    q, k, v = (_in_layout(t, rows) for t in (q, k, v))
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    return _in_layout(out, rows, dense=True), lse.reshape(q.shape[:3]).contiguous()


@attention.register_fake
def _(q, k, v):
    return _dense(q.shape, q, _token_rows(q)), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("flux_lora::attention_backward", mutates_args=())
def attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                       lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), each dense in the op's layout."""
    rows = _token_rows(q)
    q, k, v = (_in_layout(t, rows) for t in (q, k, v))
    out = _in_layout(out, rows, dense=True)
    grad = _as(grad, out)
    if q.device.type == "cuda":
        # no dropout: cuDNN reads neither the seed nor the offset, but the signature wants tensors
        unused = torch.zeros(1, dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse.unsqueeze(-1), unused, unused, None, None, None,
            q.shape[2], k.shape[2], 0.0, False)
    else:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, False)
    return tuple(_in_layout(t, rows, dense=True) for t in (dq, dk, dv))


@attention_backward.register_fake
def _(grad, q, k, v, out, lse):
    rows = _token_rows(q)
    return tuple(_dense(t.shape, t, rows) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    # laid out as the output here, in the traced graph: the copy fuses into the kernel that makes
    # grad_out, and cuDNN's cached backward plan sees the layout it was built for
    return attention_backward(_as(grad_out, out), q, k, v, out, lse)


attention.register_autograd(_backward, setup_context=_setup_context)


# FlopCounterMode (bench.py's MFU) sees an opaque op: give it SDPA's own counts
@register_flop_formula(torch.ops.flux_lora.attention)
def _attention_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


@register_flop_formula(torch.ops.flux_lora.attention_backward)
def _attention_backward_flops(grad_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


def supported(head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the op's CUDA kernel takes this model: cuDNN's fused attention on Hopper or newer,
    bf16/fp16, head dims it has kernels for."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
            and dtype in (torch.bfloat16, torch.float16) and head_dim in (64, 128))


def _diffusers_backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False, return_lse=False, _parallel_config=None):
    """diffusers' dispatch signature ([B, S, H, D] in and out)."""
    if attn_mask is not None or dropout_p or is_causal or scale is not None or enable_gqa or return_lse \
            or _parallel_config is not None or query.shape[2] != key.shape[2]:
        from diffusers.models.attention_dispatch import _native_attention

        return _native_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                 return_lse, _parallel_config)
    # diffusers' [B, S, H, D] as it is (flux_lora.fast.qk_rope writes q and k so; v is a view of
    # its projection); a layout the op does not take is copied here, where inductor folds the copy
    # into the kernel that produces it
    heads = [t.transpose(1, 2) for t in (query, key, value)]
    out, _ = attention(*(t if _token_rows(t) or t.is_contiguous() else t.transpose(1, 2).contiguous().transpose(1, 2)
                         for t in heads))
    return out.transpose(1, 2)


# what model.attention=auto runs under train.deterministic: at 512 px, batch 4 on an H200 11.64
# samples/s with flash's deterministic backward, 9.42 with the memory-efficient kernel's (cuDNN's,
# not deterministic: 13.66; bench/README.md, session 19)
DETERMINISTIC = "flash"

# diffusers names its cuDNN backend "_native_cudnn"; the op takes that name's place in its registry
BACKEND = "_native_cudnn"


def use(transformer) -> int:
    """Make every attention layer of this transformer call the op (other models keep theirs);
    returns how many layers now do."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    name = AttentionBackendName(BACKEND)
    _AttentionBackendRegistry.register(name)(_diffusers_backend)
    processors = [m.processor for m in transformer.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
    for p in processors:
        p._attention_backend = name
    return len(processors)


def in_use(transformer) -> bool:
    """Whether some attention layer of the transformer calls the op."""
    backends = (getattr(getattr(m, "processor", None), "_attention_backend", None) for m in transformer.modules())
    return any(getattr(b, "value", b) == BACKEND for b in backends)


def choose_backend(name: str, transformer, dtype: torch.dtype, device: torch.device, deterministic: bool = False) -> str:
    """Choose attention kernels deliberately; returns what the transformer's attention runs on.
    auto: the fused cuDNN op (flux_lora.attention) where supported (Hopper, bf16, head dim 64/128),
    else flash; cudnn: the op regardless. SDPA's own cuDNN path stays off: its backward crashes
    inside the compiled FLUX step on H100 with torch 2.11 (2026-11-26); the op calls the same
    kernels without that failure. `deterministic` (train.deterministic): auto is flash, whose
    backward has a deterministic mode; cuDNN's has none in torch."""
    chosen = name
    if deterministic and name == "auto":
        chosen = DETERMINISTIC
    elif name in ("auto", "cudnn"):
        head_dim = getattr(transformer.config, "attention_head_dim", 0)
        chosen = "cudnn" if name == "cudnn" or supported(head_dim, dtype, device) else "flash"
        if chosen == "cudnn":
            use(transformer)
    if torch.cuda.is_available() and name != "default":
        sdpa = "flash" if chosen == "cudnn" else chosen  # what the op's fallbacks and other models use
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_flash_sdp(sdpa == "flash")
        torch.backends.cuda.enable_mem_efficient_sdp(sdpa in ("flash", "efficient"))
        torch.backends.cuda.enable_math_sdp(True)
    tag_compile_caches()
    return chosen


def tag_compile_caches() -> None:
    """Make SDPA's backend switches and flux_lora's own op code part of torch.compile's cache keys.
    A compiled block calls SDPA, which picks its kernel when the graph is traced; the caches key on
    the traced graph and on torch's deterministic setting, not on these switches. So a run with
    model.attention=efficient after one with flash loaded flash's compiled blocks (measured on an
    H200: the same losses to the bit and an 11 s start; session 19). Likewise a custom op's
    backward (lora_linear's, qk_rope's) is traced into the cached backward graph but is not in the
    key: after an upgrade that changed it, a warm cache ran the old backward (session 24: an
    op schema mismatch at the first backward)."""
    import torch.compiler.config

    cuda = torch.backends.cuda
    switches = (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.cudnn_sdp_enabled(), cuda.math_sdp_enabled())
    own = os.environ.get("TORCH_COMPILER_CACHE_KEY_TAG", "")  # the user's tag, if any, stays in the key
    torch.compiler.config.cache_key_tag = (own + "|sdpa=" + "".join("1" if on else "0" for on in switches)
                                           + "|flux_lora=" + code_fingerprint())


@functools.cache
def code_fingerprint(folder: Path = Path(__file__).parent) -> str:
    """A hash of flux_lora/fast/*.py, the code that compiled blocks call into or trace."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
