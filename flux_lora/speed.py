"""Speed and memory options for the training step: regional (per-block) torch.compile, gradient
checkpointing, quantized frozen base (fp8 via torchao, NF4 via bitsandbytes) and the DDP wrapper.
Measured with scripts/bench.py; figures in bench/results/ and the README."""

from __future__ import annotations

import torch

from flux_lora.errors import ConfigError


def _blocks(model) -> list[torch.nn.Module]:
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def _block_linear_filter(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and "transformer_blocks." in fqn


def quantize_base(model, memory_mode: str) -> None:
    """Quantize the frozen Linear layers of the blocks in place (before LoRA wraps them)."""
    if memory_mode == "fast":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"train.memory_mode={memory_mode} needs a CUDA GPU; use memory_mode=fast on CPU")
    if memory_mode == "fp8":
        try:
            from torchao.quantization import Float8WeightOnlyConfig, quantize_
        except ImportError:
            raise ConfigError("memory_mode=fp8 needs torchao: pip install torchao") from None
        model.to("cuda")
        quantize_(model, Float8WeightOnlyConfig(), filter_fn=_block_linear_filter)
    elif memory_mode == "nf4":
        _to_nf4(model)


def _to_nf4(model) -> None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("memory_mode=nf4 needs bitsandbytes: pip install bitsandbytes") from None
    for block in _blocks(model):
        for name, child in list(block.named_modules()):
            for cname, leaf in list(child.named_children()):
                if isinstance(leaf, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(leaf.in_features, leaf.out_features, bias=leaf.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(leaf.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                    if leaf.bias is not None:
                        q.bias = torch.nn.Parameter(leaf.bias.data, requires_grad=False)
                    setattr(child, cname, q)
    model.to("cuda")


def use_checkpointing(train_cfg) -> bool:
    if train_cfg.gradient_checkpointing == "auto":
        return train_cfg.memory_mode != "fast"
    return train_cfg.gradient_checkpointing == "on"


def apply(model, train_cfg, device: torch.device) -> None:
    """Gradient checkpointing and per-block compile (compiling each block, not the whole model,
    keeps compile time short and the graphs reusable across the identical blocks)."""
    if use_checkpointing(train_cfg):
        model.enable_gradient_checkpointing()
    compile_on = train_cfg.compile == "on" or (train_cfg.compile == "auto" and device.type == "cuda")
    if compile_on:
        for block in _blocks(model):
            block.compile(dynamic=False)


def wrap_ddp(model, di):
    """DDP over the LoRA parameters only (the frozen base has no grads to sync)."""
    if not di.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    kwargs = {"device_ids": [di.device.index]} if di.device.type == "cuda" else {}
    return DDP(model, find_unused_parameters=False, broadcast_buffers=False, bucket_cap_mb=25,
               gradient_as_bucket_view=True, **kwargs)
