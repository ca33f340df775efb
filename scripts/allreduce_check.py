"""All-reduce bandwidth between this machine's GPUs at the LoRA gradient size (NCCL, one process
per GPU): shows whether gradient sync can hide behind the backward.

    torchrun --nproc_per_node=2 scripts/allreduce_check.py [--mib 250]
"""

import argparse
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=float, default=250.0)
    args = p.parse_args()
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    x = torch.ones(int(args.mib * 2**20 / 4), device="cuda")
    for _ in range(3):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 10
    for _ in range(n):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / n * 1e3
    world = dist.get_world_size()
    busbw = x.numel() * 4 * 2 * (world - 1) / world / (ms / 1e3) / 1e9
    if rank == 0:
        print(f"all_reduce {args.mib:.0f} MiB fp32 over {world} GPUs: {ms:.2f} ms, bus bandwidth {busbw:.0f} GB/s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
