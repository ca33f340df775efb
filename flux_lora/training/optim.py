"""The optimizer over the LoRA parameters and its learning-rate schedule.

    adamw               torch's AdamW (fused on CUDA): the default
    adamw8bit           bitsandbytes' AdamW8bit: 8-bit moments, a quarter of AdamW's state (CUDA)
    prodigy             prodigyopt's Prodigy: estimates its own step size (train.lr scales it; 1.0 is usual)
    adamw-schedulefree  schedulefree's AdamWScheduleFree: no decay schedule; exports and evaluations
                        use its averaged weights (averaged_weights)
Schedules after the linear warm-up: constant, cosine or linear to zero at train.steps. Every
optimizer's state is in the checkpoint (exact resume)."""

from __future__ import annotations

import contextlib
import math

import torch

from flux_lora.errors import ConfigError
from flux_lora.training import lora

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adamw-schedulefree")
SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """Multiplier of the base LR at `step`: linear warm-up, then constant, cosine or linear to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


def check_choice(train_cfg, device: torch.device, sharded: bool) -> None:
    """One line for an optimizer this machine or setting cannot run."""
    name = train_cfg.optimizer
    if name == "adamw":
        return
    if sharded:
        raise ConfigError(f"train.optimizer={name} does not run on FSDP2's sharded LoRA here; use "
                          "dist.fsdp_lora=replicated (the LoRA whole on every rank), train.optimizer=adamw, or sharding=ddp")
    if name == "adamw8bit" and device.type != "cuda":
        raise ConfigError("train.optimizer=adamw8bit needs a CUDA GPU (bitsandbytes); use adamw on the CPU")
    if name == "adamw-schedulefree" and train_cfg.schedule != "constant":
        raise ConfigError(f"train.optimizer=adamw-schedulefree replaces the LR schedule; train.schedule="
                          f"{train_cfg.schedule} does not combine with it: use schedule=constant (warm-up still applies)")


def _import(module: str, package: str, name: str):
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"train.optimizer={name} needs {package}: pip install {package}") from None


def lora_groups(names: list[str]) -> tuple[list[str], list[str]]:
    """The optimizer's two parameter groups, in its order: the LoRA A matrices (and anything else
    trained, e.g. DoRA's magnitudes), then the B matrices (which LoRA+ gives a larger LR)."""
    return [n for n in names if "lora_B" not in n], [n for n in names if "lora_B" in n]


def make_optimizer(model, train_cfg, device: torch.device):
    """The chosen optimizer over the LoRA; LoRA B matrices may get a larger LR (LoRA+). Returns
    (opt, sched)."""
    params = dict(lora.lora_parameters(model))
    a_names, b_names = lora_groups(list(params))
    a_params, b_params = [params[n] for n in a_names], [params[n] for n in b_names]
    lr = train_cfg.lr
    groups = [{"params": a_params, "lr": lr}, {"params": b_params, "lr": lr * train_cfg.lr_b_factor}]
    common = {"lr": lr, "weight_decay": train_cfg.weight_decay, "betas": (0.9, 0.999)}
    name = train_cfg.optimizer
    warmup, schedule = train_cfg.warmup_steps, train_cfg.schedule
    if name == "adamw":
        opt = torch.optim.AdamW(groups, **common, **({"fused": True} if device.type == "cuda" else {}))
    elif name == "adamw8bit":
        opt = _import("bitsandbytes", "bitsandbytes", name).optim.AdamW8bit(groups, **common)
    elif name == "prodigy":
        prodigy = _import("prodigyopt", "prodigyopt", name)
        opt = prodigy.Prodigy(groups, **common, use_bias_correction=True, safeguard_warmup=warmup > 0)
    else:
        opt = _import("schedulefree", "schedulefree", name).AdamWScheduleFree(groups, **common, warmup_steps=warmup)
        opt.train()
        warmup = 0  # it warms up itself
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup, schedule, train_cfg.steps))
    return opt, sched


@contextlib.contextmanager
def averaged_weights(opt):
    """Inside, the model holds the weights to evaluate and export: a schedule-free optimizer's
    average (it trains on another point); every other optimizer's weights as they are."""
    if not hasattr(opt, "eval") or not hasattr(opt, "train"):
        yield
        return
    depth = getattr(opt, "flux_lora_averaged", 0)  # nested (an export inside an evaluation): switch once
    params = [p for group in opt.param_groups for p in group["params"]]
    if not depth:
        with torch.no_grad():
            kept = [p.detach().clone() for p in params]
        opt.eval()
    opt.flux_lora_averaged = depth + 1
    try:
        yield
    finally:
        opt.flux_lora_averaged = depth
        if not depth:
            opt.train()
            with torch.no_grad():  # the trained point exactly: train() would recompute it with rounding
                for p, k in zip(params, kept):
                    p.copy_(k)
