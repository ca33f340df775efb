"""FLUX.1's single block with its four input projections as one matmul.

q, k, v and the MLP's first layer (proj_mlp) all read the same normed stream; FLUX.1's own
checkpoint stores them as one layer (`linear1`). As one flux_lora.fast.fused_qkv group,
[W_q; W_k; W_v; W_mlp] (21,504 outputs for FLUX.1-dev), a single block's forward quantizes its
input once instead of twice (fp8 base), runs one LoRA-down over it instead of two, and its backward
gets the input gradient from one matmul over all four instead of two summed, and the LoRA-down's
gradients from one read of the input instead of two. Measured at 512 px, batch 4 on an H200: +0.6%
samples/s with the bf16 base; none with fp8, whose backward quantizes the four members' gradients
with one scale per row, a kernel of its own that the MLP's gradient no longer fuses into
(bench/README.md, session 20).

diffusers' block calls proj_mlp and then its attention, whose processor projects q/k/v itself, so
the grouped block has its own forward: the same maths in the same order as diffusers'
FluxSingleTransformerBlock with FluxAttnProcessor (tests/test_single_block.py compares them).
Anything else (joint_attention_kwargs, another processor) runs diffusers' forward, whose
projections are views of the group's weights.
"""

from __future__ import annotations

import functools

import torch

from flux_lora.fast import fused_qkv, qk_rope

MEMBERS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
ENABLED = True  # with train.fuse_qkv; scripts/bench.py --compare-single-group toggles it


def _member(block, name: str):
    owner = block
    for part in name.split("."):
        owner = getattr(owner, part, None)
    return owner


@functools.cache
def _grouped_class() -> type:
    """diffusers' FluxSingleTransformerBlock with the grouped forward (a subclass: isinstance
    checks, keys and export unchanged)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        if joint_attention_kwargs:
            return FluxSingleTransformerBlock.forward(self, hidden_states, encoder_hidden_states, temb,
                                                      image_rotary_emb, joint_attention_kwargs)
        attn = self.attn
        text_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        residual = hidden_states
        norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
        query, key, value, mlp = self.to_qkv_mlp(norm_hidden_states).split(self.to_qkv_mlp.split_sizes, dim=-1)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        if image_rotary_emb is not None and qk_rope.applies(attn.norm_q, query, image_rotary_emb) \
                and qk_rope.applies(attn.norm_k, key, image_rotary_emb):
            query = qk_rope.norm_rope(attn.norm_q, query, image_rotary_emb)
            key = qk_rope.norm_rope(attn.norm_k, key, image_rotary_emb)
        else:
            query, key = attn.norm_q(query), attn.norm_k(key)
            if image_rotary_emb is not None:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        attn_output = dispatch_attention_fn(query, key, value, attn_mask=None, backend=attn.processor._attention_backend,
                                            parallel_config=attn.processor._parallel_config)
        attn_output = attn_output.flatten(2, 3).to(query.dtype)
        hidden_states = torch.cat([attn_output, self.act_mlp(mlp)], dim=2)
        hidden_states = residual + gate.unsqueeze(1) * self.proj_out(hidden_states)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :text_len], hidden_states[:, text_len:]

    cls = type("Grouped" + FluxSingleTransformerBlock.__name__, (FluxSingleTransformerBlock,),
               {"forward": forward, "__module__": __name__})
    globals()[cls.__name__] = cls  # findable by name: a pickled model loads
    return cls


def groupable(block) -> bool:
    """A diffusers FluxSingleTransformerBlock with diffusers' own FluxAttnProcessor, whose four
    input projections fused_qkv can group (same input size and base kind, LoRA on all or none)."""
    if type(block).__name__ != "FluxSingleTransformerBlock" or getattr(block.attn, "fused_projections", True):
        return False
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxSingleTransformerBlock

    members = [_member(block, name) for name in MEMBERS]
    return (type(block) is FluxSingleTransformerBlock and type(block.attn.processor) is FluxAttnProcessor
            and all(m is not None for m in members) and fused_qkv.fusable(members))


def group(model: torch.nn.Module, up_add: bool = False, triton: bool = False) -> int:
    """Give every groupable FLUX.1 single block of the model the one-matmul input projection
    (`to_qkv_mlp`) and the forward that uses it. Returns how many blocks."""
    if not ENABLED:
        return 0
    n = 0
    for block in list(model.modules()):
        if groupable(block):
            block.to_qkv_mlp = fused_qkv.FusedProjection([_member(block, name) for name in MEMBERS], up_add, triton)
            block.__class__ = _grouped_class()
            n += 1
    return n
