"""Memory of a training step: the estimate that decides gradient checkpointing (fast mode), and
the GPU's size. Calibrated against measured peaks in bench/results (tests/test_memory.py)."""

from __future__ import annotations

import os

import torch
import torch.utils.checkpoint

from flux_lora.models.loading import transformer_blocks


# Activations a FLUX block keeps for the backward without checkpointing, per token and per unit
# of hidden size: 6.1 MiB per token for FLUX.1 (57 blocks × 3072) in bench/results, bf16 or fp8 base.
ACTIVATION_BYTES_PER_TOKEN_BLOCK_DIM = 37
HEADROOM = 0.9  # of the GPU's memory: the allocator's fragmentation and cuBLAS/compile workspaces
# With checkpointing a block keeps only its input (the bf16 hidden states) for the backward, and
# one block at a time holds its full activations while it is recomputed: 2 bytes fit the measured
# fp8-mode peak at 1024 px (14.9 GiB) and FSDP2's with checkpointing (14.4 GiB).
CHECKPOINTED_BYTES_PER_TOKEN_BLOCK_DIM = 2
# FSDP2's blocks kept gathered are a speed option taken from memory left over: planned against a
# lower share of the GPU than HEADROOM, so an estimate 10% low still leaves the run room (each is
# counted at its whole size; kept whole under a replicated LoRA, its shard is freed too)
KEEP_GATHERED_HEADROOM = 0.8


ALL_BLOCKS = -1  # gradient checkpointing of every block, however many the model has


def checkpointed_count(checkpointing: bool | int, blocks: int) -> int:
    """Blocks that recompute their forward: True or ALL_BLOCKS is all of them, False none, a
    number that many."""
    if isinstance(checkpointing, bool):
        return blocks if checkpointing else 0
    return blocks if checkpointing < 0 else min(int(checkpointing), blocks)


def activation_bytes(tokens: int, blocks: int, hidden: int, checkpointing: bool | int = False) -> int:
    """What the backward keeps of a micro-batch of `tokens` tokens (image + text), with all, none
    or a number of the blocks checkpointed. A checkpointed block keeps its input; the others keep
    everything, and once the backward reaches the checkpointed ones those are freed, so one block
    recomputing its full activations only adds to the peak when every block is checkpointed."""
    k = checkpointed_count(checkpointing, blocks)
    full_blocks = max(blocks - k, 1) if k else blocks
    return tokens * hidden * (CHECKPOINTED_BYTES_PER_TOKEN_BLOCK_DIM * k + ACTIVATION_BYTES_PER_TOKEN_BLOCK_DIM * full_blocks)


def step_memory_bytes(weight_bytes: int, trainable_params: int, tokens: int, blocks: int, hidden: int,
                      checkpointing: bool | int = False) -> int:
    """Estimated peak of a DDP training step: frozen weights, fp32 LoRA with its gradient and two
    AdamW moments (16 bytes/param), and the activations of `tokens` tokens (a micro-batch's
    image + text tokens)."""
    return weight_bytes + 16 * trainable_params + activation_bytes(tokens, blocks, hidden, checkpointing)


def sharded_step_memory_bytes(weight_bytes: int, trainable_params: int, tokens: int, blocks: int, hidden: int,
                              largest_block_bytes: int, ranks: int, checkpointing: bool | int = False) -> int:
    """The same under FSDP2 over `ranks` GPUs: each holds 1/ranks of the weights, the LoRA and its
    optimizer state, plus two whole blocks at a time (the one computing and the next one being
    all-gathered), and its own micro-batch's activations."""
    return (weight_bytes + 16 * trainable_params) // ranks + 2 * largest_block_bytes + \
        activation_bytes(tokens, blocks, hidden, checkpointing)


def blocks_to_keep_gathered(free_bytes: int, block_sizes: list[int]) -> int:
    """How many blocks, counted from the last, fit whole (gathered) in free_bytes: FSDP2's
    blocks kept gathered between forward and backward, where memory is left over."""
    kept = 0
    for size in reversed(block_sizes):
        if size > free_bytes:
            break
        free_bytes -= size
        kept += 1
    return kept


