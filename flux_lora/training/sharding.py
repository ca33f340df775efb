"""Which sharding a run uses: DDP or FSDP2 as asked, or for `auto` from the memory estimate of the
model's config (fast.memory), and the combinations FSDP2 does not take, refused in one line.
The sharding itself is parallel.fsdp / parallel.ddp."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from flux_lora.config import Config
from flux_lora.errors import ConfigError
from flux_lora.fast import memory, quantize
from flux_lora.models import loading
from flux_lora.models.families.base import Family
from flux_lora.parallel.session import DistInfo
from flux_lora.training import lora


@dataclass(frozen=True)
class ShardingChoice:
    mode: str  # "ddp" or "fsdp"
    why: str  # one line for the log ("" when the user chose it)


@dataclass(frozen=True)
class PlannedSizes:
    """A transformer's sizes, from its config alone (training.model.planned_sizes)."""
    weight_bytes: int  # frozen base
    lora_params: int
    blocks: int
    hidden: int
    largest_block_bytes: int
    blocks_linear_params: int = 0  # the blocks' Linear weights (what fp8/NF4 quantize)
    params_per_token: int = 0  # Linear weights each token passes through (one stream of a double block)


def decide(cfg, di: DistInfo, sizes_of, tokens: int, fp8_blocks: bool) -> ShardingChoice:
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


# a replicated LoRA's training state (fp32 weights, gradients, two Adam moments) at most this share
# of a GPU: the memory FSDP2 saves is the base's, and one all-reduce replaces a reduce-scatter per block
# (the memory estimates count the LoRA sharded: at most 1% of the GPU off)
REPLICATED_LORA_SHARE = 0.02


def replicates_lora(setting: str, lora_params: int, budget_bytes: int) -> bool:
    """dist.fsdp_lora resolved: replicated/sharded as asked; auto replicates a LoRA whose training
    state fits within REPLICATED_LORA_SHARE of the GPU (no GPU size known: sharded)."""
    if setting != "auto":
        return setting == "replicated"
    return bool(budget_bytes) and 16 * lora_params <= REPLICATED_LORA_SHARE * budget_bytes


def shards_lora(cfg: Config, di: DistInfo, family: Family, choice: ShardingChoice) -> bool:
    """Whether this run's LoRA (and its optimizer state) will be DTensor shards: FSDP2 over several
    ranks with dist.fsdp_lora resolved to sharded (build_model resolves it the same way)."""
    if choice.mode != "fsdp" or not di.distributed:
        return False
    dtype = loading.resolve_dtype(cfg.model.dtype, di.device)
    params = planned_sizes(family, cfg.model.path, cfg.model.revision, dtype, cfg.lora).lora_params \
        if cfg.dist.fsdp_lora == "auto" else 0
    return not replicates_lora(cfg.dist.fsdp_lora, params, memory.gpu_bytes(di.device, cfg.dist.gpu_memory_gib))


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
        raise ConfigError("train.cuda_graphs=on records fixed addresses, but FSDP2 gathers its sharded blocks' weights "
                          "into new memory every step; use cuda_graphs=auto (graphs when it leaves every block whole) "
                          "or off with dist.sharding=fsdp")


def planned_sizes(family: Family, model_path: str, revision: str, dtype: torch.dtype, lora_cfg) -> PlannedSizes:
    """A transformer's sizes from its config alone, built on the meta device (no weights read);
    once per process for a model and LoRA (sharding=auto and train's memory check both ask)."""
    return _planned_sizes(family, model_path, revision, dtype, lora_cfg.rank, lora_cfg.targets)


@functools.lru_cache(maxsize=4)
def _planned_sizes(family: Family, model_path: str, revision: str, dtype: torch.dtype, rank: int,
                   targets: str) -> PlannedSizes:
    config = family.transformer_config(model_path, revision)
    cls = family.diffusers_class(family.transformer_class)
    with torch.device("meta"):
        model = cls.from_config(config)
    item = torch.tensor([], dtype=dtype).element_size()
    targeted = set(lora.matched_modules(model, lora.target_pattern(targets, family.lora_presets)))
    lora_params = sum(m.in_features + m.out_features for name, m in model.named_modules() if name in targeted)
    blocks = loading.transformer_blocks(model)
    linear, per_token = 0, 0
    for block in blocks:
        double = block in set(model.transformer_blocks)  # an image and a text stream: a token passes one
        for name, m in block.named_modules():
            if isinstance(m, torch.nn.Linear):
                linear += m.weight.numel()
                if "norm" not in name:  # modulation: once per sample, not per token
                    per_token += m.weight.numel() // (2 if double else 1)
    return PlannedSizes(sum(p.numel() for p in model.parameters()) * item, lora_params * rank, len(blocks),
                        config["num_attention_heads"] * config["attention_head_dim"],
                        max(sum(p.numel() for p in b.parameters()) for b in blocks) * item, linear, per_token)


def choose(cfg: Config, di: DistInfo, family: Family, tokens: int) -> ShardingChoice:
    """dist.sharding resolved (auto decided from the model's config and the GPU's memory), and the
    combinations FSDP2 does not take refused in one line."""
    dtype = loading.resolve_dtype(cfg.model.dtype, di.device)
    choice = decide(
        cfg, di, lambda: planned_sizes(family, cfg.model.path, cfg.model.revision, dtype, cfg.lora), tokens,
        quantize.uses_fp8_base(cfg.train, di.device, dtype))
    if choice.mode == "fsdp":
        check_combination(cfg.train, di)
    return choice
