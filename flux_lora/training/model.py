"""The transformer being trained: loaded, frozen, LoRA added (fp32), and the speed and memory
options applied in the order they need (quantize before LoRA for NF4, fp8 after it, then fused
layers, checkpointing, compile)."""

from __future__ import annotations

import dataclasses

import torch

from flux_lora.config import Config
from flux_lora.errors import ConfigError
from flux_lora.fast import (attention, compiled_blocks, determinism, fp8, fused_qkv, lora_up, memory, qk_rope,
                            quantize, single_block)
from flux_lora.models import families, loading
from flux_lora.models.families.base import Family
from flux_lora.parallel import fsdp
from flux_lora.parallel.session import DistInfo
from flux_lora.training import lora
from flux_lora.training.sharding import replicates_lora


def image_token_counts(buckets: set[tuple[int, int]]) -> set[int]:
    """Image tokens (one per 16×16 pixels, in every family) of each (width, height) bucket."""
    return {(w // 16) * (h // 16) for w, h in buckets}


def largest_micro_batch_tokens(buckets: set[tuple[int, int]], text_len: int, batch_size: int, paired: bool = False) -> int:
    """Tokens of the largest micro-batch: image tokens (twice for a control image of the same
    size) + text tokens, times the batch."""
    return batch_size * ((2 if paired else 1) * max(image_token_counts(buckets)) + text_len)


def micro_batch_shapes(buckets: set[tuple[int, int]]) -> int:
    """How many micro-batch shapes the run will see: distinct image token counts of the buckets."""
    return len(image_token_counts(buckets))


def train_settings_for(cfg: Config):
    """cfg.train as the adapter and the loss allow: DoRA's forward reads the base weight for its
    norm and rescales the LoRA output, which the fp8 base and the fused LoRA kernels do not do;
    preservation's base-model forward (LoRA off, no autograd) is not a recorded CUDA graph."""
    train = cfg.train
    if train.preservation_weight:
        if train.cuda_graphs == "on":
            raise ConfigError("train.cuda_graphs=on does not combine with train.preservation_weight (its base-model "
                              "forward runs between the recorded ones); use cuda_graphs=auto/off")
        train = dataclasses.replace(train, cuda_graphs="off")
    cfg = dataclasses.replace(cfg, train=train)
    if cfg.lora.kind != "dora":
        return cfg.train
    if cfg.train.memory_mode != "fast" or cfg.train.fp8_compute == "on":
        raise ConfigError("lora.kind=dora needs the bf16 base: memory_mode=fast with train.fp8_compute auto or off "
                          "(DoRA reads the base weight for its norm)")
    return dataclasses.replace(cfg.train, fp8_compute="off", fuse_lora_up=False, fuse_qkv=False)


def build_model(cfg: Config, di: DistInfo, reporter, tokens: int = 0, shapes: int = 1,
                family: Family | None = None, sharding: str = "ddp", phases=None) -> tuple[torch.nn.Module, int]:
    """Transformer from_pretrained, frozen, LoRA added (fp32), speed/memory options applied;
    `tokens` (largest micro-batch) lets gradient checkpointing=auto decide from memory, `shapes`
    (distinct micro-batch shapes) lets cuda_graphs=auto decide. Under sharding=fsdp the model is
    left where it was loaded (the CPU, for a real model) for wrap_fsdp to shard onto the GPUs.
    `phases` (timing.Phases) times the steps. Returns (model, LoRA params)."""
    mark = phases.mark if phases is not None else (lambda name: None)
    family = family or families.of_model(cfg.model.path, cfg.model.revision)
    cfg = dataclasses.replace(cfg, train=train_settings_for(cfg))
    dtype = loading.resolve_dtype(cfg.model.dtype, di.device)
    sharded = sharding == "fsdp" and di.distributed
    if sharded:  # whole on no GPU: loaded (or random weights built) in host memory, then sharded
        stage = torch.device("cpu")
    else:
        stage = quantize.load_device(cfg.train, di.device, dtype, cfg.dist.gpu_memory_gib)
    determinism.apply(cfg.train.deterministic)  # before the first matmul and compile
    memory.grow_segments_for_small_cards(cfg.train, di.device, cfg.dist.gpu_memory_gib)
    transformer = family.load_transformer(cfg.model.path, dtype, cfg.model.revision, stage, cfg.model.transformer_file)
    mark("model_load")
    attention.choose_backend(cfg.model.attention, transformer, dtype, di.device, cfg.train.deterministic)
    for name in lora.unmatched_targets(transformer, cfg.lora.targets, family.lora_presets):
        reporter.warning(f"LoRA target {name!r} matches no Linear layer of the transformer")
    quantize.quantize_base(transformer, cfg.train.memory_mode, di.device)
    n_params = lora.add_lora(transformer, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.dropout,
                             cfg.train.seed, family.lora_presets, dora=cfg.lora.kind == "dora")
    if cfg.lora.init:
        initial, layers = lora.initial_weights(cfg.lora.init, transformer, cfg.lora.rank, cfg.lora.alpha, family)
        lora.load_initial(transformer, initial)
        total = len({lora.peft_key(n).split(".lora_")[0] for n, _ in lora.lora_parameters(transformer)})
        reporter.info(f"LoRA starts from {cfg.lora.init}: {layers} of {total} layers"
                      + (f"; the other {total - layers} start at zero" if layers < total else ""))
    mark("lora")
    if sharded:
        # FSDP2 shards parameters; the fp8 copy of a block and the q/k/v group's concatenated
        # weight are buffers it would keep whole on every GPU
        if quantize.uses_fp8_base(cfg.train, di.device, dtype):
            reporter.info("fp8 compute is off under dist.sharding=fsdp (the bf16 base is sharded instead)")
        if cfg.train.fuse_qkv and family.fuses_qkv:
            reporter.info("q/k/v grouping is off under dist.sharding=fsdp (the grouped weight would be whole on every GPU)")
    elif n_fp8 := quantize.fp8_base(transformer, cfg.train, di.device, dtype):
        where = "on fp8 tensor cores" if di.device.type == "cuda" else f"in fp8 on the {di.device.type}"
        reporter.info(f"frozen base in fp8: {n_fp8} Linear layers multiply {where}"
                      + (" (train.fp8_compute=off keeps bf16)" if cfg.train.memory_mode == "fast" else ""))
    if not sharded:
        transformer.to(di.device)
    mark("base_on_device")  # fp8/nf4 conversion included
    checkpointed, why = apply_speed_options(transformer, cfg.train, di.device, tokens,
                                            family.fuses_qkv and not sharded, di.world_size if sharded else 1,
                                            cfg.dist.gpu_memory_gib)
    say_speed_options(reporter, transformer, checkpointed, why)
    mark("speed_options")  # fused q/k/v and LoRA-up, checkpointing
    if sharded:
        shard(transformer, cfg, di, dtype, tokens, checkpointed, n_params, reporter)
        mark("fsdp_wrap")
    compile_model(transformer, cfg.train, di.device, checkpointed > 0, shapes)
    return transformer, n_params


def shard(transformer, cfg: Config, di: DistInfo, dtype: torch.dtype, tokens: int, checkpointed: int,
          n_params: int, reporter) -> None:
    """FSDP2 over the ranks: how many blocks stay gathered and where the LoRA lives decided and
    said in a line each, then parallel.fsdp wraps the model."""
    blocks = loading.transformer_blocks(transformer)
    budget = memory.gpu_bytes(di.device, cfg.dist.gpu_memory_gib)
    keep = memory.fsdp_blocks_to_keep(transformer, cfg.dist.fsdp_keep_gathered, tokens, di.world_size, budget,
                                      checkpointed)
    replicate = replicates_lora(cfg.dist.fsdp_lora, n_params, budget)
    if keep:
        kept_gib = sum(memory.block_bytes(b) for b in blocks[len(blocks) - keep:]) / 2**30
        reporter.info(f"FSDP2 leaves the last {keep} of {len(blocks)} blocks whole on every rank (~{kept_gib:.1f} GiB "
                      "per GPU, gathered never: the LoRA is replicated too; dist.fsdp_keep_gathered=0 shards them)"
                      if replicate else
                      f"FSDP2 keeps the last {keep} of {len(blocks)} blocks gathered from forward to backward "
                      f"(~{kept_gib:.1f} GiB per GPU, no second all-gather for them; dist.fsdp_keep_gathered=0 saves it)")
    reporter.info(f"FSDP2 keeps the LoRA whole on every rank (~{16 * n_params / 2**20:.0f} MiB of training state; "
                  "one all-reduce of its gradients a step; dist.fsdp_lora=sharded shards it)" if replicate else
                  "FSDP2 shards the LoRA and its optimizer state with the base (dist.fsdp_lora)")
    fsdp.wrap_fsdp(transformer, blocks, di, dtype, cfg.dist.fsdp_unit_blocks, cfg.dist.fsdp_prefetch, keep, replicate)


def apply_speed_options(model, train_cfg, device: torch.device, max_tokens: int = 0, fuses_qkv: bool = True,
                        shards: int = 1, budget_gib: float = 0.0) -> tuple[int, str]:
    """Fused LoRA-up and q/k/v, and gradient checkpointing. `shards` > 1: the model will be
    sharded over that many GPUs (FSDP2), which the memory estimate counts. Returns how many
    blocks are checkpointed (0: none) and why."""
    if train_cfg.fuse_lora_up:
        lora_up.install(model, train_cfg.lora_triton)
    if train_cfg.fuse_qkv and fuses_qkv:  # FLUX.2's single blocks come fused; its double blocks stay separate
        single_block.group(model, up_add=train_cfg.fuse_lora_up, triton=train_cfg.lora_triton)
        fused_qkv.fuse_attention(model, up_add=train_cfg.fuse_lora_up, triton=train_cfg.lora_triton)
        qk_rope.install(model)
    gpu_bytes = memory.gpu_bytes(device, budget_gib)
    count, why = memory.use_checkpointing(train_cfg, model, max_tokens, gpu_bytes, shards)
    if keeps_fp8_transposed(train_cfg, model, count, max_tokens, gpu_bytes):
        model.flux_lora_fp8_transposed_bytes = fp8.keep_transposed(model)
    return (memory.enable_checkpointing(model, count) if count else 0), why


def say_speed_options(reporter, transformer, checkpointed: int, why: str) -> None:
    """One line each for what apply_speed_options chose that costs memory or speed."""
    if checkpointed:
        blocks = len(loading.transformer_blocks(transformer))
        reporter.info(f"gradient checkpointing on ({why})" if checkpointed == blocks else
                      f"gradient checkpointing on for {checkpointed} of {blocks} blocks ({why})")
    if kept := getattr(transformer, "flux_lora_fp8_transposed_bytes", 0):
        reporter.info(f"fp8 weights also kept transposed for the backward (+{kept / 2**30:.1f} GiB; "
                      "train.fp8_transposed=off saves it)")


def keeps_fp8_transposed(train_cfg, model, checkpointed: int, max_tokens: int, gpu_bytes: int) -> bool:
    """train.fp8_transposed: on, off, or auto: in the fast mode, without checkpointing, when the
    step's estimate leaves room for the copies."""
    extra = fp8.transposed_bytes(model)
    if not extra or train_cfg.fp8_transposed == "off":
        return False
    return train_cfg.fp8_transposed == "on" or (
        train_cfg.memory_mode == "fast" and not checkpointed and memory.fits_with(model, max_tokens, gpu_bytes, extra))


def compile_model(model, train_cfg, device: torch.device, checkpointing: bool, shapes: int = 1) -> None:
    """Per-block compile, last: compiling each block, not the whole model, keeps compile time short
    and the graphs reusable across the identical blocks. `shapes` (distinct micro-batch shapes)
    lets cuda_graphs=auto decide. Recorded CUDA graphs need weights that stay where they are, so
    FSDP2's sharded blocks, gathered into new memory every step, run without them (measured: 15 s
    a step at 512 px with them on). When FSDP2 leaves every block whole (a replicated LoRA with
    room for all), they are recorded as under DDP (measured); a partly sharded model, where
    graph replays and FSDP2's gathers would alternate, is not (not measured)."""
    graphs = compiled_blocks.use_cuda_graphs(train_cfg, device, checkpointing, shapes)  # an impossible "on" fails here
    if compiled_blocks.use_compile(train_cfg, device):
        blocks = loading.transformer_blocks(model)
        partly_sharded = any(fsdp.is_sharded_module(b) for b in blocks)
        compiled_blocks.compile_blocks(model, graphs, graphed=[] if partly_sharded else blocks)
