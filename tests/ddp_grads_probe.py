"""Run by tests/test_distributed.py under torchrun, once with KEEP_GRADS=0 and once with 1: the
same DDP training (two micro-batches per step, the first under no_sync) with gradients freed
after each step, or kept allocated as CUDA graphs need. Writes each rank's final parameters."""

import gc
import json
import os
from pathlib import Path

import torch

from flux_lora import distributed, speed

keep = os.environ["KEEP_GRADS"] == "1"
with distributed.session(timeout_s=60) as di:
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
            with ddp.no_sync() if micro == 0 else torch.enable_grad():
                ddp(torch.randn(5, 8, generator=g)).square().mean().backward()
        opt.step()
        speed.zero_grad(model, opt)
    row = {"grads_allocated": [p.grad is not None for p in model.parameters()],
           "params": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()}
    Path(os.environ["OUT_DIR"], f"keep{int(keep)}-rank-{di.rank}.json").write_text(json.dumps(row))
    del ddp, opt
    gc.collect()  # DDP goes while the process group lives, as in train.run
