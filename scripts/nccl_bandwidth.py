"""The GPUs' collective bandwidth as FSDP2 uses it: all-gather and reduce-scatter of bf16 buffers
of FLUX block sizes, timed with CUDA events. FSDP2 moves every frozen weight twice per step (the
forward's and the backward's gathers), so this bounds how far sharding can keep up with DDP.

    torchrun --nproc_per_node=2 scripts/nccl_bandwidth.py [--out FILE.json]
"""

import argparse
import json
import os

import torch
import torch.distributed as dist


def timed(fn, iters: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="")
    args = p.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rows = []
    for mib in (64, 340, 1360):  # a small unit, one FLUX.1 double block (bf16), four of them
        n = mib * 2**20 // 2
        shard = torch.randn(n // world, device="cuda", dtype=torch.bfloat16)
        whole = torch.empty(n, device="cuda", dtype=torch.bfloat16)
        s = timed(lambda: dist.all_gather_into_tensor(whole, shard))
        r = timed(lambda: dist.reduce_scatter_tensor(shard, whole))
        # bus bandwidth as nccl-tests counts it: (world - 1) / world of the whole buffer crosses each link
        bus = lambda t: n * 2 * (world - 1) / world / t / 1e9  # noqa: E731
        rows.append({"MiB": mib, "all_gather_s": s, "all_gather_busbw_GBps": bus(s),
                     "reduce_scatter_s": r, "reduce_scatter_busbw_GBps": bus(r)})
    if rank == 0:
        report = {"world_size": world, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())), "results": rows}
        print(json.dumps(report, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
