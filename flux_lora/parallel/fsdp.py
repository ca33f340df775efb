"""FSDP2 (torch.distributed.fsdp.fully_shard): the frozen base, the LoRA and its optimizer state
sharded block by block across the ranks, for a base that one GPU cannot hold beside its step.
DDP (parallel.ddp) stays the default while the base fits: it moves no weights at all.

What changes under FSDP2, and only here:
- each transformer block is one FSDP group, the rest of the model (embedders, final norm) is the
  root's; a block's weights are all-gathered just before it runs and freed after (its backward
  gathers them again), the next block's gather overlapping the current block's compute; with a
  replicated LoRA, the last blocks where memory allows are left whole on every rank instead;
- the base's parameters become DTensors (a shard each). The LoRA is either sharded with them
  (DTensors kept fp32, cast to the compute dtype for the gather by the MixedPrecisionPolicy,
  gradients reduce-scattered in fp32 per block) or left out of FSDP2 (`ignored_params`):
  replicated on every rank as under DDP, its gradients averaged in one all-reduce after the
  step's last backward (sync_replicated_grads), its optimizer fused over plain tensors;
- gradient sync is turned off for all but the last micro-batch of a step (grad accumulation);
- inference (previews, validation) runs the same number of forwards on every rank (each forward's
  gathers are collectives) and frees what it left gathered (reshard), for training's next step;
- checkpoints are torch.distributed.checkpoint directories (training.checkpoint), readable on
  any number of ranks.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from flux_lora.parallel.session import DistInfo


def wrap_fsdp(model: torch.nn.Module, blocks: list[torch.nn.Module], di: DistInfo,
              compute_dtype: torch.dtype, unit_blocks: int = 1, prefetch: int = 1,
              keep_gathered: int = 0, replicate_lora: bool = False) -> torch.nn.Module:
    """fully_shard the transformer's blocks, `unit_blocks` consecutive ones as one unit (gathered
    and reduced together), then the root; returns the model (sharded in place). Parameters still
    on the CPU move to the GPU one unit at a time as they are sharded. `prefetch` > 1 (units of
    one block): each block starts the all-gathers of that many blocks after it (before it, in the
    backward), where FSDP2 on its own gathers the next one as the current one starts. Units within
    the last `keep_gathered` blocks keep their weights gathered from the forward to the backward
    (no second all-gather; the backward frees them), unless the LoRA is replicated: then they are
    not sharded at all but whole on every rank, as under DDP. `replicate_lora`: the trained
    parameters stay whole on every rank, outside FSDP2 (moved to the GPU here)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(di.device.type, (di.world_size,))
    # inputs are left as the model makes them (autocast decides, as under DDP): FSDP2 would cast
    # them in the forward but not in a checkpointed block's recompute, which then fails
    policy = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                  reduce_dtype=torch.float32, cast_forward_inputs=False)
    # A single block returns its two streams as views of one tensor (diffusers' design); FSDP2
    # warns that an in-place op on such a view would skip its hook. Nothing here writes into them
    # (tests/test_fsdp.py: FSDP2's LoRA equals DDP's).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    replicated = [p for p in model.parameters() if p.requires_grad] if replicate_lora else []
    for p in replicated:
        p.data = p.data.to(di.device)
    ignored = set(replicated) or None
    units = [blocks[i:i + unit_blocks] for i in range(0, len(blocks), unit_blocks)]
    first_kept = len(blocks) - keep_gathered
    whole: set[torch.nn.Parameter] = set()
    for i, unit in enumerate(units):
        # the last unit's weights are needed again at once by the backward: always kept gathered
        kept = i == len(units) - 1 or i * unit_blocks >= first_kept
        if kept and replicate_lora:
            # the frozen base never changes and the LoRA is not FSDP2's: kept gathered, the block
            # would hold the same whole weights from step to step, beside its shard and behind
            # FSDP2's hooks (host time each forward and backward). Whole on every rank instead.
            for block in unit:
                whole.update(block.to(di.device).parameters())
            continue
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, mp_policy=policy, reshard_after_forward=not kept,
                    ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False,  # embedders, norms: small
                ignored_params=(ignored or set()) | whole or None)
    if replicate_lora:
        model.set_reshard_after_backward(False, recurse=False)  # the root's frozen weights: gathered once
    sharded_blocks = [b for b in blocks if is_sharded_module(b)]
    if prefetch > 1 and unit_blocks == 1:
        for i, block in enumerate(sharded_blocks):
            block.set_modules_to_forward_prefetch(sharded_blocks[i + 1:i + 1 + prefetch])
            block.set_modules_to_backward_prefetch(sharded_blocks[max(0, i - prefetch):i][::-1])
    model.flux_lora_sharded = True
    model.flux_lora_kept_gathered = keep_gathered
    model.flux_lora_replicated = replicated
    return model


