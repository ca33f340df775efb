"""The shapes world: coloured shapes on plain backgrounds, the captions that describe them, and a
measurement of what an image shows, read from its pixels.

    "a red circle on a white background"
The small pretrained model (models/flux-shapes, made by scripts/pretrain_shapes.py) knows the
COLOURS, SHAPES and BACKGROUNDS below. NEW_COLOURS it has never seen: the learning check teaches
one of them as a new concept behind a trigger word. `measure(image)` names the background, the
shape's colour and the shape (by how much of its bounding box it fills), with no model involved.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
NEW_COLOURS = {"magenta": (200, 40, 200), "orange": (250, 140, 20)}  # never in pretraining
BACKGROUNDS = {"white": (235, 235, 235), "black": (25, 25, 25), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZE = 64


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str

    def caption(self, colour_word: str | None = None) -> str:
        return f"a {colour_word or self.colour} {self.shape} on a {self.background} background"


def all_colours() -> dict[str, tuple[int, int, int]]:
    return {**COLOURS, **NEW_COLOURS}


def draw(scene: Scene, rng: random.Random, size: int = SIZE):
    """The scene as a PIL image: one filled shape, 36-55% of the side, anywhere it fits."""
    return draw_rgb(scene.shape, all_colours()[scene.colour], BACKGROUNDS[scene.background], rng, size)


def draw_any_colours(rng: random.Random, size: int = SIZE):
    """A shape and a background of random colours: what the VAE also learns from, so that it can
    show colours the transformer has never seen (the learning check teaches one)."""
    fill, bg = tuple(rng.randrange(256) for _ in range(3)), tuple(rng.randrange(256) for _ in range(3))
    return draw_rgb(rng.choice(SHAPES), fill, bg, rng, size)


def draw_rgb(shape: str, fill: tuple, background: tuple, rng: random.Random, size: int = SIZE):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), background)
    side = rng.randint(int(0.36 * size), int(0.55 * size))
    x0, y0 = rng.randint(2, size - side - 2), rng.randint(2, size - side - 2)
    box = (x0, y0, x0 + side, y0 + side)
    pen = ImageDraw.Draw(im)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x0 + side / 2, y0), (x0 + side, y0 + side), (x0, y0 + side)], fill=fill)
    return im


def random_scene(rng: random.Random, colours: dict = COLOURS) -> Scene:
    return Scene(rng.choice(sorted(colours)), rng.choice(SHAPES), rng.choice(sorted(BACKGROUNDS)))


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[str, float]:
    name = min(palette, key=lambda k: float(np.sum((rgb - np.array(palette[k])) ** 2)))
    return name, float(np.sqrt(np.sum((rgb - np.array(palette[name])) ** 2)))


def measure(image) -> dict:
    """{"background", "colour", "shape"} read from the pixels (None where nothing clear is there):
    the background is the border's median colour; the shape is every pixel far from it; its colour
    the nearest named colour to their median; circle, square or triangle by the share of its
    bounding box it fills (π/4, 1, 1/2)."""
    px = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background, _ = _nearest(bg_rgb, BACKGROUNDS)
    far = np.sqrt(np.sum((px - bg_rgb) ** 2, axis=-1)) > 60
    out = {"background": background, "colour": None, "shape": None}
    if far.sum() < 0.03 * far.size:
        return out
    colour, distance = _nearest(np.median(px[far], axis=0), all_colours())
    out["colour"] = colour if distance < 90 else None
    rows, cols = np.nonzero(far)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = far.sum() / box
    out["shape"] = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle" if fill > 0.35 else None
    return out


def accuracy(pairs: list[tuple[Scene, dict]]) -> dict:
    """Share of images whose measured colour, shape, background (and all three) match the scene."""
    n = max(len(pairs), 1)
    hits = {k: sum(m[k] == getattr(s, k) for s, m in pairs) / n for k in ("colour", "shape", "background")}
    hits["all"] = sum(all(m[k] == getattr(s, k) for k in ("colour", "shape", "background")) for s, m in pairs) / n
    return hits
