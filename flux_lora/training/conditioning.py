"""What each sample is conditioned on at a step: which of its captions (data.caption_lines), and
caption dropout (the caption replaced by the empty prompt's cached embedding with probability p,
as kohya's `caption_dropout_rate` and diffusers' `--proportion_empty_prompts`). Both are drawn
per sample from (seed, step, position in the global batch), so the same choices are made on any
number of ranks and after a resume."""

from __future__ import annotations

import random

import torch

from flux_lora.models.families.base import to_device
from flux_lora.training.flow import sample_seed

DROPOUT_SALT = 0xC0FFEE  # its own stream: the noise and timesteps of a sample do not change with p


def dropped(seed: int, step: int, positions: list[int], probability: float) -> list[bool]:
    """Whether each sample (by its position in the global batch) trains on the empty caption."""
    if probability <= 0:
        return [False] * len(positions)
    return [random.Random(sample_seed(seed ^ DROPOUT_SALT, step, j)).random() < probability for j in positions]


PICK_SALT = 0x5EEDCA9  # its own stream again


def caption_picks(seed: int, step: int, positions: list[int]) -> list[int]:
    """Which of its captions each sample (by position in the global batch) trains on this step;
    the dataset takes it modulo the item's number of captions."""
    return [random.Random(sample_seed(seed ^ PICK_SALT, step, j)).getrandbits(31) for j in positions]


def drop_captions(batch: dict, drop: list[bool], empty: dict[str, torch.Tensor]) -> dict:
    """The batch with the dropped samples' text embeddings (every text key) replaced by the empty
    prompt's; the batch itself is not changed. A pinned (page-locked) batch stays pinned, so its
    copy to the GPU is still queued, not a wait for the GPU."""
    if not any(drop):
        return batch
    out = dict(batch)
    for key, row in empty.items():
        text = torch.empty(batch[key].shape, dtype=batch[key].dtype, device=batch[key].device,
                           pin_memory=batch[key].is_pinned())
        text.copy_(batch[key])
        text[to_device(torch.tensor(drop), text.device)] = row.to(text.dtype)
        out[key] = text
    return out
