"""Validation (flux_lora.training.validation): which items are held out, the loss at fixed t and
noise against a direct computation, and the best-checkpoint bookkeeping.
    pytest -q tests/test_validation.py"""

import math

import torch

from flux_lora.training import flow, validation
from helpers import _small_flux


def test_held_out_items_are_a_stable_fraction_never_all():
    items = list(range(40))
    held = validation.held_out(items, 0.25)
    assert len(held) == 10 and held == validation.held_out(items, 0.25)
    assert held <= validation.held_out(list(range(41)), 0.25) | {40}  # a new item does not reshuffle much
    assert validation.held_out([0, 1], 0.9) in ({0}, {1})  # never every item
    assert validation.held_out([0], 0.5) == set() and validation.held_out(items, 0) == set()
    assert len(validation.held_out(list(range(10)), 0.01)) == 1  # a split > 0 holds out at least one


def test_item_loss_is_the_flow_loss_at_each_fixed_timestep():
    model = _small_flux(single_layers=1)
    g = torch.Generator().manual_seed(3)
    sample = {"latents": torch.randn(4, 8, 8, generator=g), "t5": torch.randn(8, 32, generator=g),
              "clip": torch.randn(32, generator=g)}
    ts = validation.timesteps(4)
    assert ts == [0.125, 0.375, 0.625, 0.875]
    got = validation.item_loss(model, sample, index=7, ts=ts, guidance=1.0, device=torch.device("cpu"),
                               dtype=torch.float32)
    gen = torch.Generator().manual_seed(flow.sample_seed(validation.VALIDATION_SEED, 0, 7))
    noise = torch.randn(4, 8, 8, generator=gen)
    direct = []
    with torch.no_grad():
        for t in ts:  # one timestep at a time, the same noise each time
            x0 = sample["latents"][None]
            xt = flow.pack_latents((1 - t) * x0 + t * noise[None])
            pred = model(hidden_states=xt, timestep=torch.tensor([t]), guidance=torch.ones(1),
                         pooled_projections=sample["clip"][None], encoder_hidden_states=sample["t5"][None],
                         txt_ids=flow.text_ids(8), img_ids=flow.image_ids(8, 8), return_dict=False)[0]
            direct.append(float(((pred - flow.pack_latents(noise[None] - x0)) ** 2).mean()))
    assert math.isclose(got, sum(direct) / len(direct), rel_tol=1e-5)


def test_best_keeps_the_lowest_and_survives_a_checkpoint():
    best = validation.Best()
    assert best.record(0, 1.0) and best.record(3, 0.8) and not best.record(6, 0.9) and not best.record(8, 0.8)
    assert (best.step, best.loss) == (3, 0.8)  # a tie keeps the earlier step
    again = validation.Best.from_state(best.to_state())
    assert (again.step, again.loss, again.history) == (3, 0.8, best.history)
    assert "0.80000 at step 3" in again.reason() and "steps 0, 3, 6, 8" in again.reason()
