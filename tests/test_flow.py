"""The objective's pure maths against diffusers' own helpers.   pytest -q tests/test_flow.py"""

import math

import torch
from diffusers import FluxPipeline

from flux_lora.training import flow


def test_pack_matches_diffusers_and_inverts():
    x = torch.randn(2, 4, 8, 12)
    packed = flow.pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 8, 12))
    assert torch.equal(flow.unpack_latents(packed, 8, 12), x)
    # diffusers unpacks from pixel sizes (vae_scale_factor 8 -> latent 8×12 is 64×96 px)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 64, 96, 8), x)


def test_ids_match_pipeline():
    ids = flow.image_ids(8, 12)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32))
    assert torch.equal(flow.text_ids(5), torch.zeros(5, 3))


def test_noise_depends_on_position_not_layout():
    kw = dict(kind="logit-normal", mean=0.0, std=1.0, seq_len=64, device=torch.device("cpu"))
    n_all, t_all = flow.sample_noise_and_t((4, 8, 8), 7, 3, [0, 1, 2, 3], **kw)
    n_a, t_a = flow.sample_noise_and_t((4, 8, 8), 7, 3, [0, 1], **kw)
    n_b, t_b = flow.sample_noise_and_t((4, 8, 8), 7, 3, [2, 3], **kw)
    assert torch.equal(torch.cat([n_a, n_b]), n_all) and torch.equal(torch.cat([t_a, t_b]), t_all)
    assert not torch.equal(n_all[0], n_all[1])  # per-sample noise
    n_next, _ = flow.sample_noise_and_t((4, 8, 8), 7, 4, [0], **kw)
    assert not torch.equal(n_next[0], n_all[0])  # changes with the step
    assert ((t_all > 0) & (t_all < 1)).all()


def test_flux_shift_matches_diffusers_and_pushes_t_up():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert math.isclose(flow.flux_shift_mu(4096), calculate_shift(4096), rel_tol=1e-9)
    assert math.isclose(flow.flux_shift_mu(1024), calculate_shift(1024), rel_tol=1e-9)
    t = torch.tensor([0.1, 0.5, 0.9])
    shifted = flow.shift_timesteps(t, flow.flux_shift_mu(4096))
    assert (shifted > t).all() and math.isclose(float(shifted[1]), math.exp(1.15) / (math.exp(1.15) + 1), rel_tol=1e-6)


def test_uniform_and_shifted_distributions():
    dev = torch.device("cpu")
    _, tu = flow.sample_noise_and_t((1, 2, 2), 0, 0, list(range(2000)), "uniform", 0, 1, 256, dev)
    _, tl = flow.sample_noise_and_t((1, 2, 2), 0, 0, list(range(2000)), "logit-normal", 0, 1, 256, dev)
    _, ts = flow.sample_noise_and_t((1, 2, 2), 0, 0, list(range(2000)), "flux-shift", 0, 1, 4096, dev)
    assert abs(tu.mean() - 0.5) < 0.03 and abs(tl.mean() - 0.5) < 0.03 and ts.mean() > 0.65


def test_noising_and_target():
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.0, 0.5, 1.0])
    xt = flow.noisy_latents(x0, eps, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], eps[2])
    torch.testing.assert_close(xt[1], (x0[1] + eps[1]) / 2)
    # the Euler step of the scheduler along the target velocity recovers x0 from x_t
    v = flow.velocity_target(x0, eps)
    torch.testing.assert_close(xt[1] - 0.5 * v[1], x0[1])
    assert flow.flow_loss(v, v) == 0
