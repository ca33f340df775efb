"""Synthetic images for the demo and tests: coloured shapes, some with .txt captions, some without."""

from __future__ import annotations

import random
from pathlib import Path

from flux_lora.outputs import files

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SIZES = [(64, 64), (96, 64), (64, 96), (80, 80)]


def make_images(out_dir: str | Path, count: int = 12, seed: int = 0, caption_every: int = 3) -> list[Path]:
    """Write `count` PNG/JPEG images; every image whose number is not a multiple of caption_every
    gets a sidecar caption (so a third go through the auto-captioner)."""
    from PIL import Image, ImageDraw

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        colour, rgb = rng.choice(sorted(COLOURS.items()))
        w, h = SIZES[i % len(SIZES)]
        im = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(im)
        x0, y0 = rng.randrange(w // 2), rng.randrange(h // 2)
        shape = "circle" if i % 2 else "square"
        box = (x0, y0, x0 + w // 3, y0 + h // 3)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=rgb)
        path = out / f"img_{i:03d}.{'png' if i % 2 else 'jpg'}"
        files.write_atomic(path, lambda f, im=im, kind="PNG" if i % 2 else "JPEG": im.save(f, format=kind), every_rank=True)
        if i % caption_every:
            files.write_atomic(path.with_suffix(".txt"), f"a {colour} {shape} on a plain background\n", every_rank=True)
        paths.append(path)
    return paths
