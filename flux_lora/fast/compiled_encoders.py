"""torch.compile for preprocess's encoders: the VAE's encoder (every family) and FLUX.1's T5-XXL
encoder stack. On one H200 at 1024 px, batch 8 (scripts/encoder_speed.py): the VAE encoder 47.7 ->
18.8 ms an image, T5-XXL at 512 tokens 26.0 -> 17.2 ms (GroupNorm/SiLU and T5's norms and
activations fused into their neighbours), both nearer an fp32 copy's output than eager bf16 is.
A new image size or a short last batch compiles once more (then those sizes are symbolic), so a
dataset of many buckets costs two compiles, not one per bucket. The compiles cost ~20 s on a
fresh machine, which ~1,000 images at 1024 px win back: `auto` compiles from that many items."""

from __future__ import annotations

import torch


AUTO_MIN_ITEMS = 1000  # a rank's items to encode before `auto` compiles (the compile's break-even)


def use_compile(setting: str, device: torch.device, items: int) -> bool:
    """preprocess.compile: on; off; auto compiles on CUDA when this rank has at least
    AUTO_MIN_ITEMS items to encode."""
    return setting == "on" or (setting == "auto" and device.type == "cuda" and items >= AUTO_MIN_ITEMS)


def compile_encoders(vae, text_pipe) -> list[str]:
    """Compile in place what is worth it; returns the names of the parts compiled. A text encoder
    streamed from host memory (placement's offload hooks) stays eager."""
    compiled = []
    encoder = getattr(vae, "encoder", None)
    if encoder is not None:
        encoder.forward = torch.compile(encoder.forward, dynamic=None)
        compiled.append("vae.encoder")
    t5 = getattr(text_pipe, "text_encoder_2", None) if text_pipe is not None else None
    stack = getattr(t5, "encoder", None)
    if stack is not None and getattr(t5, "_hf_hook", None) is None:  # accelerate's offload hook: streamed
        stack.forward = torch.compile(stack.forward, dynamic=None)
        compiled.append("t5.encoder")
    return compiled
