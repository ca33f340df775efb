"""Run by tests/test_session.py under torchrun, once per MODE: the same DDP training (two
micro-batches per step, the first under no_sync) with gradients freed after each step ("free"),
kept allocated as CUDA graphs need ("keep"), or averaged by DDP per tensor instead of once per
bucket ("per-tensor"). Writes each rank's final parameters; rank 0 also writes those of the same
training without DDP on all ranks' data (gradients averaged by hand)."""

import copy
import gc
import json
import os
from pathlib import Path

import torch

from flux_lora.fast.compiled_blocks import keep_grads, zero_grad
from flux_lora.parallel import session
from flux_lora.parallel.ddp import wrap_ddp

MODE = os.environ["MODE"]
STEPS, MICRO = 3, 2


def batches(rank: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [[torch.randn(5, 8, generator=g) for _ in range(MICRO)] for _ in range(STEPS)]


def reference(model: torch.nn.Module, world: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = [batches(r) for r in range(world)]
    for step in range(STEPS):
        for r in range(world):
            for x in data[r][step]:
                (model(x).square().mean() / world).backward()
        opt.step()
        opt.zero_grad()
    return torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()


with session.process_group(timeout_s=60) as di:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    untouched = copy.deepcopy(model)
    if MODE == "keep":
        model.flux_lora_cuda_graphs = True  # what compile_blocks marks with cuda_graphs
        keep_grads(model)
    ddp = wrap_ddp(model, di, average_per_bucket=MODE != "per-tensor")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step_batches in batches(di.rank):
        for micro, x in enumerate(step_batches):
            with ddp.no_sync() if micro == 0 else torch.enable_grad():
                ddp(x).square().mean().backward()
        opt.step()
        zero_grad(model, opt)
    row = {"grads_allocated": [p.grad is not None for p in model.parameters()],
           "params": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()}
    if di.rank == 0:
        row["reference"] = reference(untouched, di.world_size)
    Path(os.environ["OUT_DIR"], f"{MODE}-rank-{di.rank}.json").write_text(json.dumps(row))
    del ddp, opt
    gc.collect()  # DDP goes while the process group lives, as in train.run
