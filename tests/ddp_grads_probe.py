"""Run by tests/test_distributed.py under torchrun: the same DDP training (two micro-batches per
step, the first under no_sync) with gradients freed after each step and with gradients kept
allocated (as CUDA graphs need); writes each rank's final parameters' differences to OUT_DIR."""

import json
import os
from pathlib import Path

import torch

from flux_lora import distributed, speed


def train(di, keep: bool) -> torch.Tensor:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    if keep:
        model.flux_lora_cuda_graphs = True  # what compile_blocks marks with cuda_graphs
        speed.keep_grads(model)
    ddp = speed.wrap_ddp(model, di)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(100 + di.rank)
    for _ in range(3):
        for micro in range(2):
            sync = ddp.no_sync() if micro == 0 else torch.enable_grad()
            with sync:
                ddp(torch.randn(5, 8, generator=g)).square().mean().backward()
        opt.step()
        speed.zero_grad(model, opt)
    assert all((p.grad is not None) == keep for p in model.parameters())
    return torch.cat([p.detach().flatten() for p in model.parameters()])


with distributed.session(timeout_s=60) as di:
    freed, kept = train(di, keep=False), train(di, keep=True)
    theirs = distributed.gather_objects(kept.tolist())
    row = {"kept_vs_freed": float((kept - freed).abs().max()),
           "ranks_differ": max(abs(a - b) for a, b in zip(theirs[0], theirs[-1]))}
    Path(os.environ["OUT_DIR"], f"rank-{di.rank}.json").write_text(json.dumps(row))
