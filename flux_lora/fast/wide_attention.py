"""The VAE encoder's mid-block attention as plain matmuls, for heads wider than fused kernels take.

FLUX's VAEs attend once, over every latent pixel, with one head of 512 channels: 16,384 tokens an
image at 1024 px. Flash and cuDNN attention take at most 256 channels a head, so SDPA falls back
to its memory-efficient kernel, 3.8 ms an image on an H200 (12% of preprocess's GPU time). Here
the scores are one TF32 matmul of the bf16 values (exact products, fp32 sums), the softmax runs in
fp32 and the probabilities multiply the values in TF32 again: about half the time by arithmetic,
and nearer an fp32 reference than the bf16 kernel. Queries go in chunks so the fp32 scores stay
within SCORE_ELEMENTS (512 MiB with the softmax's output), whatever the batch and image size; the
mid-block runs at the VAE's smallest resolution, after its largest activations are freed.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

SCORE_ELEMENTS = 2 ** 26  # fp32 scores of one query chunk: 256 MiB
FUSED_MAX_HEAD_DIM = 256  # the widest head flash and cuDNN attention take


@torch.compiler.disable  # eager: a chunk loop over symbolic sizes would recompile per image size
def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale) v for [B, H, N, D] inputs, in fp32 (TF32 where allowed), an image at
    a time and its queries in chunks of at most SCORE_ELEMENTS scores; the result in q's dtype."""
    rows = max(1, SCORE_ELEMENTS // (q.shape[1] * k.shape[-2]))
    out = torch.empty_like(q)
    for i in range(q.shape[0]):  # an image at a time: its keys and values in fp32, not the batch's
        k32, v32 = k[i].float().transpose(-1, -2), v[i].float()
        for start in range(0, q.shape[-2], rows):
            q32 = q[i, :, start:start + rows].float()
            # the scale in the matmul's epilogue: no extra pass over the scores
            scores = torch.baddbmm(q32.new_empty(()).expand(q32.shape[0], q32.shape[1], k32.shape[-1]), q32, k32,
                                   beta=0, alpha=scale)
            out[i, :, start:start + rows] = torch.bmm(scores.softmax(dim=-1), v32)
    return out


class WideHeadAttention(AttnProcessor2_0):
    """diffusers' self-attention over an image ([B, C, H, W] in, as AttnProcessor2_0 computes it)
    through `chunked_attention`; masked, cross or spatially normed calls stay with the parent."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if (encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None
                or hidden_states.ndim != 4 or attn.norm_q is not None or attn.norm_k is not None):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        heads = [t.view(b, h * w, attn.heads, -1).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x))]
        # AttnProcessor2_0 leaves the scale to SDPA, i.e. 1/sqrt(head dim)
        out = chunked_attention(*heads, scale=heads[0].shape[-1] ** -0.5)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, h * w, -1)))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def use_for_wide_heads(module: torch.nn.Module) -> int:
    """Give every diffusers Attention in `module` whose heads are wider than the fused kernels take
    a WideHeadAttention; returns how many it changed."""
    changed = 0
    for sub in module.modules():
        if isinstance(sub, Attention) and sub.inner_dim // sub.heads > FUSED_MAX_HEAD_DIM \
                and isinstance(sub.processor, AttnProcessor2_0):
            sub.set_processor(WideHeadAttention())
            changed += 1
    return changed
