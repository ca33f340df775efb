"""What each sample is conditioned on at a step: caption dropout (the caption replaced by the
empty prompt's cached embedding with probability p, as kohya's `caption_dropout_rate` and
diffusers' `--proportion_empty_prompts`), decided per sample from (seed, step, position in the
global batch), so the same samples are dropped on any number of ranks and after a resume."""

from __future__ import annotations

import random

import torch

from flux_lora.training.flow import sample_seed

DROPOUT_SALT = 0xC0FFEE  # its own stream: the noise and timesteps of a sample do not change with p


def dropped(seed: int, step: int, positions: list[int], probability: float) -> list[bool]:
    """Whether each sample (by its position in the global batch) trains on the empty caption."""
    if probability <= 0:
        return [False] * len(positions)
    return [random.Random(sample_seed(seed ^ DROPOUT_SALT, step, j)).random() < probability for j in positions]


def drop_captions(batch: dict, drop: list[bool], empty: dict[str, torch.Tensor]) -> dict:
    """The batch with the dropped samples' text embeddings (every text key) replaced by the empty
    prompt's; the batch itself is not changed."""
    if not any(drop):
        return batch
    out = dict(batch)
    for key, row in empty.items():
        text = batch[key].clone()
        text[torch.tensor(drop)] = row.to(text.dtype)
        out[key] = text
    return out
