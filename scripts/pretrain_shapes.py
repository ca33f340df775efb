"""Pretrain the small FLUX.1-architecture model of the shapes world (one GPU, a few minutes):

    python scripts/pretrain_shapes.py --out models/flux-shapes            # on a GPU
    python scripts/pretrain_shapes.py --out /tmp/s --vae-steps 5 --steps 5 --images 64   # CPU smoke run

1. renders a pool of captioned scenes (data/shapes.py: 4 colours x 3 shapes x 3 backgrounds);
2. trains the VAE on them (reconstruction + a small KL), then sets its shift/scale factors from the
   latents' mean and std, as FLUX.1's VAE has them (it also sees as many scenes of random colours,
   so it can show colours the transformer never learned: the learning check teaches one);
3. trains the whole transformer with flux_lora's flow-matching objective (training/flow.py: noisy
   latents, velocity target, FLUX's shifted logit-normal timesteps), 10% of captions dropped;
4. samples every caption at fixed seeds through FluxPipeline and measures what the images show
   (data/shapes.measure), and how accurate that measure is on rendered scenes;
5. saves the pipeline (diffusers layout, transformer and VAE in fp16) and report.json beside it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux_lora.data import shapes  # noqa: E402
from flux_lora.models import shapes_model  # noqa: E402
from flux_lora.training import flow  # noqa: E402


def render_pool(count: int, seed: int) -> tuple[torch.Tensor, list[shapes.Scene]]:
    rng = random.Random(seed)
    scenes = [shapes.random_scene(rng) for _ in range(count)]
    pixels = np.stack([np.asarray(shapes.draw(s, rng)) for s in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1, scenes


def any_colour_pool(count: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    pixels = np.stack([np.asarray(shapes.draw_any_colours(rng)) for _ in range(count)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(vae, pixels: torch.Tensor, steps: int, device: torch.device) -> dict:
    """On the world's scenes and as many of random colours: the VAE can then show any colour."""
    pixels = torch.cat([pixels, any_colour_pool(len(pixels), seed=5)])
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.05 + 0.95 * (1 - s / steps))
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = pixels[torch.randint(len(pixels), (64,), generator=g)].to(device)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"vae step {step}: loss {loss.item():.5f}", flush=True)
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(pixels[i:i + 256].to(device)).latent_dist.mean for i in range(0, len(pixels), 256)])
    shift, scale = means.mean().item(), 1.0 / means.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return {"vae_final_loss": loss.item(), "shift_factor": shift, "scaling_factor": scale,
            "vae_new_colours_reconstructed": vae_shows(vae, device)}


