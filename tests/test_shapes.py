"""The shapes world (flux_lora.data.shapes) and its small pretrained model (models/flux-shapes):
the pixel measure is right on rendered scenes, and the shipped model, loaded the way FLUX.1-dev is,
draws what its prompts say.   pytest -q tests/test_shapes.py"""

import itertools
import random

import numpy as np
import torch

from flux_lora.data import shapes
from flux_lora.models import shapes_model


def test_measure_reads_every_rendered_scene_right():
    rng = random.Random(5)
    scenes = [shapes.random_scene(rng, shapes.all_colours()) for _ in range(300)]
    hits = shapes.accuracy([(s, shapes.measure(shapes.draw(s, rng))) for s in scenes])
    assert hits["all"] == 1.0, hits
    blank = shapes.measure(shapes.draw_rgb("square", (128, 128, 128), (128, 128, 128), rng))
    assert blank["colour"] is None and blank["shape"] is None  # nothing there: nothing named


def test_pretrained_model_loads_like_flux_and_follows_its_prompts():
    """Bound: at least 90% of the 36 captions at one fixed seed show the right colour, shape and
    background (the H200 run that made it measured 97.9% over 4 seeds, models/flux-shapes/report.json)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(shapes_model.PRETRAINED), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    scenes = [shapes.Scene(c, s, b) for c, s, b in itertools.product(sorted(shapes.COLOURS), shapes.SHAPES,
                                                                      sorted(shapes.BACKGROUNDS))]
    images = shapes_model.generate(pipe, [s.caption() for s in scenes], [1000] * len(scenes))
    hits = shapes.accuracy([(s, shapes.measure(im)) for s, im in zip(scenes, images)])
    assert hits["all"] >= 0.9, hits
    # its VAE shows colours the transformer never learned: a LoRA can teach one
    rng = random.Random(2)
    scene = shapes.Scene("magenta", "circle", "gray")
    x = torch.from_numpy(np.array(shapes.draw(scene, rng))).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    from PIL import Image

    back = Image.fromarray(((y[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).byte().numpy())
    assert shapes.measure(back)["colour"] == "magenta"
