"""The optimizer over the LoRA parameters and its learning-rate schedule."""

from __future__ import annotations

import math

import torch

from flux_lora.training import lora


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """Multiplier of the base LR at `step`: linear warm-up, then constant or cosine to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def make_optimizer(model, train_cfg, device: torch.device):
    """AdamW (fused on CUDA); LoRA B matrices may get a larger LR (LoRA+). Returns (opt, sched)."""
    params = lora.lora_parameters(model)
    a_params = [p for n, p in params if "lora_B" not in n]
    b_params = [p for n, p in params if "lora_B" in n]
    groups = [{"params": a_params, "lr": train_cfg.lr}, {"params": b_params, "lr": train_cfg.lr * train_cfg.lr_b_factor}]
    opt = torch.optim.AdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, betas=(0.9, 0.999),
                            **({"fused": True} if device.type == "cuda" else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, train_cfg.warmup_steps, train_cfg.schedule, train_cfg.steps))
    return opt, sched
