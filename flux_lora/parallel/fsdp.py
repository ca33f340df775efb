"""FSDP2 (torch.distributed.fsdp.fully_shard): the frozen base, the LoRA and its optimizer state
sharded block by block across the ranks, for a base that one GPU cannot hold beside its step.
DDP (parallel.ddp) stays the default while the base fits: it moves no weights at all.

What changes under FSDP2, and only here:
- each transformer block is one FSDP group, the rest of the model (embedders, final norm) is the
  root's; a block's weights are all-gathered just before it runs and freed after (its backward
  gathers them again), the next block's gather overlapping the current block's compute;
- parameters become DTensors (a shard each); the LoRA's stay fp32 and are cast to the compute
  dtype for the gather (MixedPrecisionPolicy), gradients are reduce-scattered in fp32;
- gradient sync is turned off for all but the last micro-batch of a step (grad accumulation);
- checkpoints are torch.distributed.checkpoint directories (training.checkpoint), readable on
  any number of ranks.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from flux_lora.errors import ConfigError
from flux_lora.fast import memory
from flux_lora.models.loading import transformer_blocks
from flux_lora.parallel.session import DistInfo


@dataclass(frozen=True)
class ShardingChoice:
    mode: str  # "ddp" or "fsdp"
    why: str  # one line for the log ("" when the user chose it)


@dataclass(frozen=True)
class PlannedSizes:
    """A transformer's sizes from its config alone (built on the meta device: no weights read)."""
    weight_bytes: int  # frozen base
    lora_params: int
    blocks: int
    hidden: int
    largest_block_bytes: int


def planned_sizes(family, model_path: str, revision: str, dtype: torch.dtype, lora_cfg) -> PlannedSizes:
    from flux_lora.training import lora

    config = family.transformer_config(model_path, revision)
    cls = family.diffusers_class(family.transformer_class)
    with torch.device("meta"):
        model = cls.from_config(config)
    item = torch.tensor([], dtype=dtype).element_size()
    lora_params = sum(m.in_features + m.out_features for name, m in model.named_modules()
                      if name in set(lora.matched_modules(model, lora.target_pattern(lora_cfg.targets, family.lora_presets))))
    blocks = transformer_blocks(model)
    return PlannedSizes(sum(p.numel() for p in model.parameters()) * item, lora_params * lora_cfg.rank, len(blocks),
                        config["num_attention_heads"] * config["attention_head_dim"],
                        max(sum(p.numel() for p in b.parameters()) for b in blocks) * item)


def choose_sharding(cfg, di: DistInfo, sizes_of, tokens: int, fp8_blocks: bool) -> ShardingChoice:
    """dist.sharding: ddp and fsdp as asked; auto keeps DDP while its estimated per-GPU peak
    (gradient checkpointing on where the settings allow it) fits the GPU, else FSDP2. `sizes_of()`
    gives the PlannedSizes (called only when auto has something to decide); `fp8_blocks`: DDP would
    hold the blocks' Linear weights in fp8 (half the bytes)."""
    mode = cfg.dist.sharding
    if mode == "fsdp" and di.world_size == 1:
        return ShardingChoice("ddp", "dist.sharding=fsdp on one rank has nothing to shard over: the model is trained whole")
    if mode != "auto":
        return ShardingChoice(mode, "")
    budget = memory.gpu_bytes(di.device, cfg.dist.gpu_memory_gib)
    if di.world_size == 1 or not budget or cfg.train.memory_mode != "fast":
        return ShardingChoice("ddp", "")  # nothing to shard over, no size to plan for, or a quantized base
    s = sizes_of()
    ckpt = cfg.train.gradient_checkpointing != "off"
    ddp_weights = s.weight_bytes - (s.blocks * s.largest_block_bytes // 2 if fp8_blocks else 0)
    ddp = memory.step_memory_bytes(ddp_weights, s.lora_params, tokens, s.blocks, s.hidden, ckpt)
    if ddp <= memory.HEADROOM * budget:
        return ShardingChoice("ddp", "")
    fsdp = memory.sharded_step_memory_bytes(s.weight_bytes, s.lora_params, tokens, s.blocks, s.hidden,
                                            s.largest_block_bytes, di.world_size, ckpt)
    gib = 2**30
    why = (f"dist.sharding=auto chose fsdp: DDP needs ~{ddp / gib:.1f} GiB per GPU, the GPU has {budget / gib:.1f} GiB; "
           f"sharded over {di.world_size} GPUs ~{fsdp / gib:.1f} GiB")
    if fsdp > memory.HEADROOM * budget:
        why += " (still more than fits: add GPUs, lower train.batch_size or use memory_mode=fp8/nf4 with ddp)"
    return ShardingChoice("fsdp", why)


def check_combination(train_cfg, di: DistInfo) -> None:
    """What FSDP2 composes with here, and one line for what it does not."""
    if train_cfg.memory_mode != "fast":
        raise ConfigError(f"dist.sharding=fsdp shards a bf16 base; memory_mode={train_cfg.memory_mode} keeps a quantized "
                          "base FSDP2 cannot shard here: use memory_mode=fast with fsdp, or sharding=ddp with "
                          f"memory_mode={train_cfg.memory_mode}")
    if train_cfg.fp8_compute == "on":
        raise ConfigError("train.fp8_compute=on keeps an fp8 copy of every block on every GPU, which dist.sharding=fsdp "
                          "would not shard; use fp8_compute=auto/off with fsdp, or sharding=ddp")
    if train_cfg.cuda_graphs == "on":
        raise ConfigError("train.cuda_graphs=on records fixed addresses, but FSDP2 gathers each block's weights "
                          "into new memory every step; use cuda_graphs=auto/off with dist.sharding=fsdp")


def wrap_fsdp(model: torch.nn.Module, di: DistInfo, compute_dtype: torch.dtype) -> torch.nn.Module:
    """fully_shard each block, then the root; returns the model (sharded in place). Parameters
    that are still on the CPU move to the GPU one block at a time as they are sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(di.device.type, (di.world_size,))
    # inputs are left as the model makes them (autocast decides, as under DDP): FSDP2 would cast
    # them in the forward but not in a checkpointed block's recompute, which then fails
    policy = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                  reduce_dtype=torch.float32, cast_forward_inputs=False)
    # A single block returns its two streams as views of one tensor (diffusers' design); FSDP2
    # warns that an in-place op on such a view would skip its hook. Nothing here writes into them
    # (tests/test_fsdp.py: FSDP2's LoRA equals DDP's).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # the last block's weights are needed again at once by the backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)  # embedders, norms: small
    model.flux_lora_sharded = True
    return model


def is_sharded(model) -> bool:
    return getattr(model, "flux_lora_sharded", False)


def gradient_sync(model, enabled: bool):
    """Context for one micro-batch's backward: sync gradients only on a step's last one (DDP's
    no_sync, FSDP2's set_requires_gradient_sync)."""
    if enabled:
        if is_sharded(model):
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if is_sharded(model):
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (a collective: every rank calls it), else t."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def lockstep_extra(model, mine: int, total: int, world: int) -> int:
    """How many discarded forwards a rank adds to its `mine` of `total` rank-strided pieces of
    work so that it runs as many as the busiest rank: under FSDP2 each forward's all-gathers are
    collectives every rank must join. 0 for an unsharded model."""
    if not is_sharded(model) or not total:
        return 0
    return -(-total // world) - mine


def reshard(model) -> None:
    """Free the weights an inference forward left gathered (the root and the last block keep theirs
    after a forward, for the backward that follows in training). Without this, the next training
    forward would reuse them, as they were before the optimizer's update."""
    if not is_sharded(model):
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()