@torch.no_grad()
def vae_shows(vae, device: torch.device) -> dict:
    """Share of scenes in each never-trained colour that come back out of the VAE as that colour."""
    rng, out = random.Random(11), {}
    for colour in shapes.NEW_COLOURS:
        scenes = [shapes.Scene(colour, rng.choice(shapes.SHAPES), rng.choice(sorted(shapes.BACKGROUNDS))) for _ in range(32)]
        x = torch.from_numpy(np.stack([np.asarray(shapes.draw(s, rng)) for s in scenes])).permute(0, 3, 1, 2).float()
        y = vae.decode(vae.encode(x.to(device) / 127.5 - 1).latent_dist.mean).sample
        images = ((y.permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).byte().cpu().numpy()
        from PIL import Image

        out[colour] = sum(shapes.measure(Image.fromarray(im))["colour"] == colour for im in images) / len(scenes)
    return out


@torch.no_grad()
def encode_all(vae, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Normalised latents, as preprocess caches them (posterior mean, shift, scale)."""
    out = [vae.encode(pixels[i:i + 256].to(device)).latent_dist.mean for i in range(0, len(pixels), 256)]
    return (torch.cat(out) - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def caption_table(pipe, device: torch.device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Every caption of the world (and "" for dropped captions) through the pipeline's encode_prompt."""
    captions = [""] + [shapes.Scene(c, s, b).caption()
                       for c, s, b in itertools.product(sorted(shapes.COLOURS), shapes.SHAPES, sorted(shapes.BACKGROUNDS))]
    t5, pooled, _ = pipe.encode_prompt(captions, captions, device=device, max_sequence_length=shapes_model.TEXT_TOKENS)
    return {c: i for i, c in enumerate(captions)}, t5, pooled


def train_transformer(model, latents, scene_ids, t5, pooled, steps: int, batch: int, device: torch.device) -> float:
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200) * (0.1 + 0.9 * (1 - s / steps)))
    g = torch.Generator(device=device).manual_seed(2)
    _, _, h, w = latents.shape
    mu = flow.flux_shift_mu((h // 2) * (w // 2))
    img_ids, txt_ids = flow.image_ids(h, w, device), flow.text_ids(t5.shape[1], device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for step in range(steps):
        pick = torch.randint(len(latents), (batch,), generator=g, device=device)
        x0, text = latents[pick], scene_ids[pick]
        text = torch.where(torch.rand(batch, generator=g, device=device) < 0.1, torch.zeros_like(text), text)
        noise = torch.randn(x0.shape, generator=g, device=device)
        t = flow.shift_timesteps(torch.sigmoid(torch.randn(batch, generator=g, device=device)), mu).clamp(1e-5, 1 - 1e-5)
        with autocast:
            pred = model(hidden_states=flow.pack_latents(flow.noisy_latents(x0, noise, t)), timestep=t,
                         pooled_projections=pooled[text], encoder_hidden_states=t5[text], txt_ids=txt_ids,
                         img_ids=img_ids, return_dict=False)[0]
        loss = flow.flow_loss(pred, flow.pack_latents(flow.velocity_target(x0, noise)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"transformer step {step}: loss {loss.item():.4f}", flush=True)
    model.eval()
    return loss.item()


def evaluate(pipe, seeds_per_caption: int, steps: int) -> dict:
    """Samples of every caption at fixed seeds, measured; and the measure on rendered scenes."""
    scenes = [shapes.Scene(c, s, b) for c, s, b in itertools.product(sorted(shapes.COLOURS), shapes.SHAPES,
                                                                      sorted(shapes.BACKGROUNDS))]
    jobs = [(scene, seed) for scene in scenes for seed in range(seeds_per_caption)]
    images = shapes_model.generate(pipe, [s.caption() for s, _ in jobs], [1000 + seed for _, seed in jobs], steps=steps)
    samples = shapes.accuracy([(s, shapes.measure(im)) for (s, _), im in zip(jobs, images)])
    rng = random.Random(99)
    held_out = [shapes.random_scene(rng, shapes.all_colours()) for _ in range(500)]
    rendered = shapes.accuracy([(s, shapes.measure(shapes.draw(s, rng))) for s in held_out])
    return {"samples_follow_prompts": samples, "samples": len(jobs), "measure_on_rendered_scenes": rendered,
            "rendered_scenes": len(held_out)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(shapes_model.PRETRAINED))
    p.add_argument("--images", type=int, default=16384)
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eval-seeds", type=int, default=4)
    p.add_argument("--sample-steps", type=int, default=20)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # SDPA's cuDNN backward fails on these machines (shared/gpu-notes.md): flash
        torch.backends.cuda.enable_cudnn_sdp(False)
    t0 = time.time()
    pipe = shapes_model.build_pipeline(seed=0)
    pixels, scenes = render_pool(args.images, seed=0)
    report = {"images": args.images, **train_vae(pipe.vae, pixels, args.vae_steps, device)}
    latents = encode_all(pipe.vae, pixels, device)
    pipe.text_encoder.to(device)
    pipe.text_encoder_2.to(device)
    index, t5, pooled = caption_table(pipe, device)
    scene_ids = torch.tensor([index[s.caption()] for s in scenes], device=device)
    report["transformer_final_loss"] = train_transformer(pipe.transformer, latents, scene_ids, t5, pooled,
                                                         args.steps, args.batch_size, device)
    report["train_s"] = time.time() - t0
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    report.update(evaluate(pipe, args.eval_seeds, args.sample_steps))
    report.update(steps=args.steps, vae_steps=args.vae_steps, batch_size=args.batch_size, device=str(device),
                  torch=torch.__version__, transformer_parameters=sum(p.numel() for p in pipe.transformer.parameters()))
    pipe.transformer.to(torch.float16)
    pipe.vae.to(torch.float16)
    pipe.to("cpu").save_pretrained(args.out, safe_serialization=True)
    Path(args.out, "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
