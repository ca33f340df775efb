"""Where the text encoders run in preprocess: whole on the GPU, or, when they do not fit it
(FLUX.2 [dev]'s Mistral Small 3.1 is 24 B parameters, 48 GB in bf16), kept in host memory and
streamed to the GPU one layer at a time (accelerate's cpu_offload, as diffusers'
enable_sequential_cpu_offload): the same embeddings, at the cost of moving the weights over PCIe
for every batch of prompts. Measured by scripts/encoder_offload.py (bench/README.md)."""

from __future__ import annotations

import torch

HEADROOM = 0.8  # of the GPU's free memory: activations of a batch of prompts and the VAE beside the weights


def text_encoders(pipe) -> list[torch.nn.Module]:
    return [m for name in ("text_encoder", "text_encoder_2") if (m := getattr(pipe, name, None)) is not None]


def weight_bytes(pipe) -> int:
    return sum(p.numel() * p.element_size() for m in text_encoders(pipe) for p in m.parameters())


def choose_offload(setting: str, need: int, free: int) -> tuple[bool, str]:
    """(offload?, why) for preprocess.text_encoder_offload = auto|on|off; `free` 0 means no GPU."""
    if setting != "auto":
        return setting == "on", f"preprocess.text_encoder_offload={setting}"
    if free and need > HEADROOM * free:
        return True, (f"auto: the text encoders need {need / 2**30:.1f} GiB, the GPU has {free / 2**30:.1f} GiB free; "
                      "streaming them from host memory layer by layer")
    return False, "auto"


def place(pipe, device: torch.device, offload: bool):
    """Move the text pipeline to the device, or stream its encoders there from host memory."""
    if not offload:
        return pipe.to(device)
    from accelerate import cpu_offload

    for module in text_encoders(pipe):
        cpu_offload(module.to("cpu"), execution_device=device)
    return pipe
