"""Encoders for the cache: VAE latents and CLIP/T5 prompt embeddings, batched.

Latents use the posterior mean, then FLUX's own normalisation `(mean - shift_factor) * scaling_factor`,
the inverse of what `FluxPipeline` does before decoding. The mean (not a sample) keeps the cache
deterministic; the VAE's posterior std is tiny next to the training noise.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """pixels [B, 3, H, W] in [-1, 1] -> normalised latents [B, C, H/8, W/8] (float32, CPU)."""
    x = pixels.to(device=vae.device, dtype=vae.dtype)
    mean = vae.encode(x).latent_dist.mean
    shift = vae.config.shift_factor or 0.0
    scale = vae.config.scaling_factor
    return ((mean.float() - shift) * scale).cpu()


@torch.no_grad()
def encode_prompts(text_pipe, prompts: list[str], max_sequence_length: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP pooled [B, 768] and T5 sequence [B, L, 4096], from diffusers' own encode_prompt."""
    t5, pooled, _ = text_pipe.encode_prompt(prompt=prompts, prompt_2=prompts, device=device,
                                            num_images_per_prompt=1, max_sequence_length=max_sequence_length)
    return pooled.cpu(), t5.cpu()
