"""Quantized frozen bases: NF4 through bitsandbytes (memory_mode=nf4) and fp8 (memory_mode=fp8, or
the fast mode's fp8 compute on GPUs with fp8 tensor cores; the layers themselves are in fast.fp8),
and where the bf16 transformer is staged while it is converted."""

from __future__ import annotations

import torch

from flux_lora.errors import ConfigError
from flux_lora.fast import fp8
from flux_lora.fast.memory import gpu_bytes
from flux_lora.models.loading import transformer_blocks


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
    for block in transformer_blocks(model):
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


def load_device(train_cfg, device: torch.device, dtype: torch.dtype, budget_gib: float = 0.0) -> torch.device:
    """Where the bf16 transformer is loaded (or a random one built). A base that will be quantized
    (nf4, fp8) goes to the CPU first and moves to the GPU block by block as it is converted, so a
    12-24 GB card (or a run given dist.gpu_memory_gib below 48) never holds it in bf16; a GPU of
    48 GiB or more takes it directly (faster)."""
    quantized = train_cfg.memory_mode != "fast" or uses_fp8_base(train_cfg, device, dtype)
    if not quantized or device.type != "cuda" or gpu_bytes(device, budget_gib) >= STAGE_ON_GPU_BYTES:
        return device
    return torch.device("cpu")


def fp8_base(model, train_cfg, device: torch.device, dtype: torch.dtype) -> int:
    """After LoRA is added, every frozen Linear of the blocks (the LoRA layers' base layers
    included) becomes an fp8 weight with fp8 matmuls (flux_lora.fp8), block by block on the
    device. Returns how many layers were converted."""
    if not uses_fp8_base(train_cfg, device, dtype):
        return 0
    n = fp8.convert_frozen_linears(transformer_blocks(model), device)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return n
