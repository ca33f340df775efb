"""Global batches: which items each rank trains on at each step, and their prefetch.

The plan is a pure function of (seed, step, global batch size, items).

Every optimizer step draws one global batch of `global_batch = batch_size × world × grad_accum`
items of a single bucket; position j of that batch goes to micro-step j // (world·batch), rank
(j // batch) % world. The plan does not depend on the number of ranks, so 1 GPU × batch 4 and
4 GPUs × batch 1 see the same items with the same noise, and resuming needs only the step.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slice:
    micro_step: int
    positions: list[int]  # positions in the global batch (for per-sample noise)
    items: list[int]  # dataset indices


class GlobalBatchSampler:
    def __init__(self, buckets: list[tuple[int, int]], global_batch: int, seed: int):
        """buckets[k] is the bucket of dataset item k."""
        self.global_batch, self.seed = global_batch, seed
        groups: dict[tuple[int, int], list[int]] = {}
        for k, b in enumerate(buckets):
            groups.setdefault(tuple(b), []).append(k)
        self.groups = [groups[b] for b in sorted(groups)]
        self.batches_per_epoch = sum(math.ceil(len(g) / global_batch) for g in self.groups)
        self._epoch, self._plan = -1, []

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """All global batches of one epoch: each bucket shuffled and cut into full batches (the
        last one topped up by wrapping around, so small datasets repeat items), then shuffled."""
        generator = torch.Generator().manual_seed(self.seed * 7919 + epoch + 1)
        batches = []
        for group in self.groups:
            perm = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            padded = math.ceil(len(perm) / self.global_batch) * self.global_batch
            perm = (perm * math.ceil(padded / len(perm)))[:padded]
            batches += [perm[i:i + self.global_batch] for i in range(0, padded, self.global_batch)]
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def global_batch_at(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, self.epoch_plan(epoch)
        return self._plan[k]

    def rank_slices(self, step: int, rank: int, world: int, batch_size: int) -> list[Slice]:
        """This rank's micro-batches for an optimizer step."""
        batch = self.global_batch_at(step)
        per_micro = world * batch_size
        out = []
        for m in range(len(batch) // per_micro):
            start = m * per_micro + rank * batch_size
            positions = list(range(start, start + batch_size))
            out.append(Slice(m, positions, [batch[j] for j in positions]))
        return out


class Prefetcher:
    """load(step) for the next step runs on a background thread while this step trains, so reading
    the memory-mapped shards, stacking and pinning stay off the GPU's critical path. Errors (a
    corrupt shard) surface on the step that needs the data."""

    def __init__(self, load, end_step: int):
        self.load, self.end_step = load, end_step
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux-lora-prefetch")
        self.pending: dict = {}

    def get(self, step: int):
        future = self.pending.pop(step, None) or self.pool.submit(self.load, step)
        if step + 1 < self.end_step:
            self.pending[step + 1] = self.pool.submit(self.load, step + 1)
        return future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def pinned(batch: dict) -> dict:
    """Page-locked copies, so host-to-GPU copies run asynchronously (non_blocking)."""
    return {k: v.pin_memory() for k, v in batch.items()}
