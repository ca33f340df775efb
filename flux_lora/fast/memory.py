"""Memory of a training step: the estimate that decides gradient checkpointing (fast mode), and
the GPU's size. Calibrated against measured peaks in bench/results (tests/test_memory.py)."""

from __future__ import annotations

import torch

from flux_lora.models.loading import transformer_blocks


# Activations a FLUX block keeps for the backward without checkpointing, per token and per unit
# of hidden size: 6.1 MiB per token for FLUX.1 (57 blocks × 3072) in bench/results, bf16 or fp8 base.
ACTIVATION_BYTES_PER_TOKEN_BLOCK_DIM = 37
HEADROOM = 0.9  # of the GPU's memory: the allocator's fragmentation and cuBLAS/compile workspaces


def step_memory_bytes(weight_bytes: int, trainable_params: int, tokens: int, blocks: int, hidden: int) -> int:
    """Estimated peak of a training step without checkpointing: frozen weights, fp32 LoRA with
    its gradient and two AdamW moments (16 bytes/param), and the activations of `tokens` tokens
    (a micro-batch's image + text tokens)."""
    return weight_bytes + 16 * trainable_params + ACTIVATION_BYTES_PER_TOKEN_BLOCK_DIM * tokens * blocks * hidden


def model_sizes(model) -> tuple[int, int, int, int]:
    """(frozen weight bytes, trainable params, blocks, hidden size) of a LoRA-wrapped transformer."""
    # by storage: a q/k/v group's concatenated weight and its members' views are one allocation
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(model.parameters()) + list(model.buffers()) if not t.requires_grad}
    frozen = sum(storages.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    conf = model.config
    return frozen, trainable, len(transformer_blocks(model)), conf.num_attention_heads * conf.attention_head_dim


def use_checkpointing(train_cfg, model=None, max_tokens: int = 0, gpu_bytes: int = 0) -> tuple[bool, str]:
    """auto: on for the fp8/nf4 modes (memory first); in the fast mode only when the largest
    micro-batch (max_tokens) would not fit a GPU of gpu_bytes without it. Returns (on, why)."""
    if train_cfg.gradient_checkpointing != "auto":
        return train_cfg.gradient_checkpointing == "on", f"train.gradient_checkpointing={train_cfg.gradient_checkpointing}"
    if train_cfg.memory_mode != "fast":
        return True, f"memory_mode={train_cfg.memory_mode}"
    if model is None or not max_tokens or not gpu_bytes:
        return False, "auto"
    weights, trainable, blocks, hidden = model_sizes(model)
    need = step_memory_bytes(weights, trainable, max_tokens, blocks, hidden)
    if need > HEADROOM * gpu_bytes:
        return True, (f"auto: a step of {max_tokens} tokens needs ~{need / 2**30:.0f} GiB without it, "
                      f"the GPU has {gpu_bytes / 2**30:.0f} GiB")
    return False, "auto"


def gpu_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
