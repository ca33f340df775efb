"""Host time of a training step under FSDP2 against the plain model, on the CPU (gloo), with a
FLUX.1-shaped transformer of 19 + 38 tiny blocks: what FSDP2's per-block hooks cost when the
GPU work is negligible. Every block is kept (dist.fsdp_keep_gathered) and the LoRA replicated,
as FSDP2 runs FLUX.1-dev on a card that holds it.

    torchrun --nproc_per_node=2 scripts/fsdp_host_overhead.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flux_lora.models.loading import transformer_blocks  # noqa: E402
from flux_lora.parallel import fsdp, session  # noqa: E402
from flux_lora.training import flow, lora  # noqa: E402


def tiny_flux1_shape():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=19, num_single_layers=38,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    model.requires_grad_(False)
    lora.add_lora(model, 4, 4, "attention-mlp", 0.0, 0)
    return model


def median_step_ms(model, sharded: bool, steps: int) -> float:
    cpu, g = torch.device("cpu"), torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=g), timestep=torch.rand(1, generator=g),
                  guidance=torch.ones(1), pooled_projections=torch.randn(1, 32, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g), txt_ids=flow.text_ids(8, cpu),
                  img_ids=flow.image_ids(8, 8, cpu), return_dict=False)
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model(**inputs)[0].square().mean().backward()
        if sharded:
            fsdp.sync_replicated_grads(model)
        else:  # DDP's share of the work: one all-reduce of the LoRA's gradients
            from torch._utils import _flatten_dense_tensors
            dist.all_reduce(_flatten_dense_tensors([p.grad for p in params]))
        for p in params:
            p.grad = None
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[5:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = {"plain_ms": [], "fsdp_ms": []}
    with session.process_group(120) as di:
        for _ in range(args.repeats):
            rows["plain_ms"].append(round(median_step_ms(tiny_flux1_shape(), False, args.steps), 1))
            model = tiny_flux1_shape()
            blocks = transformer_blocks(model)
            fsdp.wrap_fsdp(model, blocks, di, torch.float32, keep_gathered=len(blocks), replicate_lora=True)
            rows["fsdp_ms"].append(round(median_step_ms(model, True, args.steps), 1))
        if di.is_main:
            report = {**rows, "ranks": di.world_size, "blocks": 57, "extra_ms_per_step": round(
                statistics.fmean(rows["fsdp_ms"]) - statistics.fmean(rows["plain_ms"]), 1),
                "command": " ".join(["scripts/fsdp_host_overhead.py"] + sys.argv[1:])}
            print(json.dumps(report))
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
