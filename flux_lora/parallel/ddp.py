"""DistributedDataParallel over the LoRA parameters, with the bucket and averaging choices and
the dynamo setting that keeps compiled blocks whole under it. FSDP2 will live beside it."""

from __future__ import annotations

import torch

from flux_lora.parallel.session import DistInfo


OVERLAP_BUCKET_MB = 25


def ddp_bucket_mb(setting: int, gradient_bytes: int, one_host: bool) -> float:
    """dist.bucket_mb, 0 = auto. On one host (NVLink) the LoRA's gradients (260 MB for FLUX.1 at
    rank 16) all-reduce in ~1 ms as one bucket after the backward, while buckets reduced during the
    backward put NCCL kernels beside its compute: 1.950x vs 1.923x on 2 H200s (bench/results).
    Across hosts the network is slower, and overlapping the backward pays."""
    if setting:
        return float(setting)
    return gradient_bytes / 2**20 + 1 if one_host else float(OVERLAP_BUCKET_MB)


def wrap_ddp(model, di: DistInfo, bucket_mb: int = 0, average_per_bucket: bool = True):
    """DDP over the LoRA parameters only (the frozen base has no grads to sync). Without a comm
    hook DDP divides each gradient by the world size on its own, one small kernel per LoRA
    tensor; torch's allreduce_hook divides the bucket once and then sums it (same average)."""
    if not di.distributed:
        return model
    trainable = [p for p in model.parameters() if p.requires_grad]
    bucket = ddp_bucket_mb(bucket_mb, sum(p.numel() * p.element_size() for p in trainable), di.one_host)
    from torch.nn.parallel import DistributedDataParallel as DDP

    kwargs = {"device_ids": [di.device.index]} if di.device.type == "cuda" else {}
    # DDP would broadcast and track every parameter; the frozen base is identical on every rank
    # (same weights, same seed) and has no gradients, so it manages only the LoRA parameters
    model._ddp_params_and_buffers_to_ignore = [n for n, p in model.named_parameters() if not p.requires_grad] + \
        [n for n, _ in model.named_buffers()]
    # Dynamo would split every compiled graph at DDP's bucket boundaries (its DDPOptimizer), so
    # that a whole-model graph's backward can all-reduce early buckets. Its first bucket holds
    # 1 MiB, less than one block's LoRA gradients, so each block's graph would become two: a cut
    # through the fused kernels, one more CUDA graph per block, and cache keys of their own (a
    # 2-rank run compiled cold after a 1-rank one). The blocks are already the regions, and DDP's
    # reducer sees their gradients as each block's backward ends, so nothing is lost.
    torch._dynamo.config.optimize_ddp = False
    # (no broadcast_buffers=False: every buffer is ignored above, so there is nothing to sync, and
    # torch 2.13 deprecates the argument with a warning at each run)
    ddp = DDP(model, find_unused_parameters=False, bucket_cap_mb=bucket, gradient_as_bucket_view=True, **kwargs)
    if average_per_bucket:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ddp.register_comm_hook(None, allreduce_hook)
    return ddp
