"""Speed and memory options for the training step: regional (per-block) torch.compile, gradient
checkpointing, quantized frozen base (fp8 via torchao, NF4 via bitsandbytes) and the DDP wrapper.
Measured with scripts/bench.py; figures in bench/results/ and the README."""

from __future__ import annotations

import torch

from flux_lora.errors import ConfigError


def _blocks(model) -> list[torch.nn.Module]:
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def _is_linear(module: torch.nn.Module, fqn: str = "") -> bool:
    return isinstance(module, torch.nn.Linear)


def quantize_base(model, memory_mode: str, device: torch.device) -> None:
    """Quantize the frozen Linear layers of the blocks in place, block by block on the GPU (before
    LoRA wraps them; peft then wraps the quantized layers). Embedders and norms stay bf16."""
    if memory_mode == "fast":
        return
    if device.type != "cuda":
        raise ConfigError(f"train.memory_mode={memory_mode} needs a CUDA GPU; use memory_mode=fast on CPU")
    quantize_block = _fp8_quantizer() if memory_mode == "fp8" else _nf4_quantizer()
    for block in _blocks(model):
        block.to(device)
        quantize_block(block, device)
    model.to(device)
    torch.cuda.empty_cache()


def _fp8_quantizer():
    try:
        from torchao.quantization import Float8WeightOnlyConfig, quantize_
    except ImportError:
        raise ConfigError("memory_mode=fp8 needs torchao: pip install torchao") from None
    return lambda block, device: quantize_(block, Float8WeightOnlyConfig(), filter_fn=_is_linear)


def _nf4_quantizer():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("memory_mode=nf4 needs bitsandbytes: pip install bitsandbytes") from None

    def quantize_block(block, device):
        for parent in list(block.modules()):
            for name, leaf in list(parent.named_children()):
                if isinstance(leaf, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(leaf.in_features, leaf.out_features, bias=leaf.bias is not None,
                                          compute_dtype=leaf.weight.dtype, quant_type="nf4", device="meta")
                    q.weight = bnb.nn.Params4bit(leaf.weight.data, requires_grad=False, quant_type="nf4")
                    if leaf.bias is not None:
                        q.bias = torch.nn.Parameter(leaf.bias.data, requires_grad=False)
                    setattr(parent, name, q.to(device))  # moving to CUDA quantizes

    return quantize_block


def fp8_compute(model, device: torch.device) -> None:
    """Swap the blocks' frozen Linears for torchao Float8Linear (dynamic scaling): forward and the
    input-gradient matmuls run on fp8 tensor cores. Must run before LoRA wraps the layers."""
    if device.type != "cuda":
        raise ConfigError("train.fp8_compute needs an H100/H200-class GPU")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise ConfigError("train.fp8_compute needs torchao: pip install torchao") from None

    def keep(module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and "transformer_blocks." in fqn and \
            module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(model, module_filter_fn=keep)


def use_checkpointing(train_cfg) -> bool:
    if train_cfg.gradient_checkpointing == "auto":
        return train_cfg.memory_mode != "fast"
    return train_cfg.gradient_checkpointing == "on"


def apply(model, train_cfg, device: torch.device) -> None:
    """Gradient checkpointing and per-block compile (compiling each block, not the whole model,
    keeps compile time short and the graphs reusable across the identical blocks)."""
    if use_checkpointing(train_cfg):
        model.enable_gradient_checkpointing()
    if use_compile(train_cfg, device):
        compile_blocks(model)


def use_compile(train_cfg, device: torch.device) -> bool:
    """auto: on for the fast mode on CUDA; the quantized modes trade speed for memory anyway, and
    compiling through their tensor subclasses costs minutes before the first step."""
    if train_cfg.compile == "auto":
        return device.type == "cuda" and train_cfg.memory_mode == "fast"
    return train_cfg.compile == "on"


def compile_blocks(model) -> None:
    """Regional compile: each block is compiled on its own; the 19 (38) identical blocks share
    their graphs, so compile takes seconds, not the minutes of a whole-model compile."""
    for block in _blocks(model):
        block.compile(dynamic=False)


def wrap_ddp(model, di):
    """DDP over the LoRA parameters only (the frozen base has no grads to sync)."""
    if not di.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    kwargs = {"device_ids": [di.device.index]} if di.device.type == "cuda" else {}
    # DDP would broadcast and track every parameter; the frozen base is identical on every rank
    # (same weights, same seed) and has no gradients, so it manages only the LoRA parameters
    model._ddp_params_and_buffers_to_ignore = [n for n, p in model.named_parameters() if not p.requires_grad] + \
        [n for n, _ in model.named_buffers()]
    return DDP(model, find_unused_parameters=False, broadcast_buffers=False, bucket_cap_mb=25,
               gradient_as_bucket_view=True, **kwargs)
