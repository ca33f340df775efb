"""Which kernel of a LoRA training step is not bit-deterministic on this GPU: a small FLUX.1-shaped
transformer (head dim 128, so the fused cuDNN attention op takes it, as it takes FLUX.1) runs the
same forward and backward twice per attention choice, eagerly in bf16, and the LoRA gradients of
the two runs are compared bit for bit; "+det" rows run under train.deterministic. One GPU; prints
a line per choice (with an eager step's time) and writes a JSON.

    python scripts/determinism_probe.py --out OUT.json"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from flux_lora.fast import attention, determinism
from flux_lora.training import flow, lora


def small_flux(device: torch.device):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
                                   num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=64,
                                   guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    lora.add_lora(model, 16, 16, "attention-mlp", 0.0, 0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    return model.to(device, torch.bfloat16)


def grads_of_one_step(model, inputs: dict) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        pred = model(**inputs, return_dict=False)[0]
    pred.float().square().mean().backward()
    return {n: p.grad.detach().clone() for n, p in lora.lora_parameters(model)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-tokens", type=int, default=1024)
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", default="")
    args = p.parse_args()
    device = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    side = int(args.image_tokens ** 0.5) * 2
    inputs = {"hidden_states": torch.randn(args.batch, args.image_tokens, 64, generator=g, device=device, dtype=torch.bfloat16),
              "encoder_hidden_states": torch.randn(args.batch, args.text_tokens, 256, generator=g, device=device, dtype=torch.bfloat16),
              "pooled_projections": torch.randn(args.batch, 64, generator=g, device=device, dtype=torch.bfloat16),
              "timestep": torch.rand(args.batch, generator=g, device=device, dtype=torch.bfloat16),
              "guidance": torch.ones(args.batch, device=device, dtype=torch.bfloat16),
              "txt_ids": flow.text_ids(args.text_tokens, device), "img_ids": flow.image_ids(side, side, device)}
    rows = []
    # "+det": under train.deterministic (flux_lora.fast.determinism), as a run with it would be
    for choice in ("cudnn", "flash", "efficient", "math", "flash+det", "efficient+det"):
        model = small_flux(device)
        kernel, deterministic = choice.removesuffix("+det"), choice.endswith("+det")
        determinism.apply(deterministic)
        chosen = attention.choose_backend("default" if kernel == "math" else kernel, model, torch.bfloat16, device,
                                          deterministic) + ("+det" if deterministic else "")
        if choice == "math":
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(False)
            chosen = "math"
        grads_of_one_step(model, inputs)  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        first = grads_of_one_step(model, inputs)
        end.record()
        torch.cuda.synchronize()
        second = grads_of_one_step(model, inputs)
        differing = [n for n in first if not torch.equal(first[n], second[n])]
        largest = max(((first[n].float() - second[n].float()).abs().max().item() for n in first), default=0.0)
        rows.append({"attention": chosen, "tensors": len(first), "differing": len(differing), "max_abs_diff": largest,
                     "first_differing": differing[:3], "step_ms": start.elapsed_time(end)})
        print(f"attention {chosen:13s}: {len(differing)} of {len(first)} LoRA gradients differ between two identical steps "
              f"(max {largest:.3g}), eager step {start.elapsed_time(end):.1f} ms {differing[:2]}")
    determinism.apply(False)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(["scripts/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
                       "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
