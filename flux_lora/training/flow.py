"""The rectified-flow objective as FLUX is trained, in pure tensor functions.

    x_t = (1 - t)·x0 + t·ε,   v_target = ε - x0,   loss = ‖v_θ(x_t, t, text) - v_target‖²
(Esser et al. 2024, "Scaling Rectified Flow Transformers", eqs. 1-3; t = 1 is pure noise, as in
diffusers' FlowMatchEulerDiscreteScheduler.) Latents are packed into 2×2 patches with the
position ids FluxPipeline builds; text ids are all zero, as at inference.
"""

from __future__ import annotations

import math

import torch

MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates consecutive seeds


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], as FluxPipeline._pack_latents."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (h/2)(w/2), 4C] -> [B, C, h, w] with h, w in latent pixels (inverse of pack_latents)."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[(h/2)(w/2), 3] ids (0, row, col) for a latent of h×w, as FluxPipeline._prepare_latent_image_ids."""
    rows = torch.arange(h // 2, device=device, dtype=dtype)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device, dtype=dtype)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[L, 3] zeros: FLUX gives every text token the same position (0, 0, 0) at inference."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


def sample_seed(seed: int, step: int, index: int) -> int:
    """A seed for one sample from (run seed, optimizer step, position in the global batch): noise
    and timesteps then do not depend on how many ranks share the batch."""
    x = (seed * 1_000_003 + step) * MIX + index * 0xBF58476D1CE4E5B9
    return x % (2**63 - 1)


def flux_shift_mu(seq_len: int, base_len: int = 256, max_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift (diffusers `calculate_shift`): more noise for bigger images."""
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + base_shift - m * base_len


def shift_timesteps(t: torch.Tensor, mu: float) -> torch.Tensor:
    """t' = e^μ / (e^μ + 1/t - 1), the time shift FluxPipeline's scheduler applies."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def sample_noise_and_t(shape: tuple, seed: int, step: int, positions: list[int], kind: str,
                       mean: float, std: float, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample noise [B, *shape] and t [B] in (0, 1), each from its own seeded generator."""
    noises, us = [], []
    gen = torch.Generator(device=device)
    for j in positions:
        gen.manual_seed(sample_seed(seed, step, j))
        us.append(torch.randn(1, generator=gen, device=device) if kind != "uniform"
                  else torch.rand(1, generator=gen, device=device))
        noises.append(torch.randn(shape, generator=gen, device=device))
    u = torch.cat(us)
    if kind == "uniform":
        t = u
    else:
        t = torch.sigmoid(u * std + mean)  # logit-normal (SD3 §3.1)
        if kind == "flux-shift":
            t = shift_timesteps(t, flux_shift_mu(seq_len))
    return torch.stack(noises), t.clamp(1e-5, 1 - 1e-5)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t)·x0 + t·ε, t broadcast over [B, ...]."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32 (bf16 predictions would quantise small errors away)."""
    return torch.nn.functional.mse_loss(pred.float(), target.float())