def model_sizes(model) -> tuple[int, int, int, int]:
    """(frozen weight bytes, trainable params, blocks, hidden size) of a LoRA-wrapped transformer."""
    # by storage: a q/k/v group's concatenated weight and its members' views are one allocation
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(model.parameters()) + list(model.buffers()) if not t.requires_grad}
    frozen = sum(storages.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    conf = model.config
    return frozen, trainable, len(transformer_blocks(model)), conf.num_attention_heads * conf.attention_head_dim


def use_checkpointing(train_cfg, model=None, max_tokens: int = 0, gpu_bytes: int = 0, shards: int = 1) -> tuple[int, str]:
    """How many blocks (the first, in execution order) recompute their forward in the backward,
    and why. train.checkpoint_blocks=N: N. on: all. auto: all for the fp8/nf4 modes (memory
    first); in the fast mode as few as let the largest micro-batch (max_tokens) fit a GPU of
    gpu_bytes (the weights sharded over `shards` GPUs under FSDP2), none when it fits without."""
    if train_cfg.checkpoint_blocks > 0:
        return train_cfg.checkpoint_blocks, f"train.checkpoint_blocks={train_cfg.checkpoint_blocks}"
    if train_cfg.gradient_checkpointing != "auto":
        on = train_cfg.gradient_checkpointing == "on"
        return ALL_BLOCKS if on else 0, f"train.gradient_checkpointing={train_cfg.gradient_checkpointing}"
    if train_cfg.memory_mode != "fast":
        return ALL_BLOCKS, f"memory_mode={train_cfg.memory_mode}"
    if model is None or not max_tokens or not gpu_bytes:
        return 0, "auto"
    weights, trainable, blocks, hidden = model_sizes(model)
    largest = max(block_bytes(b) for b in transformer_blocks(model))

    def need(k: int) -> int:
        if shards > 1:
            return sharded_step_memory_bytes(weights, trainable, max_tokens, blocks, hidden, largest, shards, k)
        return step_memory_bytes(weights, trainable, max_tokens, blocks, hidden, k)

    if need(0) <= HEADROOM * gpu_bytes:
        return 0, "auto"
    k = next((k for k in range(1, blocks) if need(k) <= HEADROOM * gpu_bytes), ALL_BLOCKS)
    why = f"auto: a step of {max_tokens} tokens needs ~{need(0) / 2**30:.0f} GiB without it, the GPU has {gpu_bytes / 2**30:.0f} GiB"
    return k, why if k == ALL_BLOCKS else f"{why}; ~{need(k) / 2**30:.0f} GiB with these"


def fits_with(model, max_tokens: int, gpu_bytes: int, extra_bytes: int) -> bool:
    """Whether a step without checkpointing still fits the GPU with `extra_bytes` more kept (a
    speed option's memory, e.g. fp8.keep_transposed)."""
    if not max_tokens or not gpu_bytes:
        return False
    weights, trainable, blocks, hidden = model_sizes(model)
    return step_memory_bytes(weights, trainable, max_tokens, blocks, hidden, 0) + extra_bytes <= HEADROOM * gpu_bytes


def enable_checkpointing(model, count: int) -> int:
    """Gradient checkpointing of the first `count` blocks (ALL_BLOCKS: every one) through
    diffusers' own hook: while checkpointing is on, the model hands every block's call to its
    _gradient_checkpointing_func, which here runs the others plainly. Returns how many recompute."""
    blocks = transformer_blocks(model)
    k = checkpointed_count(count, len(blocks))
    model.flux_lora_checkpointed_share = k / len(blocks)  # what the step's FLOP counts read (checkpointed_share())
    if k == len(blocks):
        model.enable_gradient_checkpointing()
        return k
    chosen = {id(block) for block in blocks[:k]}

    def checkpoint_chosen(block, *args):
        if id(block) in chosen:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    model.enable_gradient_checkpointing(checkpoint_chosen)
    return k


def checkpointed_share(model) -> float:
    """The share of the blocks that recompute their forward in the backward (0 to 1)."""
    return getattr(model, "flux_lora_checkpointed_share", 1.0) if model.is_gradient_checkpointing else 0.0


def fsdp_blocks_to_keep(model, setting: int, tokens: int, shards: int, gpu_bytes: int, checkpointing: bool | int) -> int:
    """dist.fsdp_keep_gathered resolved for this model: as set, or for auto (-1) as many of the
    last blocks as fit beside the sharded step's estimated peak in KEEP_GATHERED_HEADROOM (none without
    a GPU size to plan for)."""
    blocks = transformer_blocks(model)
    if setting >= 0:
        return min(setting, len(blocks))
    if not gpu_bytes or not tokens:
        return 0
    weights, trainable, n, hidden = model_sizes(model)
    sizes = [block_bytes(b) for b in blocks]
    need = sharded_step_memory_bytes(weights, trainable, tokens, n, hidden, max(sizes), shards, checkpointing)
    return blocks_to_keep_gathered(int(KEEP_GATHERED_HEADROOM * gpu_bytes) - need, sizes)


def block_bytes(block) -> int:
    return sum(t.numel() * t.element_size() for t in list(block.parameters()) + list(block.buffers()))


def grow_segments_for_small_cards(train_cfg, device: torch.device, budget_gib: float = 0.0) -> None:
    """The memory-first modes (fp8, nf4) and runs planned for a memory budget (dist.gpu_memory_gib):
    the allocator grows its segments in place (PyTorch's expandable segments) instead of caching
    fixed-size blocks, so a step that fits the card is not refused for fragmentation (without it,
    a 12 GiB cap failed with 1.4 GiB reserved but unusable). Before the model loads; a
    PYTORCH_CUDA_ALLOC_CONF the user set wins."""
    tight = train_cfg.memory_mode != "fast" or budget_gib > 0
    if device.type == "cuda" and tight and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")


def gpu_bytes(device: torch.device, budget_gib: float = 0.0) -> int:
    """The memory a run plans for: dist.gpu_memory_gib when set, else the GPU's size (0 on a CPU)."""
    if budget_gib:
        return int(budget_gib * 2**30)
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0


def host_peak_rss_mib() -> float:
    """This process's peak resident host memory so far (MiB), as the done events report it per rank."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