def sync_replicated_grads(model) -> None:
    """Average the gradients of parameters FSDP2 leaves alone (a replicated LoRA) over the ranks:
    one all-reduce of all of them, flattened, after the step's last backward (DDP's maths:
    the sum over ranks divided by their number). Nothing for other models."""
    params = getattr(model, "flux_lora_replicated", None)
    if not params:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)  # a sum: gloo has no average
    flat.div_(dist.get_world_size())
    torch._foreach_copy_(grads, _unflatten_dense_tensors(flat, grads))


def is_sharded(model) -> bool:
    return getattr(model, "flux_lora_sharded", False)


def is_sharded_module(module) -> bool:
    """Whether fully_shard wrapped this very module (its weights gathered and freed around each use)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def gradient_sync(model, enabled: bool):
    """Context for one micro-batch's backward: sync gradients only on a step's last one (DDP's
    no_sync, FSDP2's set_requires_gradient_sync)."""
    if enabled:
        if is_sharded(model):
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if is_sharded(model):
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s maths (the total 2-norm; gradients scaled by
    min(1, max_norm / (norm + 1e-6))), returning the whole norm on every rank. On FSDP2's shards
    it works on each rank's local pieces (an element of a Shard(0) DTensor lives on one rank): one
    all-reduce of the squared norm instead of DTensor dispatch for each of ~760 LoRA tensors."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        if not grads or len({(g.device, g.dtype) for g in grads}) > 1:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        # torch's own maths for one device and dtype, without its per-call grouping of ~840
        # tensors (3.7 -> 1.5 ms of host time on a CPU core; on an H200 the gap before the
        # update stayed: its host time is elsewhere)
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total
    import torch.distributed as dist

    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    squared = torch.stack([n.float() for n in torch._foreach_norm(local)]).pow(2).sum()
    dist.all_reduce(squared, group=grads[0].device_mesh.get_group())
    total = squared.sqrt()
    torch._foreach_mul_(local, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (a collective: every rank calls it), else t."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def lockstep_extra(model, mine: int, total: int, world: int) -> int:
    """How many discarded forwards a rank adds to its `mine` of `total` rank-strided pieces of
    work so that it runs as many as the busiest rank: under FSDP2 each forward's all-gathers are
    collectives every rank must join. 0 for an unsharded model."""
    if not is_sharded(model) or not total:
        return 0
    return -(-total // world) - mine


def reshard(model) -> None:
    """Free the weights an inference forward left gathered (the root and the last block keep theirs
    after a forward, for the backward that follows in training). Without this, the next training
    forward would reuse them, as they were before the optimizer's update."""
    if not is_sharded(model):
        return
    for module in model.modules():
        if is_sharded_module(module):
            module.reshard()


def fill(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy src into dst: a whole tensor into this rank's shard of a DTensor (FSDP2's even
    chunks along dim 0), a shard into a shard of the same layout, or plain into plain."""
    from torch.distributed.tensor import DTensor

    if isinstance(dst, DTensor) and not isinstance(src, DTensor):
        mesh = dst.device_mesh
        chunks = torch.chunk(src, mesh.size(), dim=0)
        rank = mesh.get_local_rank()
        piece = chunks[rank] if rank < len(chunks) else src[:0]
        dst.to_local().copy_(piece)
    elif isinstance(src, DTensor) and not isinstance(dst, DTensor):
        dst.copy_(src.full_tensor())
    else:
        dst.copy_(src)

