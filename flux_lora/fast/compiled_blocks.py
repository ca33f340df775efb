"""Speed and memory options for the training step: regional (per-block) torch.compile, gradient
checkpointing, quantized frozen base (fp8 in flux_lora.fp8, NF4 via bitsandbytes) and the DDP wrapper.
Measured with scripts/bench.py; figures in bench/results/ and the README."""

from __future__ import annotations

import contextlib
import gc
import warnings

import torch

from flux_lora import fp8, fused, lora_up
from flux_lora.errors import ConfigError


def _blocks(model) -> list[torch.nn.Module]:
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def quantize_base(model, memory_mode: str, device: torch.device) -> None:
    """memory_mode=nf4: quantize the frozen Linear layers of the blocks in place, block by block on
    the GPU, before LoRA is added (peft has LoRA layers for bitsandbytes' Linear4bit). Embedders and
    norms stay bf16. The fp8 base is made after LoRA is added (fp8_base)."""
    if memory_mode != "nf4":
        return
    if device.type != "cuda":
        raise ConfigError("train.memory_mode=nf4 needs a CUDA GPU (bitsandbytes); use memory_mode=fast or fp8 on CPU")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("memory_mode=nf4 needs bitsandbytes: pip install bitsandbytes") from None
    for block in _blocks(model):
        block.to(device)
        for parent in list(block.modules()):
            for name, leaf in list(parent.named_children()):
                if isinstance(leaf, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(leaf.in_features, leaf.out_features, bias=leaf.bias is not None,
                                          compute_dtype=leaf.weight.dtype, quant_type="nf4", device="meta")
                    q.weight = bnb.nn.Params4bit(leaf.weight.data, requires_grad=False, quant_type="nf4")
                    if leaf.bias is not None:
                        q.bias = torch.nn.Parameter(leaf.bias.data, requires_grad=False)
                    setattr(parent, name, q.to(device))  # moving to CUDA quantizes
    model.to(device)
    torch.cuda.empty_cache()


def has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def uses_fp8_base(train_cfg, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """memory_mode=fp8 always; fast mode with fp8_compute on, or auto on a GPU with fp8 tensor
    cores and a bf16 model (there it measured faster at unchanged loss: README, Performance)."""
    if train_cfg.memory_mode != "fast":
        wanted = train_cfg.memory_mode == "fp8"
    elif train_cfg.fp8_compute == "auto":
        return has_fp8_tensor_cores(device) and dtype == torch.bfloat16
    else:
        wanted = train_cfg.fp8_compute == "on"
    if wanted and device.type == "cuda" and dtype != torch.bfloat16:
        raise ConfigError("an fp8 base (memory_mode=fp8 or fp8_compute=on) multiplies into bf16 on GPUs; "
                          "use model.dtype=bf16 (or auto)")
    if wanted and not fp8.matmul_works(device.type):
        raise ConfigError(f"this torch {torch.__version__} cannot run fp8 matmuls on {device.type} "
                          "(needs an H100/H200/Ada GPU, or torch>=2.13 on the CPU); use memory_mode=fast/nf4")
    return wanted


STAGE_ON_GPU_BYTES = 48 * 2**30  # holds FLUX.1's bf16 transformer (24 GB) while it is converted


def load_device(train_cfg, device: torch.device, dtype: torch.dtype, synthetic: bool) -> torch.device:
    """Where the bf16 transformer is loaded. A base that will be quantized (nf4, fp8) goes to the
    CPU first and moves to the GPU block by block as it is converted, so a 12-24 GB card never
    holds it in bf16; a GPU of 48 GiB or more takes it directly (faster). Synthetic models are
    built on the GPU in any case."""
    quantized = train_cfg.memory_mode != "fast" or uses_fp8_base(train_cfg, device, dtype)
    if synthetic or not quantized or device.type != "cuda" or gpu_bytes(device) >= STAGE_ON_GPU_BYTES:
        return device
    return torch.device("cpu")


def fp8_base(model, train_cfg, device: torch.device, dtype: torch.dtype) -> int:
    """After LoRA is added, every frozen Linear of the blocks (the LoRA layers' base layers
    included) becomes an fp8 weight with fp8 matmuls (flux_lora.fp8), block by block on the
    device. Returns how many layers were converted."""
    if not uses_fp8_base(train_cfg, device, dtype):
        return 0
    n = fp8.convert_frozen_linears(_blocks(model), device)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return n


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
    return frozen, trainable, len(_blocks(model)), conf.num_attention_heads * conf.attention_head_dim


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


def apply(model, train_cfg, device: torch.device, max_tokens: int = 0, shapes: int = 1) -> str | None:
    """Gradient checkpointing and per-block compile (compiling each block, not the whole model,
    keeps compile time short and the graphs reusable across the identical blocks). Returns why
    checkpointing was turned on, or None."""
    if train_cfg.fuse_lora_up:
        lora_up.install(model)
    if train_cfg.fuse_qkv:
        fused.fuse_attention(model, up_add=train_cfg.fuse_lora_up)
    checkpointing, why = use_checkpointing(train_cfg, model, max_tokens, gpu_bytes(device))
    if checkpointing:
        model.enable_gradient_checkpointing()
    graphs = use_cuda_graphs(train_cfg, device, checkpointing, shapes)  # an impossible "on" fails here
    if use_compile(train_cfg, device):
        compile_blocks(model, graphs)
    return why if checkpointing else None


def use_compile(train_cfg, device: torch.device) -> bool:
    """auto: on CUDA, except for nf4: compiling through bitsandbytes' 4-bit tensors costs minutes
    before the first step. The fp8 base is plain tensors and compiles like bf16."""
    if train_cfg.compile == "auto":
        return device.type == "cuda" and train_cfg.memory_mode != "nf4"
    return train_cfg.compile == "on"


def use_cuda_graphs(train_cfg, device: torch.device, checkpointing: bool, shapes: int = 1) -> bool:
    """auto: on CUDA when the blocks are compiled and not checkpointed (a checkpointed block runs
    its forward again inside the backward, which a recorded graph sequence does not allow), and
    when every micro-batch has the same shape (`shapes`: distinct token counts of the dataset's
    buckets): each new shape records every block again (~8 s for FLUX.1), more than graphs save
    over most runs (0.6-5%, README)."""
    if train_cfg.cuda_graphs == "auto":
        return device.type == "cuda" and use_compile(train_cfg, device) and not checkpointing and shapes == 1
    on = train_cfg.cuda_graphs == "on"
    if on and (device.type != "cuda" or not use_compile(train_cfg, device) or checkpointing):
        raise ConfigError("train.cuda_graphs=on needs CUDA, train.compile on and no gradient checkpointing; "
                          "use train.cuda_graphs=auto")
    return on


def compile_blocks(model, cuda_graphs: bool = False) -> None:
    """Regional compile: each block is compiled on its own; the 19 (38) identical blocks share
    their graphs, so compile takes seconds, not the minutes of a whole-model compile. The forward
    is compiled, not the module call, so hooks stay outside the graphs.

    Shapes are static until a second one arrives (aspect-ratio buckets have different token
    counts: 22 distinct ones at 512 px); then the dimension that changed becomes symbolic, so a
    mixed dataset costs one more compile, not one per bucket (past dynamo's recompile limit of 8,
    blocks would silently run eager).

    With cuda_graphs, inductor records each block's forward and backward once per shape and then
    replays them (CUDA graph trees, one memory pool): a step costs the host ~120 replays instead
    of ~3,500 kernel launches. A replay writes its outputs, the LoRA gradients included, into the
    pool, where the next replay overwrites them; so the gradients are kept allocated (zeroed, not
    freed) and autograd adds each replay's output into them, under DDP and no_sync alike."""
    allow_compile_cache_of_fp8_functions()
    # Under DDP dynamo would split every graph at DDP's bucket boundaries (its DDPOptimizer), so
    # that a whole-model graph's backward can all-reduce early buckets. Its first bucket holds
    # 1 MiB, less than one block's LoRA gradients, so each block's graph would become two: a cut
    # through the fused kernels, one more CUDA graph per block, and cache keys of their own (a
    # 2-rank run compiled cold after a 1-rank one). The blocks are already the regions, and DDP's
    # reducer sees their gradients as each block's backward ends, so nothing is lost.
    torch._dynamo.config.optimize_ddp = False
    for block in _blocks(model):
        block.forward = torch.compile(block.forward, dynamic=None, mode="reduce-overhead" if cuda_graphs else None)
    if len(model.single_transformer_blocks):
        model.single_transformer_blocks[0].register_forward_pre_hook(_strided_like_later_single_blocks, with_kwargs=True)
    model.flux_lora_cuda_graphs = cuda_graphs
    if cuda_graphs:
        keep_grads(model)
        # The graph trees' loop detector sees the same block graph 38 times on one path, each the
        # child of the previous, and warns of a loop without a step boundary. Per-block graphs
        # are that path by design; the path ends each step when its outputs die (measured: replays).
        warnings.filterwarnings("ignore", message="Unable to hit fast path of CUDAGraphs because of pending")


def _strided_like_later_single_blocks(block, args, kwargs):
    """A single block returns its text and image streams as two views of one tensor, which is what
    every single block but the first receives; the first gets the double blocks' two separate
    tensors. Handing it the same layout spares a second compile of the single block."""
    names = ("hidden_states", "encoder_hidden_states")
    if len(args) >= 2:
        image, text, rest = args[0], args[1], args[2:]
    elif all(n in kwargs for n in names):
        image, text, rest = kwargs["hidden_states"], kwargs["encoder_hidden_states"], None
    else:
        return None
    joint = torch.cat([text, image], dim=1)
    text, image = joint[:, :text.shape[1]], joint[:, text.shape[1]:]
    if rest is not None:
        return (image, text, *rest), kwargs
    return args, {**kwargs, "hidden_states": image, "encoder_hidden_states": text}


def allow_compile_cache_of_fp8_functions() -> None:
    """AOTAutograd's on-disk cache skips graphs holding a custom autograd.Function (the fp8 base's
    matmuls) unless told otherwise; dynamo traces their forward and backward into the graph, so
    the cache key covers them. A warm start then skips re-tracing the joint graphs (~8 s of the
    time to first step on H100/H200; 13.6 -> 6.7 s for a tiny fp8 model on the CPU)."""
    import torch._functorch.config as config

    if hasattr(config, "autograd_cache_allow_custom_autograd_functions"):
        config.autograd_cache_allow_custom_autograd_functions = True


def keep_grads(model) -> None:
    """Allocate every trainable parameter's gradient now: autograd then adds into it instead of
    adopting the backward's output buffer (which a CUDA graph replay reuses) as the gradient."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def uses_cuda_graphs(model) -> bool:
    return getattr(model, "flux_lora_cuda_graphs", False)


def zero_grad(model, opt) -> None:
    """After an update: free the gradients, or zero them in place where CUDA graphs need them kept."""
    opt.zero_grad(set_to_none=not uses_cuda_graphs(model))


def eager_stance(model):
    """Context for inference with the training model (preview images): recorded CUDA graphs are
    for the training step's shapes and autograd; run those blocks eagerly instead."""
    return torch.compiler.set_stance("force_eager") if uses_cuda_graphs(model) else contextlib.nullcontext()


WARMUP_STEPS = 3  # compile + CUDA-graph warm-up, graph recording, DDP's bucket rebuild: all done by then


@contextlib.contextmanager
def frozen_gc_after_warmup(enabled: bool, first_step: int):
    """Yields `after_step(step)`: at the end of the warm-up it collects Python's garbage once and
    freezes the survivors (gc.freeze), the way servers freeze after start-up. A full collection
    then scans only objects made since, not the millions compile left alive, so it no longer
    stalls a step. Unfrozen on exit: a process that trains again must be able to free this run."""
    state = {"frozen": False}

    def after_step(step: int) -> bool:
        """True once the warm-up is over."""
        warm = step >= first_step + WARMUP_STEPS
        if enabled and warm and not state["frozen"]:
            gc.collect()
            gc.freeze()
            state["frozen"] = True
        return warm

    try:
        yield after_step
    finally:
        if state["frozen"]:
            gc.unfreeze()


OVERLAP_BUCKET_MB = 25


def ddp_bucket_mb(setting: int, gradient_bytes: int, one_host: bool) -> float:
    """dist.bucket_mb, 0 = auto. On one host (NVLink) the LoRA's gradients (260 MB for FLUX.1 at
    rank 16) all-reduce in ~1 ms as one bucket after the backward, while buckets reduced during the
    backward put NCCL kernels beside its compute: 1.950x vs 1.923x on 2 H200s (bench/results).
    Across hosts the network is slower, and overlapping the backward pays."""
    if setting:
        return float(setting)
    return gradient_bytes / 2**20 + 1 if one_host else float(OVERLAP_BUCKET_MB)


def wrap_ddp(model, di, bucket_mb: int = 0, average_per_bucket: bool = True):
    """DDP over the LoRA parameters only (the frozen base has no grads to sync). Without a comm
    hook DDP divides each gradient by the world size on its own, one small kernel per LoRA
    tensor; torch's allreduce_hook divides the bucket once and then sums it (same average)."""
    if not di.distributed:
        return model
    trainable = [p for p in model.parameters() if p.requires_grad]
    bucket = ddp_bucket_mb(bucket_mb, sum(p.numel() * p.element_size() for p in trainable), di.one_host)
    from torch.nn.parallel import DistributedDataParallel as DDP

    kwargs = {"device_ids": [di.device.index]} if di.device.type == "cuda" else {}
    # DDP would broadcast and track every parameter; the frozen base is identical on every rank
    # (same weights, same seed) and has no gradients, so it manages only the LoRA parameters
    model._ddp_params_and_buffers_to_ignore = [n for n, p in model.named_parameters() if not p.requires_grad] + \
        [n for n, _ in model.named_buffers()]
    ddp = DDP(model, find_unused_parameters=False, broadcast_buffers=False, bucket_cap_mb=bucket,
              gradient_as_bucket_view=True, **kwargs)
    if average_per_bucket:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ddp.register_comm_hook(None, allreduce_hook)
    return ddp
