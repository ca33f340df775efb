"""The rectified-flow objective as FLUX is trained, in pure tensor functions.

    x_t = (1 - t)·x0 + t·ε,   v_target = ε - x0,   loss = ‖v_θ(x_t, t, text) - v_target‖²
(Esser et al. 2024, "Scaling Rectified Flow Transformers", eqs. 1-3; t = 1 is pure noise, as in
diffusers' FlowMatchEulerDiscreteScheduler.) The same for every family; how latents become tokens
is the family's (models/families). FLUX.1's packing is re-exported here for scripts and tests.
"""

from __future__ import annotations

import math

import torch

from flux_lora.models.families.flux1 import image_ids, pack_latents, text_ids, unpack_latents  # noqa: F401

MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates consecutive seeds


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


def flow_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
              sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in fp32 (bf16 predictions would quantise small errors away). With a
    loss mask `weight` (shaped like pred, in [0, 1]): each sample's mask-weighted mean
    Σ w·(pred − target)² / Σ w, then the mean over samples, so a sample counts the same whatever
    its masked area, and the mean over a global batch does not depend on how ranks split it.
    `sample_weight` [B] scales each sample's term (regularization images: train.prior_loss_weight)."""
    if weight is None and sample_weight is None:
        return torch.nn.functional.mse_loss(pred.float(), target.float())
    squared = (pred.float() - target.float()).pow(2)
    dims = tuple(range(1, pred.dim()))
    per_sample = squared.mean(dims) if weight is None else \
        (squared * weight).sum(dims) / weight.sum(dims).clamp_min(1e-6)
    return (per_sample if sample_weight is None else per_sample * sample_weight).mean()


def loss_weight(mask: torch.Tensor | None, latent_shape: tuple, pack) -> torch.Tensor | None:
    """A batch's latent-size masks [B, h, w] as weights laid out like the packed prediction."""
    if mask is None:
        return None
    return pack(mask.float()[:, None].expand(latent_shape))
