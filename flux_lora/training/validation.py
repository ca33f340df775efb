"""Validation: items held out of training, their loss at fixed timesteps and noise (comparable
across checkpoints, GPU counts and resumes), and the best checkpoint it picks.

Which items are held out is a pure function of the item indices and the split (not of the seed or
the number of ranks). Each held-out item is evaluated alone, at VALIDATION_TIMESTEPS evenly spaced
t in (0, 1) with noise seeded by the item's index, so its loss is the same number on any rank;
the ranks share the items (rank-strided) and every rank sums them in index order.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from flux_lora.fast.compiled_blocks import eager_stance
from flux_lora.parallel import fsdp, session
from flux_lora.models.families.base import Family
from flux_lora.models.families.flux1 import FAMILY as FLUX1
from flux_lora.training import flow, step

VALIDATION_SEED = 0x5EED5EED


def held_out(indices: list[int], split: float) -> set[int]:
    """round(split · N) items (at least one when split > 0 and N > 1, never all), chosen by a hash
    of each index, so adding items elsewhere does not reshuffle the choice."""
    if split <= 0 or len(indices) < 2:
        return set()
    count = min(len(indices) - 1, max(1, round(split * len(indices))))
    ranked = sorted(indices, key=lambda i: hashlib.sha256(f"flux_lora-validation-{i}".encode()).digest())
    return set(ranked[:count])


def held_out_items(dataset, split: float) -> set[int]:
    """The dataset positions held out: held_out over the images (the base resolution's items,
    which come first), then every resolution of each held-out image, so none of it is trained."""
    base = held_out(list(range(dataset.base_items)), split)
    images = {dataset.items[k].index for k in base}
    return {k for k, item in enumerate(dataset.items) if item.index in images}


def timesteps(count: int) -> list[float]:
    """Evenly spaced midpoints of (0, 1): the same t for every item and every evaluation."""
    return [(k + 0.5) / count for k in range(count)]


@torch.no_grad()
def item_loss(model, sample: dict, index: int, ts: list[float], guidance: float | None, device: torch.device,
              dtype: torch.dtype, family: Family = FLUX1) -> float:
    """Flow-matching loss of one item averaged over the fixed timesteps (one forward, batch = len(ts))."""
    x0 = sample["latents"].to(device).float()[None].expand(len(ts), -1, -1, -1)  # [T, C, h, w]
    gen = torch.Generator(device=device).manual_seed(flow.sample_seed(VALIDATION_SEED, 0, index))
    noise = torch.randn(x0.shape[1:], generator=gen, device=device)[None].expand_as(x0)
    t = torch.tensor(ts, device=device)
    batch = {k: v[None].expand(len(ts), *v.shape) for k, v in sample.items() if isinstance(v, torch.Tensor)}
    with step.autocast(device, dtype):
        pred = family.predict(model, flow.noisy_latents(x0, noise, t), t, batch, guidance, device, dtype)
    mask = batch.get("mask")  # the loss the run trains on: masked where the item is
    weight = flow.loss_weight(None if mask is None else mask.to(device), x0.shape, family.pack)
    return float(flow.flow_loss(pred, family.pack(flow.velocity_target(x0, noise)), weight))


def validation_loss(model, dataset, items: list[int], ts: list[float], guidance: float | None,
                    device: torch.device, dtype: torch.dtype, family: Family = FLUX1) -> float:
    """Mean loss over the held-out items; every rank evaluates its share and gets the same mean."""
    di = session.info()
    was_training = model.training
    model.eval()
    try:
        with eager_stance(model):
            share = sorted(items)[di.rank::di.world_size]
            mine = {i: item_loss(model, dataset[i], dataset.items[i].index, ts, guidance, device, dtype, family)
                    for i in share}
            for _ in range(fsdp.lockstep_extra(model, len(share), len(items), di.world_size)):
                first = min(items)
                item_loss(model, dataset[first], dataset.items[first].index, ts, guidance, device, dtype, family)
    finally:
        model.train(was_training)
        fsdp.reshard(model)
    losses = {}
    for part in session.gather_objects(mine):
        losses.update(part)
    return math.fsum(losses[i] for i in sorted(losses)) / len(losses)


@dataclass
class Best:
    """The lowest validation loss so far and the step it belongs to (kept in checkpoints)."""
    step: int = -1
    loss: float = math.inf
    history: list = field(default_factory=list)  # (step, loss)

    def record(self, step: int, loss: float) -> bool:
        """Add an evaluation; True if it is the new best (ties keep the earlier step)."""
        self.history = [h for h in self.history if h[0] != step] + [(step, loss)]
        if loss < self.loss:
            self.step, self.loss = step, loss
            return True
        return False

    def reason(self) -> str:
        return (f"lowest validation loss ({self.loss:.5f} at step {self.step}) of {len(self.history)} evaluations "
                f"(steps {', '.join(str(s) for s, _ in self.history)})")

    def to_state(self) -> dict:
        return {"step": self.step, "loss": self.loss if math.isfinite(self.loss) else None, "history": self.history}

    @classmethod
    def from_state(cls, state: dict | None) -> "Best":
        if not state:
            return cls()
        loss = state.get("loss")
        return cls(state.get("step", -1), math.inf if loss is None else loss, [tuple(h) for h in state.get("history", [])])
